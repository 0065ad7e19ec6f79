"""Sharded train step (8 fake CPU devices) vs 1 device; gradient accumulation vs big batch."""

import jax
import numpy as np
import pytest

from mmfree_jax import config as config_lib
from mmfree_jax.parallel import mesh as mesh_lib
from mmfree_jax.parallel import sharding
from mmfree_jax.train import optim, steps
from mmfree_jax.train import state as state_lib

RULES = sharding.normalize_rules(config_lib.base_config().mesh.axis_rules)


def _setup(kind="mmfree", lr=1e-2, microbatches=1, steps_total=10):
  cfg = config_lib.base_config()
  # float64: Adam's first steps divide tiny gradients by their own magnitude, so fp32 reduction
  # order differences would show up as ~1e-3 parameter differences; in f64 they vanish.
  cfg.model.update(
    kind=kind,
    vocab_size=256,
    d_model=64,
    num_layers=2,
    num_heads=4,
    dtype="float64",
    param_dtype="float64",
  )
  cfg.optim.update(lr=lr, warmup_steps=0, schedule="constant")
  model_cfg = config_lib.ModelConfig.from_config(cfg.model)
  tx = optim.make_optimizer(cfg.optim, steps_total)
  schedule = optim.learning_rate_schedule(cfg.optim, steps_total)
  return model_cfg, tx, schedule


def _batch(seed, batch=8, seq=16, vocab=256):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
  # two documents per row, boundary at a random place
  cut = rng.integers(2, seq, (batch, 1))
  segments = np.where(np.arange(seq + 1)[None] < cut, 1, 2).astype(np.int32)
  return {"tokens": tokens, "segment_ids": segments}


def _run(model_cfg, tx, schedule, mesh_shape, devices, batches, microbatches=1):
  mesh = mesh_lib.make_mesh(mesh_shape, devices)
  shardings = state_lib.train_state_shardings(model_cfg, tx, mesh, RULES)
  state = state_lib.create_sharded_train_state(model_cfg, tx, 0, shardings)
  graphdef = state_lib.model_graphdef(model_cfg)
  batch_sharding = sharding.batch_sharding(mesh, RULES)
  step = jax.jit(
    steps.make_train_step(
      model_cfg, graphdef, tx, schedule, microbatches=microbatches, mesh=mesh, rules=RULES
    ),
    in_shardings=(shardings, batch_sharding),
    donate_argnums=0,
  )
  losses = []
  for b in batches:
    state, metrics = step(state, jax.device_put(b, batch_sharding))
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params), state


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


MESHES = {
  "data8": {"data": 8, "fsdp": 1, "tensor": 1},
  "d2f2t2": {"data": 2, "fsdp": 2, "tensor": 2},
  "f4t2": {"data": 1, "fsdp": 4, "tensor": 2},
}


@pytest.mark.slow
@pytest.mark.parametrize(
  "kind,mesh_names", [("mmfree", ("d2f2t2", "f4t2")), ("transformer", ("data8",))]
)
def test_sharded_step_matches_single_device(kind, mesh_names):
  model_cfg, tx, schedule = _setup(kind)
  batches = [_batch(0), _batch(1)]
  ref_losses, ref_params, _ = _run(
    model_cfg, tx, schedule, {"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1], batches
  )
  for shape in (MESHES[name] for name in mesh_names):
    losses, params, state = _run(model_cfg, tx, schedule, shape, jax.devices(), batches)
    # f64 reductions in another order: losses to 1e-10 relative, params after two Adam steps
    # of lr 1e-2 to 1e-8 absolute (Adam divides small gradients by their magnitude; a ternary
    # flip at a rounding boundary would be ~1e-2).
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-10, err_msg=str(shape))
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-8, err_msg=str(shape)),
      params,
      ref_params,
    )
    # and the parameters really are sharded as the rules say
    kernel = state.params["blocks"]["mlp"]["gate_proj"]["kernel"]
    expected = (
      None,
      "fsdp" if shape["fsdp"] > 1 else None,
      "tensor" if shape["tensor"] > 1 else None,
    )
    actual = tuple(kernel.sharding.spec) + (None,) * (3 - len(kernel.sharding.spec))
    assert actual == expected, shape


@pytest.mark.slow
def test_gradient_accumulation_equals_big_batch():
  model_cfg, tx, schedule = _setup()
  batches = [_batch(3), _batch(4)]
  devices = jax.devices()[:1]
  shape = {"data": 1, "fsdp": 1, "tensor": 1}
  big_losses, big_params, _ = _run(model_cfg, tx, schedule, shape, devices, batches)
  acc_losses, acc_params, _ = _run(model_cfg, tx, schedule, shape, devices, batches, microbatches=4)
  np.testing.assert_allclose(acc_losses, big_losses, rtol=1e-10)  # f64, see _setup
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-8), acc_params, big_params)


@pytest.mark.slow
def test_loss_mask_ignores_padding_targets():
  model_cfg, tx, schedule = _setup(lr=0.0)
  b = _batch(5)
  padded = {k: v.copy() for k, v in b.items()}
  padded["segment_ids"][:, -4:] = 0  # last 4 targets are padding
  padded["tokens"][:, -4:] = 0
  devices = jax.devices()[:1]
  shape = {"data": 1, "fsdp": 1, "tensor": 1}
  full, _, _ = _run(model_cfg, tx, schedule, shape, devices, [b])
  masked, _, _ = _run(model_cfg, tx, schedule, shape, devices, [padded])
  assert abs(full[0] - masked[0]) > 1e-6  # different tokens counted

  def bad_batch():
    return _run(model_cfg, tx, schedule, {"data": 3, "fsdp": 1, "tensor": 1}, jax.devices(), [b])

  with pytest.raises(ValueError, match="mesh"):
    bad_batch()


@pytest.mark.slow
def test_accumulate_gradients_k_microbatches_equal_one_batch_lm_loss():
  """The one accumulation helper on the LM objective: loss, metric sums and gradients of 4
  strided microbatches (one lax.scan) equal one value_and_grad over the whole batch (f64)."""
  model_cfg, _, _ = _setup()
  graphdef = state_lib.model_graphdef(model_cfg)
  params = jax.jit(
    lambda: (
      state_lib.init_train_state(
        model_cfg, optim.make_optimizer(config_lib.base_config().optim, 1000), 0
      ).params
    )
  )()
  objective = steps.lm_objective(model_cfg, graphdef, z_loss=1e-4)
  batch = jax.tree.map(jax.numpy.asarray, _batch(6))
  ctx = steps.StepContext(steps.target_count(batch, np.float64), jax.numpy.int32(0))
  run = jax.jit(
    lambda p, b, k: steps.accumulate_gradients(objective.loss, p, b, ctx, k), static_argnums=2
  )
  one, four = run(params, batch, 1), run(params, batch, 4)
  assert float(one[1]["z"]) > 0 and float(one[0]) > 1.0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14), four, one)
  # and a helper that dropped a microbatch would be far off: the last quarter matters
  three = jax.tree.map(lambda x: x[:6], batch)
  partial = run(params, three, 1)
  assert abs(float(partial[0]) - float(one[0])) > 1e-3
