"""Checkpoints: the orbax manager for training runs (`manager`) and read-only loading of a
workdir's model for eval, generation and export (`loading`)."""

from mmfree_jax.checkpoint.manager import Checkpointer, CheckpointError

__all__ = ["CheckpointError", "Checkpointer"]
