"""The schema's defaults (`mmfree_jax.config.base_config`).

eval.py parses its `--config.a.b=v` overrides against this file when no `--config` is given,
then applies them to the workdir's own config.json (e.g. `--config.mesh.shape.context=4`).
"""

from mmfree_jax.config import base_config


def get_config():
  cfg = base_config()
  cfg.lock()
  return cfg
