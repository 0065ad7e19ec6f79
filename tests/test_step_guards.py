"""Issue 28, training side: one finiteness predicate decides whether an update is applied,
counted as skipped and checkpointable (item 8); a run that learned nothing usable ends with an
error (item 9); a step that cannot fit in memory is refused from its compiled estimate before
any data is read (item 11)."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfree_jax import config as config_lib
from mmfree_jax.checkpoint import loading
from mmfree_jax.checkpoint.manager import Checkpointer
from mmfree_jax.train import memory, optim, steps, trainer
from mmfree_jax.train import state as state_lib
from tests.train_configs import small_config


def _one_step(**optim_overrides):
  """One fp32 LM step of a tiny MatMul-free model: (state before, state after, metrics)."""
  cfg = config_lib.base_config()
  cfg.model.update(vocab_size=256, d_model=64, num_layers=2, num_heads=4)
  cfg.optim.update(warmup_steps=0, schedule="constant", **optim_overrides)
  model_cfg = config_lib.ModelConfig.from_config(cfg.model)
  tx = optim.make_optimizer(cfg.optim, 10)
  schedule = optim.learning_rate_schedule(cfg.optim, 10)
  step = jax.jit(
    steps.make_train_step(
      model_cfg, state_lib.model_graphdef(model_cfg), tx, schedule, z_loss=cfg.optim.z_loss
    )
  )
  state = jax.jit(lambda: state_lib.init_train_state(model_cfg, tx, 0))()
  rng = np.random.default_rng(0)
  batch = {
    "tokens": jnp.asarray(rng.integers(0, 256, (4, 17)), jnp.int32),
    "segment_ids": jnp.ones((4, 17), jnp.int32),
  }
  before = jax.device_get(state)
  after, metrics = step(state, batch)
  return before, jax.device_get(after), jax.device_get(metrics)


def _leaves_finite(tree):
  return all(
    np.all(np.isfinite(np.asarray(x)))
    for x in jax.tree.leaves(tree)
    if np.issubdtype(np.asarray(x).dtype, np.inexact)
  )


def _same(a, b):
  return all(
    np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


@pytest.mark.slow
@pytest.mark.parametrize(
  "overrides,applied",
  [
    ({"lr": 1e300}, False),  # fp32 lr inf: NaN/inf params
    ({"z_loss": 1e30}, True),  # grad norm inf, leaves finite: clipped to 0
    ({"z_loss": 1e30, "clip_norm": 0.0}, False),  # unclipped: g**2 overflows Adam's nu
  ],
  ids=["lr1e300", "zloss1e30", "zloss1e30_noclip"],
)
def test_one_predicate_decides_applied_skipped_and_state(overrides, applied):
  """The step's `finite` flag, the skip count and the state agree. Each case once disagreed:
  `finite` 1 with NaN params; a step logged as skipped (grad norm inf) whose update (weight
  decay) was applied; a skipped step that left inf moments."""
  before, after, m = _one_step(**overrides)
  assert bool(m["finite"] == 1.0) == applied, m
  assert _leaves_finite(after)  # checkpointable either way
  assert int(after.step) == 1 and bool(after.opt_state.last_finite) == applied
  if applied:
    assert m["skipped_steps"] == 0.0 and int(after.opt_state.total_notfinite) == 0
    assert not _same(after.params, before.params)
  else:  # nothing applied, bit for bit, and counted
    assert m["skipped_steps"] == 1.0 and int(after.opt_state.total_notfinite) == 1
    assert _same(after.params, before.params)
    assert _same(after.opt_state.inner_state, before.opt_state.inner_state)


@pytest.mark.slow
def test_a_finite_step_is_applied_and_counted_as_such():
  before, after, m = _one_step(lr=1e-3)
  assert m["finite"] == 1.0 and m["skipped_steps"] == 0.0
  assert not _same(after.params, before.params) and _leaves_finite(after)


def test_all_finite_is_the_predicate():
  assert bool(optim.all_finite({"a": jnp.ones(3), "n": jnp.arange(3), "none": None}))
  assert not bool(optim.all_finite((jnp.float32(jnp.inf), {"a": jnp.ones(3)})))
  assert not bool(optim.all_finite({"a": jnp.array([1.0, jnp.nan])}))


# ------------------------------------------------------------------------- run end (9)


def _nan_params_workdir(path, cfg):
  """A params-only checkpoint (as an import leaves it) whose embedding is NaN."""
  model_cfg = config_lib.ModelConfig.from_config(cfg.model)
  params = jax.jit(
    lambda: (
      state_lib.init_train_state(
        model_cfg, optim.make_optimizer(cfg.optim, cfg.train.steps), 0
      ).params
    )
  )()
  params = jax.device_get(params)
  params["embedding"] = np.full_like(params["embedding"], np.nan)
  checkpointer = Checkpointer(str(path))
  checkpointer.save_params(0, params, cfg.to_dict())
  checkpointer.close()
  loading.save_workdir_config(str(path), cfg)


@pytest.mark.slow
def test_run_whose_every_step_was_skipped_ends_with_an_error(tmp_path):
  cfg = small_config(**{"train.steps": 3, "train.eval_every": 3, "train.eval_batches": 1})
  _nan_params_workdir(tmp_path, cfg)
  with pytest.raises(
    trainer.NonFiniteLossError,
    match=r"every step of this run \(3 of 3\) was skipped.*last checkpoint is "
    r"step 0",
  ):
    trainer.train(cfg, str(tmp_path), progress=False)
  checkpointer = Checkpointer(str(tmp_path), read_only=True)
  assert checkpointer.all_steps() == [0]  # nothing non-finite was checkpointed
  checkpointer.close()
  assert not os.path.exists(tmp_path / ".lock")


def test_run_end_judges_the_last_validation_loss():
  trainer.check_run_end(3, [2], [{"step": 3, "loss": 2.5}], 3)  # one skip, finite: fine
  trainer.check_run_end(0, [], [], None)  # a resume with nothing left to do
  with pytest.raises(trainer.NonFiniteLossError, match="validation loss at step 3 is nan"):
    trainer.check_run_end(3, [], [{"step": 1, "loss": 2.0}, {"step": 3, "loss": math.nan}], 3)
  with pytest.raises(trainer.NonFiniteLossError, match=r"\(2 of 2\).*no checkpoint"):
    trainer.check_run_end(2, [1, 2], [], None)


# ---------------------------------------------------------------------------- memory (11)


@pytest.mark.slow
def test_a_step_that_cannot_fit_is_refused_from_its_compiled_estimate(tmp_path):
  """seq_len 10M on the tiny model: XLA's estimate is terabytes; refused in one line before
  the data pipeline or the state exist (no OOM, no metrics, no checkpoint)."""
  cfg = small_config(**{"data.seq_len": 10_000_000, "train.global_batch": 8})
  with pytest.raises(
    ValueError,
    match=r"the train step needs about [\d.]+ GiB per device .* "
    r"but available host memory.* is [\d.]+ GiB: lower "
    r"data.seq_len",
  ):
    trainer.train(cfg, str(tmp_path), progress=False)
  assert not os.path.exists(tmp_path / "metrics.jsonl")
  assert not os.path.exists(tmp_path / ".lock")


def test_memory_check_compares_the_estimate_with_the_limit():
  memory.check_fits(2**30, 2**31, "test memory")
  with pytest.raises(ValueError, match=r"needs about 3.0 MiB per device .* is 2.0 MiB"):
    memory.check_fits(3 * 2**20, 2 * 2**20, "test memory")
  memory.check_fits(2**40, None, "unknown")  # nothing to compare against: allowed
  with pytest.raises(
    ValueError,
    match=r"needs about 4.00 GiB per device .* test memory is "
    r"2.00 GiB",
  ):
    memory.check_fits(4 * 2**30, 2 * 2**30, "test memory")
  limit, source = memory.memory_limit()
  assert limit is not None and limit > 0 and "host memory" in source
