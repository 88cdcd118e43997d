"""Sweeps: multirun dirs, the batched launcher (equal to sequential runs), other launchers, Optuna."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _metadata_version

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, make_cfg, read_metrics, run_cli
from quadnet import checkpoint, engines, loop, rundir
from quadnet.config import version_base
from quadnet.data import make_dataset
from quadnet.device import resolve_device
from quadnet.loop import start_state
from quadnet.train import train

MIXED = [  # seeds, lrs, regs, epochs, hidden_dims, momentum and init all differ
    ["seed=0", "lr=0.001", "reg=0.001", "epochs=700", "hidden_dim=50"],
    ["seed=1", "lr=0.01", "reg=0.0", "epochs=300", "hidden_dim=7"],
    ["seed=2", "lr=0.05", "reg=0.01", "epochs=1000", "hidden_dim=20", "momentum=0.9"],
    ["seed=3", "lr=0.003", "reg=0.1", "epochs=0", "hidden_dim=1", "init=torch"],
    ["seed=4", "lr=1e6", "reg=0.0", "epochs=500", "hidden_dim=30"],  # diverges
    ["seed=5", "lr=0.02", "reg=0.001", "epochs=250", "hidden_dim=50", "init=torch", "momentum=0.5"],
]


def _probs(summary):
    return np.array([p["probs"] for p in summary["predictions"]], dtype=float)


def _sweep(tmp_path, name, *overrides):
    """``python -m quadnet.train -m overrides`` into tmp_path/name, as a user runs it; it must succeed."""
    r = run_cli("-m", *overrides, f"hydra.sweep.dir={tmp_path}/{name}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def _batch(cfgs, tmp_path=None, device="cpu"):
    """Train configs as one batch, as the launcher does; write each job's dir under tmp_path/bat<i>."""
    data = make_dataset(cfgs[0].data)
    label, engine, jobs, seconds = loop.train_batch([loop.Job(c, start_state(c)) for c in cfgs], data, device)
    if tmp_path is None:
        return jobs
    ran = {"device": label, "engine": engine, "train_seconds": seconds}
    return [rundir.write(tmp_path / f"bat{i}", j, data, ran) for i, j in enumerate(jobs)]


def _summary(tmp_path, name, n):
    return json.loads((tmp_path / name / str(n) / "summary.json").read_text())


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-9), ("float32", 1e-5)])
@pytest.mark.parametrize("data", ["seed", "sampled"])
def test_batched_equals_sequential_on_a_mixed_sweep(dtype, tol, data, tmp_path):
    cfgs = [make_cfg(*ov, f"dtype={dtype}", f"data={data}", "log_every=50") for ov in MIXED]
    summaries = _batch(cfgs, tmp_path)
    for i, (cfg, bat) in enumerate(zip(cfgs, summaries, strict=True)):
        seq = train(cfg, run_dir=tmp_path / f"seq{i}")
        assert bat["status"] == seq["status"] and bat["epoch"] == seq["epoch"], MIXED[i]
        if seq["status"] == "diverged":
            continue
        assert [p["predicted"] for p in bat["predictions"]] == [p["predicted"] for p in seq["predictions"]]
        np.testing.assert_allclose(_probs(bat), _probs(seq), rtol=0, atol=tol)
        a = read_metrics(tmp_path / f"seq{i}" / "metrics.csv")
        b = read_metrics(tmp_path / f"bat{i}" / "metrics.csv")
        assert [x["epoch"] for x in a] == [x["epoch"] for x in b]
        np.testing.assert_allclose([x["loss"] for x in a], [x["loss"] for x in b], rtol=tol, atol=tol)
    assert summaries[4]["status"] == "diverged"


def test_batched_launcher_from_the_cli_equals_the_basic_launcher(tmp_path):
    sweep = ["hidden_dim=5,50", "lr=0.01,0.1", "epochs=200,400", "momentum=0.5"]
    for name in ("basic", "batched"):  # (each ends in the same line)
        r = _sweep(tmp_path, name, f"hydra/launcher={name}", *sweep)
        assert r.stdout.splitlines()[-1].endswith(
            f"8 jobs: 8 completed; report: python -m quadnet.report {tmp_path}/{name}"
        )
        assert ("(its share of its batch's" in r.stdout + r.stderr) == (name == "batched")  # (train_seconds: whose)
    for n in range(8):
        a, b = _summary(tmp_path, "basic", n), _summary(tmp_path, "batched", n)
        assert a["config"] == {**b["config"], "plots": True}
        np.testing.assert_allclose(_probs(a), _probs(b), rtol=0, atol=1e-9)
        assert b["batch"]["jobs"] == 8 and "batch" not in a
        assert _job_files(tmp_path / "batched" / str(n)) == [
            "checkpoint.npz",
            "metrics.csv",
            "summary.json",
            "train.log",
        ]
        assert a["overrides"] == b["overrides"] and b["train_seconds"] < b["batch"]["seconds"]
        overrides = yaml.safe_load((tmp_path / "basic" / str(n) / ".hydra" / "overrides.yaml").read_text())
        assert b["overrides"] == overrides and b["config"] == yaml.safe_load(
            (tmp_path / "basic" / str(n) / ".hydra" / "config.yaml").read_text()) | {"plots": False}  # fmt: skip
        assert not (tmp_path / "batched" / str(n) / "loss.png").exists()  # plots are off in batched sweeps
        assert all((tmp_path / "basic" / str(n) / f).exists() for f in ("loss.png", "confusion.png"))
    assert (tmp_path / "batched" / "multirun.yaml").is_file()


def test_job_dirs_follow_a_custom_subdir_as_under_the_basic_launcher(tmp_path):
    sub = "hydra.sweep.subdir=${hydra.job.override_dirname}"
    for launcher in ("basic", "batched"):
        _sweep(tmp_path, launcher, f"hydra/launcher={launcher}", "seed=0,1", "epochs=5", sub)
        made = sorted(p.parent.name for p in (tmp_path / launcher).glob("*/summary.json"))
        assert made == ["epochs=5,seed=0", "epochs=5,seed=1"], launcher


def _batched_sweep_error(tmp_path, *overrides: str) -> str:
    """Run a batched sweep into tmp_path/s that must fail with bad input; its one-line error."""
    r = run_cli("-m", "hydra/launcher=batched", *overrides, f"hydra.sweep.dir={tmp_path}/s", cwd=tmp_path)
    # (Hydra names a failed job's overrides on a line of its own first)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    return r.stderr.splitlines()[-1]


def test_a_failing_job_inside_a_batch_keeps_the_others(tmp_path):
    error = _batched_sweep_error(tmp_path, "hidden_dim=4,0,8", "epochs=50", "lr=0.1,1e6")
    assert error.startswith("error: hidden_dim=0 is not allowed")
    statuses = {}
    for d in (tmp_path / "s").iterdir():
        if (d / "summary.json").exists():
            s = json.loads((d / "summary.json").read_text())
            key = (s["config"] or {}).get("hidden_dim", s.get("error", "")[:12]), (s["config"] or {}).get("lr")
            statuses[key] = s["status"]
    assert statuses == {
        **{(4, 0.1): "completed", (8, 0.1): "completed", (4, 1e6): "diverged", (8, 1e6): "diverged"},
        ("hidden_dim=0", None): "failed",
    }


def test_a_job_that_fails_in_training_is_taken_out_and_the_rest_train_on(tmp_path, monkeypatch):
    """Any exception while a batch is built or trained (here: memory, for the widest net) fails
    that job alone, with a one-line reason; the others equal their own runs."""
    import quadnet.sweep as sweep

    real = loop.build

    def build(cfgs, *a, **k):
        if any(c.hidden_dim == 13 for c in cfgs):
            raise MemoryError
        return real(cfgs, *a, **k)

    monkeypatch.setattr(loop, "build", build)
    cfgs = [make_cfg(f"hidden_dim={h}", "epochs=150", f"seed={i}") for i, h in enumerate((4, 13, 6, 9, 5))]
    jobs = [
        sweep.Job(i, [], tmp_path / str(i), cfg=c, data=make_dataset(c.data), start=loop.Job(c, start_state(c)))
        for i, c in enumerate(cfgs)
    ]
    sweep.train_here([jobs], 0, lambda: False, quiet=True)
    assert [j.error is None for j in jobs] == [True, False, True, True, True]
    assert jobs[1].error.startswith("out of memory")
    for j, c in zip(jobs, cfgs, strict=True):
        if j.result is not None:
            (alone,) = _batch([c])
            for k in alone.state["params"]:
                np.testing.assert_allclose(j.result.state["params"][k], alone.state["params"][k], rtol=0, atol=1e-9)


def _job_files(job_dir):
    return sorted(str(p.relative_to(job_dir)) for p in job_dir.rglob("*") if p.is_file())


def test_a_job_whose_dir_cannot_be_made_fails_alone_and_the_sweep_goes_through_its_chunks(tmp_path):
    sweep_dir = tmp_path / "s"
    sweep_dir.mkdir()
    (sweep_dir / "2").write_text("in the way")  # job 2's dir cannot be made
    args = ("-m", "hydra/launcher=batched", "hydra.launcher.max_batch=2", "seed=range(7)", "epochs=30", "log_every=10")
    r = run_cli(*args, f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[-1] == f"error: cannot write '{sweep_dir / '2'}': File exists", r.stderr
    assert (sweep_dir / "2").read_text() == "in the way"
    assert "jobs 0-1 of 7 written" in r.stdout and "jobs 6-6 of 7 written" in r.stdout  # chunks of max_batch
    for n in (0, 1, 3, 4, 5, 6):
        s = _summary(tmp_path, "s", n)
        assert s["status"] == "completed" and s["batch"]["jobs"] == (1 if n == 6 else 2)
        assert _job_files(sweep_dir / str(n)) == ["checkpoint.npz", "metrics.csv", "summary.json", "train.log"]
        assert "status completed at epoch 30/30" in (sweep_dir / str(n) / "train.log").read_text()


def test_batched_chunks_through_submitit_equal_the_batches_trained_here(tmp_path):
    pytest.importorskip("submitit")
    sweep = ["hydra/launcher=batched", "hydra.launcher.max_batch=2", "seed=range(4)", "epochs=200", "lr=0.01"]
    _sweep(tmp_path, "here", *sweep)
    _sweep(tmp_path, "sub", *sweep, "hydra.launcher.executor=local")
    _sweep(tmp_path, "debug", *sweep, "hydra.launcher.executor=debug")  # submitit's, in this process
    ids = set()
    for n in range(4):
        a, b, c = (_summary(tmp_path, name, n) for name in ("here", "sub", "debug"))
        assert b["status"] == c["status"] == "completed" and b["batch"]["jobs"] == c["batch"]["jobs"] == 2
        np.testing.assert_allclose(_probs(a), _probs(b), rtol=0, atol=1e-12)
        np.testing.assert_allclose(_probs(a), _probs(c), rtol=0, atol=1e-12)
        ids.add(b["batch"]["submitit_job"])
    assert len(ids) == 2  # two chunks of two, one submitit job each
    assert (tmp_path / "sub" / ".submitit").is_dir()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_bad_device_found_in_a_submitit_chunk_is_one_line(tmp_path):
    pytest.importorskip("submitit")
    error = _batched_sweep_error(tmp_path, "hydra.launcher.executor=local", "device=cuda", "seed=0,1", "epochs=10")
    assert error.startswith("error: device='cuda' is not available")


@pytest.mark.parametrize(
    "option,message",
    [
        ("max_batch=-1", "hydra.launcher.max_batch=-1 is not allowed: must be >= 0"),
        ("mlflow_runs=-1", "hydra.launcher.mlflow_runs=-1 is not allowed: must be >= 0"),
        ("executor=lsf", "hydra.launcher.executor='lsf' is not allowed: choose one of local, slurm, debug"),
        ("+hydra.launcher.nope=1", "unknown config key 'hydra.launcher.nope' (the batched launcher's keys: plots, "),
    ],
)
def test_a_bad_launcher_option_is_one_line_and_writes_nothing(option, message, tmp_path):
    overrides = [option if option.startswith("+") else f"hydra.launcher.{option}", "seed=0,1"]
    assert _batched_sweep_error(tmp_path, *overrides).startswith(f"error: {message}")
    assert not (tmp_path / "s").exists()  # refused before the sweeper writes its record


def test_the_same_job_twice_gets_two_dirs_and_resume_is_refused_in_a_batched_sweep(tmp_path):
    _sweep(tmp_path, "s", "hydra/launcher=batched", "seed=1,1", "epochs=20")
    a, b = _summary(tmp_path, "s", 0), _summary(tmp_path, "s", 1)
    assert a["run_dir"].endswith("/0") and b["run_dir"].endswith("/1") and a["predictions"] == b["predictions"]
    resume = f"resume={tmp_path}/s/0"
    r = run_cli("-m", "hydra/launcher=batched", resume, "epochs=30,40", f"hydra.sweep.dir={tmp_path}/r", cwd=tmp_path)
    assert r.returncode == 2 and "is not for batched sweeps" in r.stderr and "hydra.sweep.dir=<its dir>" in r.stderr
    assert not (tmp_path / "r").exists()  # the refused sweep leaves no dir


def test_unbatchable_jobs_run_on_their_own_in_the_same_sweep(tmp_path):
    _sweep(tmp_path, "s", "hydra/launcher=batched", "engine=torch,numpy", "epochs=100", "seed=0,1")
    summaries = [_summary(tmp_path, "s", n) for n in range(4)]
    assert [s["engine"] for s in summaries] == ["torch/fused", "torch/fused", "numpy", "numpy"]
    assert [s["batch"]["jobs"] for s in summaries] == [2, 2, 1, 1]  # the NumPy engine trains one job at a time
    np.testing.assert_allclose(_probs(summaries[0]), _probs(summaries[2]), atol=1e-9)


def test_basic_multirun_writes_under_outputs_and_two_sweeps_in_one_second_do_not_collide(tmp_path):
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "quadnet.train", "-m", "epochs=0,1", "hidden_dim=2"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read() if p.stderr else ""
    sweeps = sorted((tmp_path / "outputs" / "multirun").iterdir())
    assert len(sweeps) == 2
    for s in sweeps:
        assert sorted(p.name for p in s.iterdir() if p.is_dir()) == ["0", "1"]
        assert (s / "1" / "summary.json").is_file() and (s / "multirun.yaml").is_file()


def test_batched_launcher_is_discovered_from_any_directory(tmp_path):
    code = (
        "from hydra.core.plugins import Plugins; from hydra.plugins.launcher import Launcher;"
        "from quadnet.config import register_configs; register_configs();"
        "print(sorted(p.__name__ for p in Plugins.instance().discover(Launcher)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "BatchedLauncher" in out.stdout
    # discovery does not import torch: the plugin module stays light
    code = "import sys; import hydra_plugins.quadnet_batched_launcher.launcher as m; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "line",
    [
        "seed=17",
        "lr=0.01",
        "lr=-1.5e-3",
        "data.seed=3",
        "a=1e3",
        "a=1E+5",
        "a=-0",
        "x_y.z=12.5e-07",
        "a=007",
        "a=1_000",
        "lr=.5",
        "a=+3",
        "a=1.",
        "a=inf",
        "a=abc",
    ],
)
def test_the_composers_own_parse_of_key_number_equals_hydras(line):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from quadnet.compose import Composer

    composer = Composer(None, None)
    ((ours, _),), hydra = composer._parse([line]), OverridesParser.create().parse_overrides([line])[0]
    assert ours == hydra and type(ours.value()) is type(hydra.value())


def test_the_composer_types_each_job_as_hydra_composes_it(tmp_path):
    """The Composer's configs (a template composed once, the values on top) against Hydra's composition of each job."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from quadnet.compose import Composer, SweepLoader
    from quadnet.config import ConfigError, config_dir, register_configs, validate

    register_configs()
    GlobalHydra.instance().clear()
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(config_dir()))
    master = loader.load_configuration("train", ["hydra/launcher=batched", "lr=0.5"], RunMode.MULTIRUN)
    before = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(master)
    composer = Composer(loader, master)
    jobs = [  # (Hydra 1.4 refuses a job that changes hydra.sweeper, as +experiment does here)
        ["seed=1", "lr=0.1"], ["seed=2", "lr=1"], ["seed='3'", "lr=1e-3"], ["seed=5", "data=sampled", "data.n_train=9"],
        ["seed=6", "data=sampled"], ["hidden_dim=3", "momentum=0.5", "progress=null"], ["lr=0.1", "seed=7", "lr=0.2"],
        ["optimizer=adam", "beta1=0", "data=csv", "data.path=x.csv"], ["+experiment=epochs_study", "seed=2"],
    ][: None if version_base() else -1]  # fmt: skip
    for ov in jobs:
        got = composer.typed(ov)
        assert got is not None and got == validate(loader.load_sweep_config(master, ov)), ov
    assert composer.typed(["lr=${reg}"]) is None and composer.typed(["+foo=1"]) is None  # (Hydra composes those)
    with pytest.raises(ConfigError, match="hidden_dim='abc' is not allowed: must be an integer"):
        composer.typed(["hidden_dim=abc", "momentum=0.5"])
    checked = SweepLoader(loader)  # the sweeper's check: Hydra's composition where the Composer leaves one to it
    assert checked.load_sweep_config(master, ["seed=3"]) is master and "foo" in checked.load_sweep_config(
        master, ["+foo=1"]
    )
    HydraConfig.instance().cfg = before


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_parallel_and_cluster_launchers_run_a_sweep(launcher, tmp_path):
    pytest.importorskip(
        {"joblib": "hydra_plugins.hydra_joblib_launcher", "submitit_local": "hydra_plugins.hydra_submitit_launcher"}[
            launcher
        ]
    )
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else ["hydra.launcher.timeout_min=5"]
    _sweep(tmp_path, "s", f"hydra/launcher={launcher}", *extra, "hidden_dim=3,6", "epochs=100", "plots=false")
    dims = sorted(_summary(tmp_path, "s", n)["config"]["hidden_dim"] for n in (0, 1))
    assert dims == [3, 6]


def _version(package: str) -> str:
    try:
        return _metadata_version(package)
    except PackageNotFoundError:
        return "0"


# hydra-optuna-sweeper before 1.4 does not work with hydra-core 1.4 (its sampler stays a DictConfig)
OPTUNA_BROKEN = not version_base() and _version("hydra-optuna-sweeper") < "1.4"


@pytest.mark.skipif(OPTUNA_BROKEN, reason="hydra-optuna-sweeper < 1.4 does not work with hydra-core 1.4")
def test_optuna_search_minimises_the_objective(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    trials = ["hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2"]  # two launches of the batched launcher
    r = _sweep(tmp_path, "s", "+hparams_search=optuna", *trials, "hydra/launcher=batched", "epochs=200")
    closing = [line for line in r.stdout.splitlines() if "report: python -m quadnet.report" in line]
    assert len(closing) == 1 and closing[0].endswith(
        f"4 jobs: 4 completed; report: python -m quadnet.report {tmp_path}/s"
    )
    best = (tmp_path / "s" / "optimization_results.yaml").read_text()
    assert "best_value" in best and "best_params" in best
    losses = [
        json.loads((d / "summary.json").read_text())["val_loss"]
        for d in (tmp_path / "s").iterdir()
        if (d / "summary.json").exists()
    ]
    assert len(losses) == 4
    import yaml

    assert yaml.safe_load(best)["best_value"] == pytest.approx(min(losses))


def test_a_checkpoint_written_by_a_batch_resumes_exactly(tmp_path):
    _batch([make_cfg("epochs=300", "lr=0.01", "momentum=0.9")], tmp_path)
    full = train(make_cfg("epochs=600", "lr=0.01", "momentum=0.9"), run_dir=tmp_path / "full")
    resumed = train({"resume": str(tmp_path / "bat0"), "epochs": 600}, run_dir=tmp_path / "r")
    np.testing.assert_allclose(_probs(resumed), _probs(full), atol=1e-9)
    assert checkpoint.load(tmp_path / "r")["epoch"] == 600


def test_a_torch_batch_on_a_device_equals_each_job_in_numpy(device):
    on_device = _batch([make_cfg(*ov, "log_every=50", "engine=torch") for ov in MIXED], device=device)
    for ov, a in zip(MIXED, on_device, strict=True):
        (b,) = _batch([make_cfg(*ov, "log_every=50", "engine=numpy")])
        assert a.status == b.status and a.epoch == b.epoch, ov
        if a.status == "completed":
            for k in a.state["params"]:
                np.testing.assert_allclose(a.state["params"][k], b.state["params"][k], atol=1e-9)


def test_a_batched_sweep_on_a_device_equals_each_job_trained_alone(tmp_path, device):
    """From the command line: a chunk trains in the launcher's helper thread while the last one is written."""
    sweep = ["epochs=300", "lr=0.01", "engine=torch"]
    batched = ["hydra/launcher=batched", "hydra.launcher.max_batch=2", "seed=range(4)", f"device={device}"]
    _sweep(tmp_path, "s", *batched, *sweep)
    for n in range(4):
        alone = train(make_cfg(f"seed={n}", *sweep, "device=cpu"), run_dir=tmp_path / f"alone{n}")
        s = _summary(tmp_path, "s", n)
        assert s["status"] == alone["status"] == "completed" and s["device"].startswith(resolve_device(device))
        np.testing.assert_allclose(_probs(s), _probs(alone), rtol=0, atol=1e-9)


def test_hydra_plugins_stays_a_namespace_package():
    """An __init__.py in hydra_plugins/ would hide every other installed Hydra plugin."""
    assert not (ROOT / "hydra_plugins" / "__init__.py").exists()


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_keeps_every_job_and_the_sweep_resumes_as_one_batch(sig, code, tmp_path):
    sweep = [
        "-m",
        "hydra/launcher=batched",
        "seed=0,1,2",
        "hidden_dim=5,9",
        "lr=0.01",
        "log_every=500",
        "checkpoint_every=500",
    ]
    p = subprocess.Popen(
        [sys.executable, "-m", "quadnet.train", *sweep, "epochs=1000000", f"hydra.sweep.dir={tmp_path}/s"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while not (tmp_path / "s" / "5" / "checkpoint.npz").exists() and time.time() < deadline:
        time.sleep(0.1)  # the batch has written its first checkpoint: it is training
    p.send_signal(sig)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == code, out
    assert "Traceback" not in out and "Resume the sweep with" in out and "hydra.sweep.dir=" in out
    epochs = set()
    for n in range(6):
        s = _summary(tmp_path, "s", n)
        assert s["status"] == "interrupted" and checkpoint.load(tmp_path / "s" / str(n))["status"] == "interrupted"
        epochs.add(s["epoch"])
    (stopped,) = epochs  # every job stopped at the same step
    target = stopped + 300
    r = run_cli(*sweep, f"epochs={target}", f"hydra.sweep.dir={tmp_path}/s", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "6 resumed from their checkpoints" in r.stdout + r.stderr
    assert _summary(tmp_path, "s", 0)["batch"]["jobs"] == 6  # resumed together, as one batch
    _sweep(tmp_path, "straight", *sweep[1:], f"epochs={target}")
    for n in range(6):
        a, b = _summary(tmp_path, "s", n), _summary(tmp_path, "straight", n)
        assert a["status"] == b["status"] == "completed" and a["epoch"] == target
        np.testing.assert_allclose(_probs(a), _probs(b), rtol=0, atol=1e-12)


def test_an_interrupted_basic_sweep_goes_on_under_the_batched_launcher_and_is_never_trained_over(tmp_path):
    sweep = ["-m", "seed=0,1", "lr=0.01", "log_every=500", "checkpoint_every=500", "plots=false"]
    p = subprocess.Popen(
        [sys.executable, "-m", "quadnet.train", *sweep, "hydra/launcher=basic", "epochs=1000000",
         f"hydra.sweep.dir={tmp_path}/s"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while not (tmp_path / "s" / "0" / "checkpoint.npz").exists() and time.time() < deadline:
        time.sleep(0.1)  # job 0 is training
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in out, out
    command = shlex.split(out.split("Resume with:\n")[1].splitlines()[0])
    assert command[:3] == ["python", "-m", "quadnet.train"] and "hydra/launcher=batched" in command, command
    target = checkpoint.load(tmp_path / "s" / "0")["epoch"] + 300
    # the basic launcher again into its dir: job 0's run is refused, not trained over
    ck = (tmp_path / "s" / "0" / "checkpoint.npz").read_bytes()
    r = run_cli(
        "-m", "seed=0", "hydra/launcher=basic", f"epochs={target}", f"hydra.sweep.dir={tmp_path}/s", cwd=tmp_path
    )
    assert r.returncode == 2 and "holds an earlier run" in r.stderr.splitlines()[-1], r.stderr
    assert (tmp_path / "s" / "0" / "checkpoint.npz").read_bytes() == ck
    # the printed command (with more epochs) goes on with job 0 and trains job 1, as if straight through
    r = run_cli(*[a if a != "epochs=1000000" else f"epochs={target}" for a in command[3:]], cwd=tmp_path)
    assert r.returncode == 0 and "1 resumed from their checkpoints" in r.stdout + r.stderr, r.stderr
    _sweep(tmp_path, "straight", "hydra/launcher=batched", *sweep[1:], f"epochs={target}")
    for n in (0, 1):
        a, b = _summary(tmp_path, "s", n), _summary(tmp_path, "straight", n)
        assert a["status"] == b["status"] == "completed" and a["epoch"] == target
        np.testing.assert_allclose(_probs(a), _probs(b), rtol=0, atol=1e-12)


def test_a_sweep_run_again_into_its_dir_continues_its_jobs_and_never_throws_training_away(tmp_path):
    sweep = ["hydra/launcher=batched", "seed=0,1", "log_every=50"]
    _sweep(tmp_path, "s", *sweep, "epochs=200")
    before = {n: (tmp_path / "s" / str(n) / "summary.json").read_text() for n in (0, 1)}
    # the same sweep again: both jobs completed before, and their dirs stay as they are
    r = _sweep(tmp_path, "s", *sweep, "epochs=200")
    out = r.stdout + r.stderr
    assert "0 resumed from their checkpoints, 2 completed before, 0 refused" in out
    assert before == {n: (tmp_path / "s" / str(n) / "summary.json").read_text() for n in (0, 1)}
    # fewer epochs, other settings, a bad key: refused in one line; nothing is written, Hydra's record stays
    record = (tmp_path / "s" / "multirun.yaml").read_text()
    for change, why in (("epochs=100", "holds a run at epoch 200 and "), ("lr=0.01", "holds a run at epoch 200 and "),
                        ("+foo=1", "unknown config key 'foo'")):  # fmt: skip
        r = run_cli("-m", *sweep, "epochs=200", change, f"hydra.sweep.dir={tmp_path}/s", cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert why in r.stderr.splitlines()[-1], r.stderr
        assert before == {n: (tmp_path / "s" / str(n) / "summary.json").read_text() for n in (0, 1)}
        assert (tmp_path / "s" / "multirun.yaml").read_text() == record
    # a damaged summary (overrides not a list) is not a completed job: it is written again from its checkpoint
    damaged = {**json.loads(before[1]), "overrides": 5}
    (tmp_path / "s" / "1" / "summary.json").write_text(json.dumps(damaged))
    r = _sweep(tmp_path, "s", *sweep, "epochs=200")
    assert "1 resumed from their checkpoints, 1 completed before" in r.stdout + r.stderr
    assert json.loads((tmp_path / "s" / "1" / "summary.json").read_text())["overrides"][0] == "seed=1"
    # more epochs: each job goes on from its checkpoint, as if it had trained straight through
    r = _sweep(tmp_path, "s", *sweep, "epochs=350")
    out = r.stdout + r.stderr
    assert "2 resumed from their checkpoints" in out
    _sweep(tmp_path, "straight", *sweep, "epochs=350")
    for n in (0, 1):
        a, b = _summary(tmp_path, "s", n), _summary(tmp_path, "straight", n)
        assert a["status"] == b["status"] == "completed" and a["epoch"] == 350
        np.testing.assert_allclose(_probs(a), _probs(b), rtol=0, atol=1e-12)
        assert [r["epoch"] for r in read_metrics(tmp_path / "s" / str(n) / "metrics.csv")] == list(range(0, 351, 50))


@pytest.mark.parametrize("engine,default", [("numba", 3), ("torch", 1)])
def test_threads_follow_the_setting_and_never_exceed_the_usable_cpus(engine, default, monkeypatch):
    """threads=0: every usable CPU for numba, one for torch; never more than the process may use."""
    from quadnet.data import make_dataset

    def engine_threads(threads):
        c = make_cfg(f"engine={engine}", f"threads={threads}")
        return engines.build([c], make_dataset(c.data), [start_state(c)], "cpu").threads

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2})
    assert [engine_threads(t) for t in (0, 2, 9)] == [default, 2, 3]
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert engines.usable_cpus() == 1 and [engine_threads(t) for t in (0, 4)] == [1, 1]


@pytest.mark.parametrize(
    "files,cpus",
    [
        ({"/sys/fs/cgroup/cpu.max": "250000 100000\n"}, 3),  # cgroup v2 (docker --cpus 2.5)
        ({"/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "150000\n", "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n"}, 2),
        ({"/sys/fs/cgroup/cpu.max": "max 100000\n", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1\n"}, 8),  # no quota
    ],
)
def test_usable_cpus_honour_a_cgroup_quota(files, cpus, monkeypatch):
    from pathlib import Path

    def read_text(self, *args, **kwargs):
        if str(self) not in files:
            raise FileNotFoundError(self)
        return files[str(self)]

    monkeypatch.setattr(Path, "read_text", read_text)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    assert engines.usable_cpus() == cpus


def test_a_big_sweep_prints_a_summary_and_a_progress_bar_instead_of_lines_per_job(tmp_path):
    r = _sweep(tmp_path, "s", "hydra/launcher=batched", "seed=range(20)", "epochs=300", "progress=true")
    out = r.stdout + r.stderr
    assert "run dir:" not in out and "#19 :" not in out  # no line per job
    assert "20 jobs: 20 completed" in out and "20 jobs" in out and "epoch/s" in out  # the summary, and tqdm's bar


def test_a_second_sweep_into_the_same_dir_is_refused_while_the_first_runs(tmp_path):
    sweep = ["-m", "hydra/launcher=batched", "seed=0,1", f"hydra.sweep.dir={tmp_path}/s"]
    first = subprocess.Popen(
        [sys.executable, "-m", "quadnet.train", *sweep, "epochs=1000000", "log_every=1000"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while not (tmp_path / "s" / "multirun.yaml").exists() and time.time() < deadline:
            time.sleep(0.1)  # Hydra has written its record: the sweep holds the dir
        r = run_cli(*sweep, "epochs=10", cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.startswith("error: another run or sweep is writing into"), r.stderr
        assert r.stderr.count("\n") == 1 and not (tmp_path / "s" / "0" / "summary.json").exists()
    finally:
        first.kill()
        first.wait()
    for job in ("0", "1"):  # (the killed sweep's checkpoints: its training would be resumed, not redone)
        shutil.rmtree(tmp_path / "s" / job, ignore_errors=True)
    _sweep(tmp_path, "s", *sweep[1:3], "epochs=10")  # the lock died with its process


@pytest.mark.skipif(not OPTUNA_BROKEN, reason="what quadnet says of hydra-optuna-sweeper < 1.4 under hydra-core 1.4")
def test_under_hydra_1_4_an_optuna_search_gets_one_honest_line(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    r = run_cli(
        "-m", "+hparams_search=optuna", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path}/s", cwd=tmp_path
    )
    assert r.returncode == 2 and "does not work with hydra-core 1.4" in r.stderr.splitlines()[-1]


def test_a_basic_sweep_into_a_dir_another_process_holds_is_refused_before_writing(tmp_path):
    from quadnet.rundir import lock

    lock(tmp_path / "s")  # this test's process holds it, as a running sweep would
    r = run_cli("-m", "seed=0,1", "epochs=5", f"hydra.sweep.dir={tmp_path}/s", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: another run or sweep is writing into"), r.stderr
    assert r.stderr.count("\n") == 1 and not list((tmp_path / "s").glob("*/summary.json"))


def test_a_signal_while_a_chunk_trains_leaves_the_chunk_composed_behind_it_unwritten(tmp_path):
    """The next chunk is composed while one trains; at a signal it is not reached: no dir of its jobs is written."""
    sweep = ["hydra/launcher=batched", "seed=range(12)", "hydra.launcher.max_batch=4", "epochs=1000000", "plots=false"]
    cmd = [sys.executable, "-m", "quadnet.train", "-m", *sweep, f"hydra.sweep.dir={tmp_path}/s"]
    p = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "s" / "0" / "checkpoint.npz").exists() and time.time() < deadline:
        time.sleep(0.05)  # the first chunk is training, and the second composed behind it
    p.send_signal(signal.SIGINT)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 130 and "12 jobs: 4 interrupted, 8 not reached" in out, out
    assert "12 jobs (4 new, 0 resumed from their checkpoints, 0 completed before, 0 refused)" in out, out
    assert sorted(int(d.name) for d in (tmp_path / "s").iterdir() if d.name.isdigit()) == [0, 1, 2, 3]
    assert {_summary(tmp_path, "s", n)["signal"] for n in range(4)} == {"SIGINT"}  # (as a single run's says)


def test_kill_9_of_a_whole_batched_sweep_then_the_same_command_finishes_every_job_as_a_straight_run(tmp_path):
    """SIGKILL of the process group once every job has a checkpoint: nothing is written at exit, and the
    same command again resumes each job from its checkpoint, equal to a sweep that was never stopped."""
    sweep = ["hydra/launcher=batched", "seed=range(4)", "epochs=100000", "checkpoint_every=1000", "plots=false"]
    cmd = [sys.executable, "-m", "quadnet.train", "-m", *sweep, f"hydra.sweep.dir={tmp_path}/s"]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.time() + 120
        while len(list((tmp_path / "s").glob("*/checkpoint.npz"))) < 4 and time.time() < deadline:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(list((tmp_path / "s").glob("*/checkpoint.npz"))) == 4
    assert not list((tmp_path / "s").glob("*/summary.json"))  # killed mid-training
    r = _sweep(tmp_path, "s", *sweep)
    assert "4 resumed from their checkpoints" in r.stdout + r.stderr
    _sweep(tmp_path, "straight", *sweep)
    for n in range(4):
        a, b = _summary(tmp_path, "s", n), _summary(tmp_path, "straight", n)
        assert a["status"] == b["status"] == "completed" and a["epoch"] == 100000
        np.testing.assert_allclose(_probs(a), _probs(b), rtol=0, atol=1e-12)


def test_a_sweep_that_a_failed_job_ends_has_its_closing_line_and_a_sweep_dir_in_the_way_is_one_line(tmp_path):
    for launcher in ("basic", "batched"):  # (Hydra raises the failed job's error once every job has run)
        where = tmp_path / launcher
        r = run_cli("-m", f"hydra/launcher={launcher}", "epochs=50", "hidden_dim=0,5", f"hydra.sweep.dir={where}",
                    cwd=tmp_path)  # fmt: skip
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: hidden_dim=0 is not allowed")
        assert f"2 jobs: 1 completed, 1 failed; report: python -m quadnet.report {where}" in r.stdout
        blocked = where / "multirun.yaml" / "s"
        r = run_cli("-m", f"hydra/launcher={launcher}", "seed=1,2", f"hydra.sweep.dir={blocked}", cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last == f"error: cannot write the sweep dir {blocked} (hydra.sweep.dir): Not a directory"
