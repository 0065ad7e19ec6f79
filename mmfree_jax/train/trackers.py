"""Optional experiment trackers behind `train.tracker`: none | tensorboard | wandb | mlflow.

`metrics.jsonl` is always written (`metrics.MetricsWriter`); a tracker receives the same
scalar rows. TensorBoard (tensorboardX, in requirements.txt) writes `WORKDIR/tensorboard`;
wandb and mlflow are optional installs (`pip install wandb` / `pip install mlflow`), imported
only when chosen:

  wandb:  project `mmfree_jax`, files under WORKDIR; `WANDB_MODE=offline` runs without a
          network (`wandb sync` uploads later). A resumed run continues the same wandb run
          (its id is kept in WORKDIR/wandb_run_id).
  mlflow: tracking URI from `MLFLOW_TRACKING_URI`, else `file:WORKDIR/mlruns` (local files);
          the config is logged as params.
"""

from __future__ import annotations

import os


class Tracker:
  """The interface: scalar rows in, nothing back."""

  def log(self, step: int, scalars: dict[str, float]) -> None:
    raise NotImplementedError

  def close(self) -> None:
    pass


class TensorBoardTracker(Tracker):
  def __init__(self, workdir: str):
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel  # optional

    self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def log(self, step, scalars):
    for k, v in scalars.items():
      self._writer.add_scalar(k, float(v), int(step))

  def close(self):
    self._writer.close()


class WandbTracker(Tracker):
  def __init__(self, workdir: str, config: dict):
    import wandb  # pylint: disable=import-outside-toplevel  # optional install

    id_path = os.path.join(workdir, "wandb_run_id")
    run_id = open(id_path).read().strip() if os.path.exists(id_path) else wandb.util.generate_id()
    with open(id_path, "w") as f:
      f.write(run_id)
    self._run = wandb.init(
      project=os.environ.get("WANDB_PROJECT", "mmfree_jax"),
      dir=workdir,
      id=run_id,
      resume="allow",
      config=config,
      name=os.path.basename(os.path.abspath(workdir)),
    )

  def log(self, step, scalars):
    self._run.log({k: float(v) for k, v in scalars.items()}, step=int(step))

  def close(self):
    self._run.finish()


class MlflowTracker(Tracker):
  def __init__(self, workdir: str, config: dict):
    import mlflow  # pylint: disable=import-outside-toplevel  # optional install

    self._mlflow = mlflow
    uri = os.environ.get("MLFLOW_TRACKING_URI") or "file:" + os.path.join(
      os.path.abspath(workdir), "mlruns"
    )
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("mmfree_jax")
    self._run = mlflow.start_run(run_name=os.path.basename(os.path.abspath(workdir)))
    mlflow.log_params({k: str(v)[:250] for k, v in _flat(config).items()})

  def log(self, step, scalars):
    self._mlflow.log_metrics({k: float(v) for k, v in scalars.items()}, step=int(step))

  def close(self):
    self._mlflow.end_run()


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


_INSTALL = {"tensorboard": "tensorboardX", "wandb": "wandb", "mlflow": "mlflow"}


def make_tracker(name: str, workdir: str, config: dict) -> Tracker | None:
  """The tracker `train.tracker` names (None for 'none'); a missing package is a clear error."""
  if name == "none":
    return None
  try:
    if name == "tensorboard":
      return TensorBoardTracker(workdir)
    if name == "wandb":
      return WandbTracker(workdir, config)
    if name == "mlflow":
      return MlflowTracker(workdir, config)
  except ImportError as e:
    raise ImportError(
      f"train.tracker={name!r} needs `pip install {_INSTALL[name]}` ({e}); or "
      "pick another with --config.train.tracker=none|tensorboard|wandb|mlflow"
    ) from e
  raise ValueError(f"unknown train.tracker {name!r}; choose none, tensorboard, wandb or mlflow")
