"""quadnet: the textbook two-layer network that tells which quadrant a point lies in.

From Python, with the command line's keys::

    summary = quadnet.run(hidden_dim=10, epochs=2000)      # trains, writes a run dir
    model = quadnet.load(summary["run_dir"])               # or a checkpoint file
    model.predict([[2, 2], [-1, 3]])                       # quadrants 1-4
    model.predict_proba([[2, 2]])                          # shape (1, 4)
"""

import importlib
import sys
from typing import Any

# `python -m quadnet.<command>` being located, or a console script (quadnet-train) importing its command:
# a signal from now on ends it in one line, while torch and Hydra import too
if sys.argv[:1] == ["-m"] or sys.argv[0].rpartition("/")[2].startswith("quadnet-"):
    from quadnet import exits

    exits.install()

__version__ = "0.6.1"
__all__ = ["Model", "load", "run"]
_HOMES = {"Model": "quadnet.predict", "load": "quadnet.predict", "run": "quadnet.train"}


def __getattr__(name: str) -> Any:  # lazy: `import quadnet` imports neither torch nor Hydra
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'quadnet' has no attribute {name!r}")
