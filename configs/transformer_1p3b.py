"""Paper size 1.3B, transformer (see mmfree_jax.config.paper_config for the recipe)."""

from mmfree_jax.config import paper_config


def get_config():
  cfg = paper_config("1.3b", "transformer")
  cfg.lock()
  return cfg
