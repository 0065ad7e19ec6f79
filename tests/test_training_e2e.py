"""End-to-end training: loss goes down, exact resume, two processes == one, early errors."""

import json
import os
import random
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest

from mmfree_jax.checkpoint import manager as ckpt_lib
from mmfree_jax.parallel import distributed
from mmfree_jax.train.trainer import train
from tests.train_configs import small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "_train_worker.py")


@pytest.mark.slow
def test_tiny_loss_goes_down(tmp_path):
  cfg = small_config(
    **{
      "train.steps": 60,
      "train.global_batch": 8,
      "optim.warmup_steps": 5,
      "train.eval_every": 60,
      "train.eval_batches": 2,
    }
  )
  result = train(cfg, str(tmp_path), progress=False)
  losses = [r["loss"] for r in result.history]
  assert len(losses) == 60
  # ln(320) = 5.77 at init; byte-level KJV drops well below 3.5 nats in 60 steps of lr 3e-3.
  assert np.mean(losses[:3]) > 5.0
  assert np.mean(losses[-5:]) < 3.5, losses[-5:]
  assert result.eval_history and np.isfinite(result.eval_history[-1]["loss"])
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(rows[0])


def check_resume_is_exact(run, full, stop_after: int) -> None:
  """`run(stop_after_steps=stop_after)` then `run()` on one workdir (a run stopped as if
  preempted, then resumed from its checkpoint) end like the unbroken run `full` (a
  `TrainResult`): the same per-step losses and bitwise-equal params (same data order, same
  arithmetic)."""
  first = run(stop_after_steps=stop_after)
  assert first.interrupted and int(first.state.step) == stop_after
  second = run()
  assert int(second.state.step) == int(full.state.step) and not second.interrupted
  assert [r["loss"] for r in first.history + second.history] == [r["loss"] for r in full.history]
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(second.state.params),
    jax.device_get(full.state.params),
  )


@pytest.mark.slow
def test_interrupt_and_resume_is_exact(tmp_path):
  overrides = {"train.steps": 8, "train.global_batch": 8, "train.checkpoint_every": 3}
  full = train(small_config(**overrides), str(tmp_path / "full"), progress=False)
  assert int(full.state.step) == 8
  check_resume_is_exact(
    lambda **kw: train(small_config(**overrides), str(tmp_path / "split"), progress=False, **kw),
    full,
    stop_after=4,
  )


@pytest.mark.slow
def test_checkpoint_of_other_architecture_is_refused(tmp_path):
  train(small_config(**{"train.steps": 1, "train.global_batch": 8}), str(tmp_path), progress=False)
  with pytest.raises(ckpt_lib.CheckpointError, match="d_model"):
    train(
      small_config(**{"train.steps": 2, "train.global_batch": 8, "model.d_model": 32}),
      str(tmp_path),
      progress=False,
    )


@pytest.mark.parametrize(
  "overrides,match",
  [
    ({"train.global_batch": 12}, "data shards"),
    ({"train.global_batch": 8, "train.microbatches": 3}, "microbatches"),
    ({"mesh.shape": {"data": 3, "fsdp": 1, "tensor": 1}}, "mesh"),
    ({"data.source": "text", "data.paths": "/nonexistent/corpus.txt"}, "nonexistent"),
    ({"model.scan_type": "chunked", "model.chunk_size": 5}, "chunk_size"),
  ],
)
def test_bad_config_fails_before_compute(tmp_path, overrides, match):
  with pytest.raises(ValueError, match=match):
    train(small_config(**overrides), str(tmp_path), progress=False)
  assert not os.path.exists(tmp_path / "checkpoints") or not os.listdir(tmp_path / "checkpoints")


def _run_worker(workdir, out, overrides, env_extra, stop_after=None):
  """`tests/_train_worker.py` in a new process; the distributed settings come from `env_extra`
  only (none inherited from a SLURM job or launcher the tests may run under)."""
  env = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("SLURM_", "MMFREE_COORDINATOR", "MMFREE_NUM_", "MMFREE_PROCESS"))
  }
  env.update(env_extra)
  cmd = [sys.executable, WORKER, str(workdir), str(out), json.dumps(overrides)]
  if stop_after is not None:
    cmd.append(str(stop_after))
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _slurm_job_id() -> int:
  """A job id whose coordinator port is free: JAX's SLURM detection listens on
  `SLURM_JOB_ID % 4096 + 61440` on the step's first node."""
  for _ in range(200):
    port = random.randint(61440, 65535)
    if portpicker.is_port_free(port):
      return 4096 * 1000 + port - 61440
  raise RuntimeError("no free port in 61440-65535 for the SLURM coordinator")


def _wait(procs):
  for p in procs:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_processes_match_one(tmp_path):
  """One process of two devices, two processes of one device with an explicit coordinator
  (`MMFREE_COORDINATOR`…), and the same two found by `dist.coordinator=auto` from the
  variables srun sets (launch/slurm.sbatch): losses to 1e-10 relative and params to 1e-8 of
  the one process; the SLURM-discovered pair equals the explicit one bitwise (the same
  program on the same devices)."""
  # f64 so that the cross-process all-reduce order cannot show up in Adam's first steps.
  overrides = {
    "train.steps": 4,
    "train.global_batch": 4,
    "model.dtype": "float64",
    "model.param_dtype": "float64",
  }
  base_env = {"JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu"}
  single = _run_worker(
    tmp_path / "single",
    tmp_path / "single",
    overrides,
    {**base_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
  )
  one_device = {**base_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  port = portpicker.pick_unused_port()
  procs = [
    _run_worker(
      tmp_path / "multi",
      tmp_path / "multi",
      overrides,
      {
        **one_device,
        "MMFREE_COORDINATOR": f"localhost:{port}",
        "MMFREE_NUM_PROCESSES": "2",
        "MMFREE_PROCESS_ID": str(i),
      },
    )
    for i in range(2)
  ]
  _wait([single] + procs)
  job = {
    "SLURM_JOB_ID": str(_slurm_job_id()),
    "SLURM_STEP_NODELIST": "127.0.0.1",
    "SLURM_STEP_NUM_NODES": "1",
    "SLURM_NTASKS": "2",
  }  # what srun sets, one node
  tasks = [{**job, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)} for i in range(2)]
  assert set(distributed.AUTO_ENV["slurm"]) <= set(tasks[0])
  auto = {**overrides, "dist.coordinator": "auto"}
  _wait(
    [_run_worker(tmp_path / "slurm", tmp_path / "slurm", auto, {**one_device, **t}) for t in tasks]
  )
  one = json.load(open(tmp_path / "single.json"))
  two = json.load(open(tmp_path / "multi.json"))
  slurm = json.load(open(tmp_path / "slurm.json"))
  assert one["process_count"] == 1 and two["process_count"] == slurm["process_count"] == 2
  assert one["final_step"] == two["final_step"] == slurm["final_step"] == 4
  np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-10)
  assert slurm["losses"] == two["losses"]
  p1, p2 = np.load(tmp_path / "single.npz"), np.load(tmp_path / "multi.npz")
  p3 = np.load(tmp_path / "slurm.npz")
  assert sorted(p1.files) == sorted(p2.files) == sorted(p3.files)
  for k in p1.files:
    np.testing.assert_allclose(p2[k], p1[k], atol=1e-8, err_msg=k)
    np.testing.assert_array_equal(p3[k], p2[k], err_msg=k)
