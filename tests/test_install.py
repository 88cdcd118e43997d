"""A regular (non-editable) install from a built wheel finds its configs and plugins anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_wheel_install_runs_from_any_directory(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheel = next(dist.glob("quadnet-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for cfg in (
        "train.yaml",
        "data/seed.yaml",
        "data/sampled.yaml",
        "experiment/epochs_study.yaml",
        "hparams_search/optuna.yaml",
        "hydra/launcher/slurm.yaml",
    ):
        assert f"quadnet/configs/{cfg}" in names, cfg
    assert "hydra_plugins/quadnet_batched_launcher/launcher.py" in names
    assert "hydra_plugins/__init__.py" not in names  # a namespace package: it must not hide others
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = subprocess.run(
        [sys.executable, "-c", "import quadnet.config as c, quadnet; print(quadnet.__file__); print(c.config_dir())"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert probe[0].startswith(str(site)) and probe[1] == str(site / "quadnet" / "configs")
    r = subprocess.run(
        [sys.executable, "-m", "quadnet.train", "epochs=100", "data=sampled", "data.n_train=16"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert (next((elsewhere / "outputs").iterdir()) / "summary.json").is_file()
    r = subprocess.run(
        [sys.executable, "-m", "quadnet.train", "-m", "hydra/launcher=batched", "hidden_dim=2,3", "epochs=10"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert len(list((elsewhere / "outputs" / "multirun").glob("*/1/summary.json"))) == 1


def test_the_package_is_found_from_the_dir_that_holds_a_clone_named_quadnet(tmp_path):
    """From the folder that holds the checkout (itself named quadnet), `import quadnet` is the package,
    not a namespace package made of the checkout's folder."""
    (tmp_path / "quadnet").symlink_to(ROOT)
    code = "import quadnet; print(quadnet.__file__, callable(quadnet.run))"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == [str(ROOT / "quadnet" / "__init__.py"), "True"], r.stderr


def test_a_checkout_on_pythonpath_that_is_not_installed_still_writes_its_run(monkeypatch, tmp_path):
    """As on a GPU machine with the repo on PYTHONPATH: no quadnet metadata, so its version is unknown."""
    from importlib import metadata

    from quadnet import artifacts

    real = metadata.version

    def version(name: str) -> str:
        if name == "quadnet":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", version)
    artifacts.versions.cache_clear()
    try:
        found = artifacts.versions()
    finally:
        artifacts.versions.cache_clear()
    assert found["quadnet"] is None and found["torch"] == real("torch")
