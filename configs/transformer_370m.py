"""Paper size 370M, transformer (see mmfree_jax.config.paper_config for the recipe)."""

from mmfree_jax.config import paper_config


def get_config():
  cfg = paper_config("370m", "transformer")
  cfg.lock()
  return cfg
