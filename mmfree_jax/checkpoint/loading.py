"""Load configs and trained (or imported) models from a workdir, for eval, notebooks, export."""

from __future__ import annotations

import dataclasses
import json

import jax
import ml_collections
from flax import nnx

from mmfree_jax import config as config_lib
from mmfree_jax import paths
from mmfree_jax.checkpoint import manager as ckpt_lib
from mmfree_jax.nn.model import abstract_model


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained (or imported) with, from `WORKDIR/config.json`."""
  path = paths.join(workdir, "config.json")
  if not paths.exists(path):
    raise FileNotFoundError(
      f"{path} not found: {workdir!r} is not a training or import workdir "
      "(train.py and `python -m mmfree_jax.hf import` write it)"
    )
  return config_lib.config_from_dict(json.loads(paths.read_text(path)))


def save_workdir_config(workdir: str, cfg: ml_collections.ConfigDict) -> None:
  paths.makedirs(workdir)
  paths.write_atomic(paths.join(workdir, "config.json"), cfg.to_json(indent=2))


def load_params(
  workdir: str, model_cfg: config_lib.ModelConfig, step: int | None = None, param_shardings=None
):
  """Restores the params of `step` (default: latest). Returns `(params dict, step)`."""
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise ckpt_lib.CheckpointError(
        f"no checkpoint in {checkpointer.directory}; train first (train.py --workdir "
        f"{workdir}) or import weights (python -m mmfree_jax.hf import)"
      )
    step = max(steps) if step is None else step
    if step not in steps:
      raise ckpt_lib.CheckpointError(
        f"no checkpoint step {step} in {checkpointer.directory}; available: {steps}"
      )
    ckpt_lib.check_compatible(
      checkpointer.read_config(step), dataclasses.asdict(model_cfg), checkpointer.directory
    )
    _, abstract = nnx.split(abstract_model(model_cfg))
    abstract = abstract.to_pure_dict()
    if param_shardings is None:
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      param_shardings = jax.tree.map(lambda _: device, abstract)
    abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, param_shardings
    )
    return checkpointer.restore_params(step, abstract), step
  finally:
    checkpointer.close()


def load_model(workdir: str, step: int | None = None, *, model_overrides: dict | None = None):
  """`(model, config, step)` from a workdir: its config.json and the checkpoint's params.

  model_overrides: non-architecture model keys to change for inference (e.g.
  `{"dtype": "bfloat16", "scan_type": "associative"}`).
  """
  cfg = load_workdir_config(workdir)
  if model_overrides:
    cfg.unlock()
    cfg.model.update(model_overrides)
    cfg.lock()
  model_cfg = config_lib.ModelConfig.from_config(cfg.model)
  params, step = load_params(workdir, model_cfg, step)
  graphdef, _ = nnx.split(abstract_model(model_cfg))
  return nnx.merge(graphdef, params), cfg, step
