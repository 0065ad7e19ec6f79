"""Model and train-step setups shared by the benchmarks (the library's own step and optimizer)."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmfree_jax import config as config_lib
from mmfree_jax.train import optim, steps
from mmfree_jax.train import state as state_lib


def model_config(
  kind: str, d_model: int, num_layers: int, vocab_size: int, **overrides
) -> config_lib.ModelConfig:
  """A `ModelConfig` at the given size; heads of 64 dims for the Transformer++."""
  cfg = config_lib.base_config()
  cfg.model.update(
    kind=kind,
    d_model=d_model,
    num_layers=num_layers,
    vocab_size=vocab_size,
    num_heads=max(1, d_model // 64),
    **overrides,
  )
  return config_lib.ModelConfig.from_config(cfg.model)


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {
    "tokens": jnp.asarray(rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)),
    "segment_ids": jnp.ones((batch, seq + 1), jnp.int32),
  }


def abstract_batch(batch: int, seq: int) -> dict:
  s = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
  return {"tokens": s, "segment_ids": s}


@dataclasses.dataclass
class TrainSetup:
  cfg: config_lib.ModelConfig
  step: object  # the jitted train step (state donated)
  tx: object

  def abstract_state(self):
    return jax.eval_shape(lambda: state_lib.init_train_state(self.cfg, self.tx, 0))

  def init_state(self):
    return state_lib.init_train_state(self.cfg, self.tx, 0)


def train_setup(cfg: config_lib.ModelConfig) -> TrainSetup:
  """The library's train step (AdamW, clipping, skip-non-finite) jitted with donated state."""
  optim_cfg = config_lib.base_config().optim
  optim_cfg.update(warmup_steps=0, schedule="constant")
  tx = optim.make_optimizer(optim_cfg, 1000)
  schedule = optim.learning_rate_schedule(optim_cfg, 1000)
  step = jax.jit(
    steps.make_train_step(cfg, state_lib.model_graphdef(cfg), tx, schedule), donate_argnums=0
  )
  return TrainSetup(cfg, step, tx)


def compile_step(setup: TrainSetup, batch: int, seq: int):
  """AOT-compiles the step for abstract inputs; returns (compiled, lower_s, compile_s)."""
  t0 = time.perf_counter()
  lowered = setup.step.lower(setup.abstract_state(), abstract_batch(batch, seq))
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return compiled, t1 - t0, t2 - t1


class StepRunner:
  """Holds a live train state and runs the compiled step on a fixed batch (donating state)."""

  def __init__(self, setup: TrainSetup, compiled, batch: dict):
    self.compiled = compiled
    self.state = setup.init_state()
    self.batch = batch

  def __call__(self):
    self.state, metrics = self.compiled(self.state, self.batch)
    return metrics
