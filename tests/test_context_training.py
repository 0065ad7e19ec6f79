"""Context parallelism end to end (issue 27 targets): a 20-step training run of the trainer
with the sequence on the context axis equals the one-device run, its resume from a mid-run
checkpoint is bitwise, and a long prompt's prefill on a context mesh equals one device.

Float64 throughout: in fp32 a reduction grouped per shard may round one BitLinear absmax or a
ternary weight to the other side of a rounding boundary, a legitimate O(1e-2) difference; in
f64 the one-device and sharded runs agree to rounding (stated tolerances below)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import portpicker
import pytest

import mmfree_jax
from mmfree_jax import ModelConfig
from mmfree_jax import config as config_lib
from mmfree_jax.parallel import context_scan, sharding
from mmfree_jax.parallel import mesh as mesh_lib
from mmfree_jax.train import run as run_lib
from mmfree_jax.train.trainer import train
from tests import test_training_e2e as e2e
from tests.test_model_reference import randomize_params
from tests.train_configs import small_config

RULES = sharding.normalize_rules(config_lib.base_config().mesh.axis_rules)
MESHES = {
  "one_device": {"data": 1},
  "context8": {"data": 1, "context": 8},
  "data2_context4": {"data": 2, "context": 4},
}
STEPS = 20
_MAKE_MESH = mesh_lib.make_mesh


def _config(mesh_shape):
  return small_config(
    **{
      "train.steps": STEPS,
      "train.checkpoint_every": 0,  # the stopped run saves its step 10 itself
      "model.dtype": "float64",
      "model.param_dtype": "float64",
      "mesh.shape": {"data": 1, "fsdp": 1, "context": 1, "tensor": 1, **mesh_shape},
    }
  )


def _train(monkeypatch, mesh_shape, workdir, **kwargs):
  """`train` on the mesh; `one_device` builds its mesh over the first device only."""
  devices = jax.devices()[:1] if mesh_shape == "one_device" else None
  monkeypatch.setattr(
    run_lib.mesh_lib, "make_mesh", lambda shape, dcn_cfg=None: _MAKE_MESH(shape, devices)
  )
  return train(_config(MESHES[mesh_shape]), str(workdir), progress=False, **kwargs)


@pytest.mark.slow
def test_sharded_training_run_equals_one_device_and_resumes_bitwise(tmp_path, monkeypatch):
  """20 steps (tiny MatMul-free LM, byte KJV windows of 32 with document resets) on data 2 x
  context 4: losses to 1e-9 relative and parameters to 1e-9 absolute of the one-device run
  (f64 sums grouped per shard; Adam divides small gradients by their own magnitude, which
  amplifies rounding differences over the steps); the run stopped at step 10 and resumed
  gives bitwise the same losses and parameters as unbroken. Context 8 (one sequence over all
  8 devices) is the same trainer on another mesh: its logits, states and gradients equal one
  device in tests/test_context_scan.py and tests/test_context_attention.py."""
  calls = []
  real = context_scan.context_recurrence
  monkeypatch.setattr(
    context_scan,
    "context_recurrence",
    lambda *a, **k: calls.append(k["mesh"].shape["context"]) or real(*a, **k),
  )
  with jax.enable_x64(True):
    one = _train(monkeypatch, "one_device", tmp_path / "one")
    assert not calls
    full = _train(monkeypatch, "data2_context4", tmp_path / "data2_context4")
    assert set(calls) == {4}  # the recurrence ran split
    want_losses = [r["loss"] for r in one.history]
    assert len(want_losses) == STEPS and want_losses[-1] < want_losses[0]
    np.testing.assert_allclose([r["loss"] for r in full.history], want_losses, rtol=1e-9)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-9),
      jax.device_get(full.state.params),
      jax.device_get(one.state.params),
    )
    e2e.check_resume_is_exact(
      lambda **kw: _train(monkeypatch, "data2_context4", tmp_path / "resumed", **kw),
      full,
      stop_after=10,
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mmfree", "transformer"])
def test_prefill_of_a_long_prompt_on_a_context_mesh_equals_one_device(kind):
  """The prefill of generation and eval (`model(prompt, state=init_state(...))`) of a prompt
  the context axis divides, under `logical_sharding` on context 8: logits and the returned
  decoding state (MLGRU states / KV cache) equal one device to 1e-12 in f64, and a decode step
  from either state gives the same logits. The MatMul-free prefill runs the context scan from
  the state's h (the split recurrence with an initial state)."""
  mesh = mesh_lib.make_mesh(MESHES["context8"])
  rng = np.random.default_rng(9)
  batch, prompt = 2, 32
  tokens = jnp.asarray(rng.integers(0, 256, (batch, prompt)), jnp.int32)
  with jax.enable_x64(True):
    cfg = ModelConfig.tiny(kind=kind, dtype="float64", param_dtype="float64")
    model = mmfree_jax.build_model(cfg, 0)
    randomize_params(model, seed=2)

    def prefill_then_decode(tokens, split):
      state = model.init_state(batch, prompt + 1)
      if split:
        with sharding.logical_sharding(mesh, RULES):
          logits, state = model(tokens, state=state)
      else:
        logits, state = model(tokens, state=state)
      step, _ = model(tokens[:, -1:], state=state)
      return logits, state, step

    want = jax.jit(lambda t: prefill_then_decode(t, False))(tokens)
    split = jax.jit(lambda t: prefill_then_decode(t, True))
    text = split.lower(tokens).as_text()
    got = split(tokens)
  if kind == "mmfree":
    assert "collective_permute" in text  # the context scan ran
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g), np.asarray(w)
    assert np.max(np.abs(g - w)) <= 1e-12 * max(np.max(np.abs(w)), 1e-300)


@pytest.mark.slow
@pytest.mark.subprocess
def test_context_axis_across_two_processes_matches_one(tmp_path):
  """Context 4 over two processes of two CPU devices each (each host holds half of every
  sequence, both hold every batch row, so both load the whole batch:
  `data.pipeline.process_batch_block`) trains as one process of four devices: losses to 1e-10
  relative, parameters to 1e-8 absolute (f64; the cross-process collectives group sums
  differently)."""
  overrides = {
    "train.steps": 3,
    "train.global_batch": 2,
    "model.dtype": "float64",
    "model.param_dtype": "float64",
    "mesh.shape": {"data": 1, "fsdp": 1, "context": 4, "tensor": 1},
  }
  base_env = {"JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu"}
  single = e2e._run_worker(
    tmp_path / "single",
    tmp_path / "single",
    overrides,
    {**base_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
  )
  port = portpicker.pick_unused_port()
  procs = [
    e2e._run_worker(
      tmp_path / "multi",
      tmp_path / "multi",
      overrides,
      {
        **base_env,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "MMFREE_COORDINATOR": f"localhost:{port}",
        "MMFREE_NUM_PROCESSES": "2",
        "MMFREE_PROCESS_ID": str(i),
      },
    )
    for i in range(2)
  ]
  for p in [single] + procs:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
  one = json.load(open(tmp_path / "single.json"))
  two = json.load(open(tmp_path / "multi.json"))
  assert two["process_count"] == 2 and one["final_step"] == two["final_step"] == 3
  np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-10)
  p1, p2 = np.load(tmp_path / "single.npz"), np.load(tmp_path / "multi.npz")
  assert sorted(p1.files) == sorted(p2.files)
  for k in p1.files:
    np.testing.assert_allclose(p2[k], p1[k], atol=1e-8, err_msg=k)
