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

With a bucket workdir (`gs://…`) TensorBoard writes its event file to a local temporary folder
and uploads it to `WORKDIR/tensorboard` through `mmfree_jax.paths` on every `sync` (each
checkpoint, and every `MetricsWriter.upload_every_s`) and at close: one path layer and one set
of credentials for every backend, where tensorboardX's own bucket writers would need
google-cloud-storage or boto3 with its own `S3_ENDPOINT` variable. wandb keeps its local files
in the system's temporary folder then (its run id still goes to the workdir); mlflow needs
`MLFLOW_TRACKING_URI`.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from mmfree_jax import paths


class Tracker:
  """The interface: scalar rows in, nothing back."""

  def log(self, step: int, scalars: dict[str, float]) -> None:
    raise NotImplementedError

  def sync(self) -> None:
    """Makes what was logged so far durable in the workdir (a no-op for most trackers)."""

  def close(self) -> None:
    pass


class TensorBoardTracker(Tracker):
  def __init__(self, workdir: str):
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel  # optional

    self._dest = paths.join(workdir, "tensorboard")
    self._local = tempfile.mkdtemp(prefix="mmfree-tb-") if paths.is_remote(workdir) else None
    self._writer = SummaryWriter(self._local or self._dest)

  def log(self, step, scalars):
    for k, v in scalars.items():
      self._writer.add_scalar(k, float(v), int(step))

  def sync(self):
    if self._local is not None:
      self._writer.flush()
      paths.upload_tree(self._local, self._dest)

  def close(self):
    self._writer.close()
    if self._local is not None:
      try:
        paths.upload_tree(self._local, self._dest)
      finally:
        shutil.rmtree(self._local, ignore_errors=True)
        self._local = None


class WandbTracker(Tracker):
  def __init__(self, workdir: str, config: dict):
    import wandb  # pylint: disable=import-outside-toplevel  # optional install

    id_path = paths.join(workdir, "wandb_run_id")
    saved = paths.read_fresh(id_path)
    run_id = saved.decode().strip() if saved else wandb.util.generate_id()
    paths.write_atomic(id_path, run_id)
    self._run = wandb.init(
      project=os.environ.get("WANDB_PROJECT", "mmfree_jax"),
      dir=tempfile.gettempdir() if paths.is_remote(workdir) else workdir,
      id=run_id,
      resume="allow",
      config=config,
      name=paths.basename(paths.absolute(workdir)),
    )

  def log(self, step, scalars):
    self._run.log({k: float(v) for k, v in scalars.items()}, step=int(step))

  def close(self):
    self._run.finish()


class MlflowTracker(Tracker):
  def __init__(self, workdir: str, config: dict):
    import mlflow  # pylint: disable=import-outside-toplevel  # optional install

    self._mlflow = mlflow
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri and paths.is_remote(workdir):
      raise ValueError(
        f"train.tracker=mlflow with the bucket workdir {workdir!r}: mlflow's file store is "
        "local; set MLFLOW_TRACKING_URI to a tracking server (or a local file: URI)"
      )
    uri = uri or "file:" + paths.join(paths.absolute(workdir), "mlruns")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("mmfree_jax")
    self._run = mlflow.start_run(run_name=paths.basename(paths.absolute(workdir)))
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
