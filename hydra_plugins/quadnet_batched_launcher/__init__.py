"""quadnet's batched Hydra launcher: ``hydra/launcher=batched``.

How Hydra finds it: 1.4 loads the ``hydra.plugins`` entry point (pyproject.toml), 1.3 scans
the ``hydra_plugins`` namespace package; either imports ``config`` (through ``launcher``),
which stores the launcher's config. This package has no ``__init__`` in ``hydra_plugins``
itself: a namespace package must not hide other plugins.
"""
