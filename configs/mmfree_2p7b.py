"""Paper size 2.7B, mmfree (see mmfree_jax.config.paper_config for the recipe)."""

from mmfree_jax.config import paper_config


def get_config():
  cfg = paper_config("2.7b", "mmfree")
  cfg.lock()
  return cfg
