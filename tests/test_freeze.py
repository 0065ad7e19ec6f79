"""Frozen BitLinear weights (quantized once for generation) give the outputs of the latent
model, for the prefill and a decode step, every BitLinear impl that runs on CPU; and generation
uses them.

The frozen weights are the very values the latent forward multiplies by, but the frozen
model runs its layers unrolled (the latent prefill scans them) and XLA:CPU may order a dot's
sums differently when its operand is a parameter instead of a fusion, so outputs agree to fp32
round-off: 1e-5 of the largest value (a wrong scale or a weight quantized twice changes logits
by O(1)). Under bf16 compute on CPU the freeze keeps the latent kernels and the layers run
in a loop over the stacked weights instead (`keeps_latent_weights`).
"""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmfree_jax import ModelConfig, generate
from mmfree_jax.nn import layers
from mmfree_jax.nn.model import build_model, keeps_latent_weights
from mmfree_jax.numerics import quant
from tests.perturb import perturb_params


def _model(impl):
  cfg = ModelConfig.tiny(vocab_size=97, d_model=32, num_layers=2, bitlinear_impl=impl)
  return perturb_params(build_model(cfg, 0))  # norm scales, lower bounds matter here


def _prefill_and_step(model, tokens, freeze):
  """As generate runs it: jax.jit over (graphdef, params), the model merged inside."""
  graphdef, params = nnx.split(model)

  @jax.jit
  def run(params):
    model = nnx.merge(graphdef, params)
    if freeze:
      model.freeze_weights()
    state = model.init_state(tokens.shape[0])
    prefill, state = model(tokens[:, :-1], state=state)
    step, state = model(tokens[:, -1:], state=state)
    return prefill, step, state.h

  return run(params)


@pytest.mark.parametrize("impl", ["autodiff", "lean", "int8", "auto"])
def test_frozen_outputs_equal_latent(impl):
  model = _model(impl)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 7)), jnp.int32)
  latent = _prefill_and_step(model, tokens, False)
  frozen = _prefill_and_step(model, tokens, True)
  for a, b in zip(latent, frozen):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())
  # the caller's model is untouched (the freeze ran on the copy merged inside jit)
  assert all(m.frozen is None for _, m in nnx.iter_modules(model)
             if isinstance(m, layers.BitLinear))


def test_freeze_stores_quantized_weights_per_layer():
  model = _model("int8")
  latent = np.asarray(model.blocks.attn.i_proj.kernel[...])  # [layers, in, out]
  model.freeze_weights()
  for l, block in enumerate(model.frozen_layers):  # one scale per layer, as the scan uses
    proj = block.attn.i_proj
    assert proj.frozen == "int8" and proj.kernel[...].dtype == jnp.int8
    codes, _ = quant.quantize_weights_ternary(jnp.asarray(latent[l]))
    np.testing.assert_array_equal(np.asarray(proj.kernel[...]), np.asarray(codes))
    np.testing.assert_allclose(float(proj.w_mean_abs[...]), np.abs(latent[l]).mean(),
                               rtol=1e-6)
  assert model.lm_head.frozen == "int8"


def _weight_abs_in_decode_loop(model) -> int:
  """How many `abs` ops on a weight-shaped operand (`[..., in, out]`, in > 1; activations in
  a decode step are `[batch, 1, d]`) the jaxpr of `generate` runs inside its while loop."""
  graphdef, params = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda p: generate._generate.__wrapped__(  # pylint: disable=protected-access
      graphdef, p, jnp.zeros((1, 4), jnp.int32), jnp.asarray([4], jnp.int32),
      jax.random.key(0), jnp.float32(0), jnp.float32(1), jnp.int32(-1), max_new_tokens=3,
      min_len=4, greedy=True, top_k=0, nucleus=False))(params)

  def count(jaxpr, in_loop):
    n = 0
    for eqn in jaxpr.eqns:
      if in_loop and eqn.primitive.name == "abs":
        shape = eqn.invars[0].aval.shape
        n += len(shape) >= 2 and shape[-2] > 1
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        n += count(sub, in_loop or eqn.primitive.name == "while")
    return n

  return count(jaxpr.jaxpr, False)


def test_generate_quantizes_weights_outside_the_decode_loop(monkeypatch):
  model = _model("lean")
  assert _weight_abs_in_decode_loop(model) == 0
  out = generate.generate(model, np.zeros((1, 4), np.int32),
                          generate.SamplingConfig(max_new_tokens=3))
  assert out.shape == (1, 3)
  # control: without the freeze every BitLinear re-quantizes its weights at every step
  monkeypatch.setattr(type(model), "freeze_weights", lambda self: None)
  assert _weight_abs_in_decode_loop(model) >= 2 * 6 + 1  # 2 layers x (4 MLGRU + 2 GLU) + head


def _bf16_model(num_layers=2, d_model=32, kind="mmfree"):
  cfg = ModelConfig.tiny(vocab_size=97, d_model=d_model, num_layers=num_layers, kind=kind,
                         dtype="bfloat16", param_dtype="bfloat16")
  return perturb_params(build_model(cfg, 0))


def test_bf16_on_cpu_keeps_the_latent_weights_and_equals_the_latent_model():
  """XLA:CPU under bf16 compute (`keeps_latent_weights`): the freeze stores only each stacked
  kernel's per-layer scale, and the prefill and a decode step through the in-place layer loop
  give the unfrozen model's outputs. Both sides round every op to bf16 in another order, so
  the tolerance is bf16's: 2e-2 of the largest value (a wrong scale: O(1))."""
  model = _bf16_model()
  assert keeps_latent_weights(model.cfg)
  assert not keeps_latent_weights(_model("lean").cfg)  # fp32: the per-layer frozen copy
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 7)), jnp.int32)
  latent = _prefill_and_step(model, tokens, False)
  frozen = _prefill_and_step(model, tokens, True)
  for a, b in zip(latent, frozen):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(b, a, rtol=0, atol=2e-2 * np.abs(a).max())
  kernel = np.asarray(model.blocks.mlp.down_proj.kernel[...], np.float32)  # [layers, in, out]
  model.freeze_weights()
  assert model.frozen_layers is None and model.frozen_stacked
  proj = model.blocks.mlp.down_proj
  assert proj.frozen_latent and proj.kernel[...].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(proj.kernel[...], np.float32), kernel)
  np.testing.assert_allclose(np.asarray(proj.w_mean_abs[...]), np.abs(kernel).mean((1, 2)),
                             rtol=1e-5)


def _generate_temp_bytes(model) -> int:
  graphdef, params = nnx.split(model)
  compiled = generate._generate.lower(  # pylint: disable=protected-access
      graphdef, params, jnp.zeros((1, 4), jnp.int32), jnp.asarray([4], jnp.int32),
      jax.random.key(0), jnp.float32(0), jnp.float32(1), jnp.int32(-1), max_new_tokens=3,
      min_len=4, greedy=True, top_k=0, nucleus=False).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("kind", ["mmfree", "transformer"])
def test_bf16_generate_on_cpu_holds_one_layers_weight_temporaries(kind, monkeypatch):
  """The compiled generate's temporaries do not grow with depth: each decode step converts
  one layer's weights to fp32 at a time (MatMul-free: `loop_blocks_in_place`; Transformer++,
  whose per-layer KV caches keep its layers unrolled: `ordered_after`). Before, XLA converted
  (and froze) every layer's up front: 3x each layer's bf16 bytes more per layer (here 1.6 MB
  per layer), which the Transformer++ control below still shows."""
  one, four = (_generate_temp_bytes(_bf16_model(n, d_model=128, kind=kind)) for n in (1, 4))
  layer_bf16 = sum(x.size * 2 for x in jax.tree.leaves(
      nnx.state(_bf16_model(1, d_model=128, kind=kind).blocks, nnx.Param)))
  assert four - one < 0.5 * layer_bf16, (one, four, layer_bf16)
  if kind == "transformer":  # control: per-layer frozen copies, no ordering
    from mmfree_jax.nn import model as model_lib  # pylint: disable=import-outside-toplevel
    monkeypatch.setattr(model_lib.TransformerLM, "freeze_weights",
                        model_lib._LMBase.freeze_weights)  # pylint: disable=protected-access
    jax.clear_caches()  # generate's jitted function would reuse its trace
    one, four = (_generate_temp_bytes(_bf16_model(n, d_model=128, kind=kind)) for n in (1, 4))
    assert four - one > 2 * 3 * layer_bf16, (one, four, layer_bf16)


def test_bf16_transformer_decode_on_cpu_equals_the_unfrozen_model():
  """The in-place Transformer++ prefill and decode step (`layers_in_place`, weights ordered
  after the previous layer by adding an exact zero) give the plain per-layer path's logits
  and cache, bit for bit."""
  model = _bf16_model(kind="transformer")
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 97, (2, 7)), jnp.int32)
  graphdef, params = nnx.split(model)

  @functools.partial(jax.jit, static_argnums=1)
  def run(params, freeze):
    model = nnx.merge(graphdef, params)
    if freeze:
      model.freeze_weights()
      assert model.layers_in_place and model.frozen_layers is None
    state = model.init_state(tokens.shape[0], 8)
    prefill, state = model(tokens[:, :-1], state=state)
    step, state = model(tokens[:, -1:], state=state)
    return prefill, step, state.k, state.v

  for a, b in zip(jax.tree.leaves(run(params, False)), jax.tree.leaves(run(params, True))):
    np.testing.assert_array_equal(np.asarray(b, np.float32), np.asarray(a, np.float32))


@pytest.mark.parametrize("kind", ["mmfree", "transformer"])
def test_bf16_scoring_on_cpu_equals_the_plain_forward_and_holds_one_layer(kind):
  """Perplexity's forward (`scoring.target_logprobs`) prepares a bf16 model
  (`prepare_for_scoring`: layers in the in-place loop; MatMul-free: scales frozen): its
  log-probs equal the plain forward's at bf16 tolerance (2e-2 nats: a wrong scale moves them
  by O(1)), and its compiled temporaries do not grow with depth (the plain forward's grow by
  ~3x each layer's bf16 bytes: XLA:CPU converts every layer's weights to fp32 ahead of the
  scan)."""
  from mmfree_jax.eval import scoring

  def temp(model, prepared):
    graphdef, params = nnx.split(model)
    tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    if prepared:
      lowered = scoring.target_logprobs.lower(graphdef, params, tokens, tokens, None)
    else:
      lowered = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0]).lower(params, tokens)
    return lowered.compile().memory_analysis().temp_size_in_bytes

  model = _bf16_model(kind=kind)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 97, (2, 9)), jnp.int32)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  got, _ = scoring.target_logprobs(*nnx.split(model), inputs, targets, None)
  logits, _ = model(inputs)
  want = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32))),
                            np.asarray(targets)[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-2)
  layer_bf16 = sum(x.size * 2 for x in jax.tree.leaves(
      nnx.state(_bf16_model(1, d_model=128, kind=kind).blocks, nnx.Param)))
  one, four = (temp(_bf16_model(n, d_model=128, kind=kind), True) for n in (1, 4))
  assert four - one < 0.5 * layer_bf16, (one, four, layer_bf16)
  one, four = (temp(_bf16_model(n, d_model=128, kind=kind), False) for n in (1, 4))
  assert four - one > 2 * 3 * layer_bf16, (one, four, layer_bf16)  # the control
