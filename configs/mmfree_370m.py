"""Paper size 370M, mmfree (see mmfree_jax.config.paper_config for the recipe)."""

from mmfree_jax.config import paper_config


def get_config():
  cfg = paper_config("370m", "mmfree")
  cfg.lock()
  return cfg
