"""Hydra's own launcher conformance suites, run against quadnet's ``hydra/launcher=batched``.

``LauncherTestSuite`` and ``IntegrationTestSuite`` are what every Hydra launcher plugin
(joblib, submitit, …) runs in its own tests. Their apps ship inside hydra-core
(``hydra.test_utils.a_module`` and ``hydra/test_utils/configs/``; the integration suite
writes its task file into tmpdir), so nothing needs vendoring. Hydra's own ``basic``
launcher runs the same suites as a control: a failure on ``batched`` alone is the batched
launcher's, one on both is the environment's.

The tasks here are not quadnet's: the batched launcher must run any task function through
Hydra's ``run_job``, as the basic launcher does, and batch only quadnet's own jobs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import hydra
import pytest
from hydra.core.plugins import Plugins
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite

LAUNCHERS = ["basic", "batched"]
# Hydra 1.3's suite checks each job's log and .hydra/ in the job's working dir, which holds
# them only when the job changes into its output dir: what an app without version_base gets.
# Earlier tests in this process set version_base=1.3 (no chdir) for good, so ask for it.
SUITE_OVERRIDES = ["hydra.job.chdir=true"] if hydra.__version__.startswith("1.3") else []
QUIET = ["hydra/hydra_logging=disabled", "hydra/job_logging=disabled"]


@pytest.fixture(scope="module", autouse=True)
def plugins_scanned() -> None:
    """Scan Hydra's plugins before the first test snapshots Hydra's singletons.

    The suites restore the singletons after each test (``hydra_restore_singletons``). Hydra 1.4
    imports plugin modules once, so the configs they store on import (hydra/sweeper/basic,
    hydra/launcher/batched, …) must already be in the first snapshot, or every later test
    fails with "Could not find 'hydra/sweeper/basic'". (Hydra 1.3 re-ran the modules on each
    scan. Hydra's own plugin tests get the scan from a test_discovery that runs first.)
    """
    Plugins.instance()


def test_batched_launcher_is_discovered_from_any_directory(tmp_path: Path) -> None:
    """A fresh interpreter in a foreign dir, quadnet not imported: Hydra must find the plugin
    (1.4: the ``hydra.plugins`` entry point; 1.3: the ``hydra_plugins`` namespace scan),
    without a warning about an editable install it cannot list."""
    probe = (
        "import warnings; warnings.simplefilter('always')\n"
        "from hydra.core.plugins import Plugins\n"
        "from hydra.plugins.launcher import Launcher\n"
        "names = [f'{c.__module__}.{c.__name__}' for c in Plugins.instance().discover(Launcher)]\n"
        "print('\\n'.join(names))\n"
        "import sys; print('quadnet imported:', 'quadnet' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "hydra_plugins.quadnet_batched_launcher.launcher.BatchedLauncher" in lines, r.stdout
    assert "quadnet imported: False" in lines  # discovery must not pull in quadnet (or torch)
    assert "could not discover plugins" not in r.stderr, r.stderr


@pytest.mark.parametrize("launcher_name, overrides", [pytest.param(n, SUITE_OVERRIDES, id=n) for n in LAUNCHERS])
class TestLauncherSuite(LauncherTestSuite):
    """Hydra's LauncherTestSuite: 9 in-process sweeps over Hydra's test app."""


@pytest.mark.parametrize(
    "task_launcher_cfg, extra_flags",
    [pytest.param({}, ["-m", *QUIET, f"hydra/launcher={n}"], id=n) for n in LAUNCHERS],
)
class TestIntegrationSuite(IntegrationTestSuite):
    """Hydra's IntegrationTestSuite: 11 apps written to tmpdir and run as subprocesses."""
