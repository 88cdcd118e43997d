"""Config composition and validation: every bad value is one line, exit 2, no traceback."""

from __future__ import annotations

import os
import sys

import pytest

from conftest import make_cfg, run_cli
from quadnet import config
from quadnet.config import ConfigError, DataConfig, TrainConfig, compose, config_dir, to_dict, validate, version_base
from quadnet.train import main, run, train

BAD = [
    # (override, words the one-line message must contain)
    ("hidden_dim=abc", ["hidden_dim", "'abc'", "integer"]),
    ("hidden_dim=0", ["hidden_dim=0", ">= 1"]),
    ("hidden_dim=2.5", ["hidden_dim", "integer"]),
    ("lr=0", ["lr=0", "> 0"]),
    ("lr=-1", ["lr=-1", "> 0"]),
    ("lr=inf", ["lr=inf", "finite"]),
    ("lr=nan", ["lr=nan", "finite"]),
    ("reg=-0.1", ["reg=-0.1", ">= 0"]),
    ("reg=nan", ["reg=nan", "finite"]),
    ("epochs=-1", ["epochs=-1", ">= 0"]),
    ("epochs=1.5", ["epochs", "integer"]),
    ("seed=-3", ["seed=-3", ">= 0"]),
    ("seed=x", ["seed", "integer"]),
    ("momentum=1.0", ["momentum=1.0", "[0, 1)"]),
    ("log_every=-1", ["log_every=-1", ">= 0"]),
    ("device=tpu", ["device='tpu'", "auto, cpu, cuda, cuda:N or mps"]),
    ("dtype=float16", ["dtype='float16'", "float32, float64"]),
    ("engine=jax", ["engine='jax'", "auto, numba, torch, numpy"]),
    ("init=xavier", ["init='xavier'", "normal, torch"]),
    ("step=magic", ["step='magic'", "fused, autograd"]),
    ("logger=wandb", ["logger='wandb'", "none, tensorboard, mlflow"]),
    ("objective=acc", ["objective='acc'", "test_loss"]),
    ("data=foo", ["data='foo'", "csv, sampled, seed"]),
    ("data=null", ["data"]),
    ("seed=4294967296", ["seed=4294967296", "<= 4294967295"]),
    ("hidden_dim=999999999999", ["hidden_dim=999999999999", "<= 1000000"]),
    ("seed=" + "9" * 3000, ["seed=999", "..."]),
    ("optimizer=rmsprop", ["optimizer='rmsprop'", "sgd, adam"]),
    ("lr=1e31", ["lr=1e+31", "<= 1e+30"]),
    ("data.path=x.csv", ["data.path does not apply to data=seed", "data=csv"]),
    ("data.n_train=5", ["data.n_train does not apply to data=seed", "data=sampled"]),
    ("+data.colour=red", ["unknown config key 'data.colour'"]),
    ("lr=${oops}", ["oops"]),
    ("data=csv", ["data.path"]),
    ("data=csv data.path=/no/such.csv", ["/no/such.csv", "cannot be read"]),
    ("progress=maybe", ["progress", "true or false"]),
    ("foo=1", ["unknown config key 'foo'", "hidden_dim"]),
    ("+foo=1", ["unknown config key 'foo'"]),
    ("data.colour=red", ["unknown config key 'data.colour'"]),
    ("hydra.nope=1", ["unknown config key 'hydra.nope'", "+hydra.nope=…"]),
    ("data.n_train=0 data=sampled", ["data.n_train=0", ">= 1"]),
    ("data.margin=5 data=sampled", ["data.margin=5", "data.extent"]),
    ("data=csv data.path=x.csv data.seed=-3", ["data.seed=-3", ">= 0"]),  # (data.seed splits a csv file)
    ("resume=/no/such/run", ["'/no/such/run' does not exist"]),
    ("hidden_dim=", ["hidden_dim"]),
    ("data=csv data.path='~nouser_q/p.csv'", ["no home dir is known for that user"]),
    ("~epochs", ["'epochs' has no value (deleted with ~epochs?)"]),
    ("hiden_dim=5", ["unknown config key 'hiden_dim'; did you mean hidden_dim?"]),
    ("Lr=0.1", ["unknown config key 'Lr'; did you mean lr?"]),
    ("lr=0.1,0.01", ["Ambiguous value", "add -m (--multirun)"]),
    ("-m hydra.launcher=batched", ["hydra/launcher=… (a slash)"]),
    ("hydra/launcher=batched hydra.launcher.max_bach=4", ["did you mean max_batch?", "max_batch, job_dirs, executor"]),
    ("--bogus", ["unrecognized arguments: --bogus", "--hydra-help"]),
    ("--cfg nope", ["--cfg", "invalid choice: 'nope'"]),
]


@pytest.mark.parametrize("override,words", BAD, ids=[b[0] for b in BAD])
def test_bad_value_is_one_line_exit_2(override, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys,
        "argv",
        ["quadnet.train", *override.split(), "epochs=0", f"hydra.run.dir={tmp_path}/run"]
        if "epochs" not in override
        else ["quadnet.train", *override.split(), f"hydra.run.dir={tmp_path}/run"],
    )
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "run").exists()  # a refused run leaves no dir behind
    assert not (tmp_path / "run" / "summary.json").exists()


def test_the_tensorboard_logger_without_tensorboard_is_refused_before_training(monkeypatch, tmp_path):
    import importlib.util

    cfg = TrainConfig(logger="tensorboard", epochs=5)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)  # as without the extra
    validate(cfg)  # (a checkpoint's config: its model can still predict)
    with pytest.raises(ConfigError, match=r"logger=tensorboard needs tensorboard: pip install tensorboard \(quadnet's"):
        train(cfg, run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_hydra_flags_are_parsed_as_hydra_parses_them(tmp_path):
    """Hydra 1.4 takes -m among the overrides; 1.3 refuses it there (in one line)."""
    r = run_cli("epochs=1", "-m", "seed=1,2", "plots=false", f"hydra.sweep.dir={tmp_path}/s", cwd=tmp_path)
    if version_base():
        assert r.returncode == 2 and r.stderr.startswith("error: unrecognized arguments: seed=1,2")
        assert "(Hydra 1.3 takes its flags, such as -m, before the overrides)" in r.stderr
    else:
        assert r.returncode == 0 and len(list((tmp_path / "s").glob("*/summary.json"))) == 2, r.stderr


def test_bad_values_from_the_real_cli_have_no_traceback(tmp_path):
    for args in (["lr=-1"], ["nope=1"], ["hidden_dim=abc"], ["data=nope"]):
        r = run_cli(*args, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr + r.stdout
        assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ")


def test_out_of_memory_is_one_line_and_leaves_no_dir(tmp_path):
    r = run_cli("hidden_dim=1000000", "data=sampled", "data.n_train=10000000", "epochs=1", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: out of memory") and r.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # (nor outputs/, made for it)


def test_a_refused_run_removes_only_the_dirs_it_made(tmp_path):
    (tmp_path / "outputs").mkdir()  # the user's, empty
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    oom = ["hidden_dim=1000000", "data=sampled", "data.n_train=10000000", "epochs=1"]
    for where in ([], ["hydra.run.dir=mine"], ["hydra.run.dir=new/a/b"]):
        assert run_cli(*oom, *where, cwd=tmp_path).returncode == 2
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["mine", "mine/notes.txt", "outputs"]


def test_a_run_dir_hydra_cannot_write_is_one_line_and_leaves_no_dir(tmp_path):
    (tmp_path / "a file").write_text("mine")
    for where, why in (("a file/run", "Not a directory"), ("a file", "File exists")):
        r = run_cli(f"hydra.run.dir='{where}'", cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith(f"error: cannot write the run dir {where} (hydra.run.dir): {why}"), r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["a file"] and (tmp_path / "a file").read_text() == "mine"


def test_a_refused_run_into_an_existing_dir_removes_nothing_of_it(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    r = run_cli("lr=-1", "hydra.run.dir=.", cwd=tmp_path)
    assert r.returncode == 2 and (tmp_path / "notes.txt").read_text() == "mine"


def test_a_run_never_writes_over_files_another_program_left_under_a_runs_names(tmp_path):
    (tmp_path / "metrics.csv").write_text("mine")
    r = run_cli("epochs=5", "hydra.run.dir=.", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.endswith(
        "holds metrics.csv, which the run would write over: choose another dir\n"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"] and (tmp_path / "metrics.csv").read_text() == "mine"
    # a sweep's job dir, whether its job is good or bad: the file as it was (basic: Hydra's .hydra/ and log beside it)
    for launcher, values in [(la, v) for la in ("basic", "batched") for v in ("seed=1,2", "lr=0.1,-1")]:
        (job := tmp_path / f"{launcher}{values[:2]}" / "1").mkdir(parents=True)
        (job / "summary.json").write_text('{"mine": 1, "versions": "quadnet-like"}')
        r = run_cli(
            "-m", f"hydra/launcher={launcher}", "epochs=5", values, f"hydra.sweep.dir={job.parent}", cwd=tmp_path
        )
        assert r.returncode == 2 and (job / "summary.json").read_text() == '{"mine": 1, "versions": "quadnet-like"}', r
        assert launcher == "basic" or [p.name for p in job.iterdir()] == ["summary.json"], (values, r.stderr)
    (tmp_path / "f").mkdir()
    os.mkfifo(tmp_path / "f" / "summary.json")  # (never read: a read would wait for a writer)
    r = run_cli("epochs=5", "hydra.run.dir=f", cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and r.stderr.endswith(
        "holds summary.json, which the run would write over: choose another dir\n"
    )
    # a dir whose summary.json is quadnet's is a run's (its checkpoint deleted, a failed job's note): trained into
    (tmp_path / "metrics.csv").unlink()
    run_cli("epochs=5", "plots=false", "hydra.run.dir=r", cwd=tmp_path)
    (tmp_path / "r" / "checkpoint.npz").unlink()
    assert run_cli("epochs=5", "plots=false", "hydra.run.dir=r", cwd=tmp_path).returncode == 0
    with pytest.raises(ConfigError, match="the run dir is empty"):  # (not the dir Python runs in)
        run(epochs=5, run_dir="")


def test_validate_rejects_wrong_types_given_in_process():
    with pytest.raises(ConfigError, match="hidden_dim='5x' is not allowed: must be an integer"):
        validate({"hidden_dim": "5x"})
    with pytest.raises(ConfigError, match="plots='maybe' is not allowed: must be true or false"):
        validate({"plots": "maybe"})
    with pytest.raises(ConfigError, match=r"data\.features='x' is not allowed: must be a list: \[a,b\]"):
        validate({"data": {"name": "csv", "features": "x"}})
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.x'"):
        validate({"data": {"x": 1}})


def test_defaults_are_the_seed_programs():
    c = make_cfg()
    assert (c.hidden_dim, c.reg, c.lr, c.epochs, c.seed) == (50, 0.001, 0.001, 10000, 1)
    assert (c.init, c.dtype, c.engine, c.data.name) == ("normal", "float64", "auto", "seed")
    assert validate(TrainConfig()) == c.__class__(**{**c.__dict__, "progress": None, "plots": True})


def test_composition_of_groups_and_overrides():
    c = validate(compose(["data=sampled", "data.n_train=10", "hidden_dim=7", "lr=0.5", "momentum=0.9"]))
    assert c.data.name == "sampled" and c.data.n_train == 10 and c.data.margin == 0.1
    assert (c.hidden_dim, c.lr, c.momentum) == (7, 0.5, 0.9)


def test_config_dir_is_the_checkout_folder():
    from pathlib import Path

    assert Path(config_dir()) == Path(__file__).resolve().parent.parent / "quadnet" / "configs"


@pytest.mark.parametrize(
    "overrides",
    [
        ["seed=3"],
        ["lr=${reg}", "data=sampled", "data.seed=${seed}"],
        ["resume=null", "progress=true", "objective=test_error"],
    ],
)
def test_reading_values_off_the_nodes_equals_resolving_them(overrides):
    """validate reads each value through OmegaConf (cheap); the result equals a full resolution."""
    from omegaconf import OmegaConf

    cfg = compose(overrides)
    assert validate(cfg) == OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.to_container(cfg, resolve=True))
    )


def test_a_mapping_of_the_schemas_types_is_typed_as_omegaconf_types_it(monkeypatch):
    """validate's fast path (a checkpoint's config as quadnet wrote it) gives what OmegaConf's merge gives, and
    leaves to OmegaConf what it would convert or refuse."""
    csv = TrainConfig(optimizer="adam", hidden_dim=7, data=DataConfig(name="csv", path="t.csv", label="y"))
    sampled = {"lr": 0.5, "data": {"name": "sampled", "n_train": 64}}
    mappings = [to_dict(TrainConfig()), to_dict(csv), sampled, {"epochs": 9, "hydra": {}}]
    assert config._typed(mappings[0]) == TrainConfig() and all(config._typed(m) is not None for m in mappings)
    for odd in ({"lr": 1}, {"seed": True}, {"data": {"path": "${x}"}}, {"resume": "???"}, {"no": 1}, {"data": "x"}):
        assert config._typed(odd) is None, odd
    fast = [validate(m) for m in mappings]
    monkeypatch.setattr(config, "_typed", lambda plain: None)
    assert fast == [validate(m) for m in mappings]
