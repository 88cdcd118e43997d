"""quadnet's batched Hydra launcher: ``hydra/launcher=batched``."""
