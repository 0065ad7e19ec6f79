"""Frozen BitLinear weights (quantized once for generation: the frozen formats of the one
quantized model, `nn.packed.PackedLM`, made by `infer.prepare`) give the outputs of
the latent model, for the prefill and a decode step, every BitLinear impl that runs on CPU; and
generation uses them. Every inference plan (`infer.plan`) gives the model's own outputs.

The frozen weights are the very values the latent forward multiplies by, but the frozen
model runs its layers unrolled (the latent prefill scans them) and XLA:CPU may order a dot's
sums differently when its operand is a parameter instead of a fusion, so outputs agree to fp32
round-off: 1e-5 of the largest value (a wrong scale or a weight quantized twice changes logits
by O(1)). Under bf16 compute on CPU the freeze keeps the latent kernels and the layers run
in a loop over the stacked weights instead (`plan_for`: weights 'frozen', layer_loop
'in_place').
"""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmfree_jax import ModelConfig, generate, infer
from mmfree_jax.infer import plan as plan_lib
from mmfree_jax.nn import layers
from mmfree_jax.nn.model import build_model
from mmfree_jax.nn.quantized import QuantizedLinear
from mmfree_jax.numerics import quant
from tests.perturb import perturb_params


def _model(impl):
  cfg = ModelConfig.tiny(vocab_size=97, d_model=32, num_layers=2, bitlinear_impl=impl)
  return perturb_params(build_model(cfg, 0))  # norm scales, lower bounds matter here


def _prefill_and_step(model, tokens, plan):
  """As generate runs it: jax.jit over (graphdef, params), the model merged and prepared for
  `plan` (None: the model itself) inside."""
  graphdef, params = nnx.split(model)

  @jax.jit
  def run(params):
    model = nnx.merge(graphdef, params)
    if plan is not None:
      model = infer.prepare(model, plan)
    state = model.init_state(tokens.shape[0], tokens.shape[1])
    prefill, state = model(tokens[:, :-1], state=state)
    step, state = model(tokens[:, -1:], state=state)
    return prefill, step, state.h

  return run(params)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["autodiff", "lean", "int8", "auto"])
def test_frozen_outputs_equal_latent(impl):
  model = _model(impl)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 7)), jnp.int32)
  assert infer.plan_for(model.cfg) == infer.InferencePlan("frozen", "unrolled")
  latent = _prefill_and_step(model, tokens, None)
  frozen = _prefill_and_step(model, tokens, infer.plan_for(model.cfg))
  for a, b in zip(latent, frozen):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())


def test_prepare_leaves_the_callers_model_untouched():
  model = _model("int8")
  kernel = np.asarray(model.blocks.attn.i_proj.kernel[...])
  prepared = infer.prepare(model, infer.InferencePlan("frozen", "unrolled"))
  assert isinstance(prepared.model.lm_head, QuantizedLinear)
  assert isinstance(model.lm_head, layers.BitLinear)
  assert all(not isinstance(m, QuantizedLinear) for _, m in nnx.iter_modules(model))
  np.testing.assert_array_equal(np.asarray(model.blocks.attn.i_proj.kernel[...]), kernel)


def test_freeze_stores_quantized_weights_per_layer():
  model = _model("int8")
  latent = np.asarray(model.blocks.attn.i_proj.kernel[...])  # [layers, in, out]
  prepared = infer.prepare(model, infer.InferencePlan("frozen", "unrolled"))
  assert prepared.model.fmt == "frozen" and len(prepared.model.blocks) == len(latent)
  for l, block in enumerate(prepared.model.blocks):  # one scale per layer, as the scan uses
    proj = block.attn.i_proj
    assert proj.method == "int8" and proj.w[...].dtype == jnp.int8
    codes, _ = quant.quantize_weights_ternary(jnp.asarray(latent[l]))
    np.testing.assert_array_equal(np.asarray(proj.w[...]), np.asarray(codes))
    np.testing.assert_allclose(float(proj.scale[...]), np.abs(latent[l]).mean(), rtol=1e-6)
  assert prepared.model.lm_head.method == "int8"


def _prompt_args():
  """`generate._generate`'s traced arguments after the params: one 4-token prompt, its length,
  a key, temperature 0, top-p 1, no eos."""
  return (
    jnp.zeros((1, 4), jnp.int32),
    jnp.asarray([4], jnp.int32),
    jax.random.key(0),
    jnp.float32(0),
    jnp.float32(1),
    jnp.int32(-1),
  )


# Its static arguments: three greedy new tokens.
_GREEDY_3_TOKENS = dict(max_new_tokens=3, min_len=4, greedy=True, top_k=0, nucleus=False)


def _weight_abs_in_decode_loop(model) -> int:
  """How many `abs` ops on a weight-shaped operand (`[..., in, out]`, in > 1; activations in
  a decode step are `[batch, 1, d]`) the jaxpr of `generate` runs inside its while loop."""
  graphdef, params = nnx.split(model)
  jaxpr = jax.make_jaxpr(
    lambda p: generate._generate.__wrapped__(  # pylint: disable=protected-access
      graphdef, p, *_prompt_args(), **_GREEDY_3_TOKENS
    )
  )(params)

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
  out = generate.generate(
    model, np.zeros((1, 4), np.int32), generate.SamplingConfig(max_new_tokens=3)
  )
  assert out.shape == (1, 3)
  # control: with the latent weights every BitLinear re-quantizes its weights at every step
  jax.clear_caches()  # generate's jitted function would reuse its trace
  monkeypatch.setattr(
    infer.runner, "plan_for", lambda cfg, **_: infer.InferencePlan("latent", "unrolled")
  )
  assert _weight_abs_in_decode_loop(model) >= 2 * 6 + 1  # 2 layers x (4 MLGRU + 2 GLU) + head


def _bf16_model(num_layers=2, d_model=32, kind="mmfree"):
  cfg = ModelConfig.tiny(
    vocab_size=97,
    d_model=d_model,
    num_layers=num_layers,
    kind=kind,
    dtype="bfloat16",
    param_dtype="bfloat16",
  )
  return perturb_params(build_model(cfg, 0))


@pytest.mark.slow
def test_bf16_in_place_plan_keeps_the_latent_weights_and_equals_the_latent_model():
  """The in-place plan (XLA:CPU under bf16 compute: `plan.CPU_CONVERTS_DOT_OPERANDS`) stores
  only each stacked kernel's per-layer scale, and the prefill and a decode step through the
  in-place layer loop give the unfrozen model's outputs. Both sides round every op to bf16 in
  another order, so the tolerance is bf16's: 2e-2 of the largest value (a wrong scale: O(1))."""
  model = _bf16_model()
  in_place = infer.InferencePlan("frozen", "in_place")
  assert infer.plan_for(model.cfg, "cpu") == in_place
  assert infer.plan_for(model.cfg, "gpu") == infer.InferencePlan("frozen", "unrolled")
  assert infer.plan_for(_model("lean").cfg, "cpu") == infer.InferencePlan("frozen", "unrolled")
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 7)), jnp.int32)
  latent = _prefill_and_step(model, tokens, None)
  frozen = _prefill_and_step(model, tokens, in_place)
  for a, b in zip(latent, frozen):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(b, a, rtol=0, atol=2e-2 * np.abs(a).max())
  kernel = np.asarray(model.blocks.mlp.down_proj.kernel[...], np.float32)  # [layers, in, out]
  prepared = infer.prepare(model, in_place)
  proj = prepared.model.blocks.mlp.down_proj  # stacked: one module for all layers
  assert proj.fmt == "latent_scale" and proj.w[...].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(proj.w[...], np.float32), kernel)
  np.testing.assert_allclose(np.asarray(proj.scale[...]), np.abs(kernel).mean((1, 2)), rtol=1e-5)


def _generate_temp_bytes(model) -> int:
  graphdef, params = nnx.split(model)
  compiled = generate._generate.lower(  # pylint: disable=protected-access
    graphdef, params, *_prompt_args(), **_GREEDY_3_TOKENS
  ).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mmfree", "transformer"])
def test_bf16_generate_on_cpu_holds_one_layers_weight_temporaries(kind):
  """The compiled generate's temporaries do not grow with depth under the plan it runs on CPU
  for bf16 (`plan_for`): each decode step converts one layer's weights at a time (MatMul-free:
  the in-place loop; Transformer++, whose per-layer KV caches keep its layers unrolled:
  ordered layers). A property of the program: growth by a layer's weights fails it."""
  one, four = (_generate_temp_bytes(_bf16_model(n, d_model=128, kind=kind)) for n in (1, 4))
  layer_bf16 = sum(
    x.size * 2
    for x in jax.tree.leaves(nnx.state(_bf16_model(1, d_model=128, kind=kind).blocks, nnx.Param))
  )
  assert four - one < 0.5 * layer_bf16, (one, four, layer_bf16)


@pytest.mark.slow
@pytest.mark.parametrize(
  "plan",
  [
    infer.InferencePlan("latent", "in_place", order_layers=True),
    infer.InferencePlan("frozen", "unrolled"),
  ],
)
def test_bf16_transformer_plans_give_the_models_own_outputs(plan):
  """A Transformer++ prefill and decode step run by each plan (the in-place one: weights
  ordered after the previous layer by adding an exact zero) give the model's own logits and
  cache, bit for bit (both run the layers unrolled over the per-layer caches); the stateless
  forward (scanned by the model, the plan's loop here) to bf16 round-off, 2e-2 of the scale."""
  model = _bf16_model(kind="transformer")
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 97, (2, 7)), jnp.int32)
  graphdef, params = nnx.split(model)

  @functools.partial(jax.jit, static_argnums=1)
  def run(params, plan):
    model = nnx.merge(graphdef, params)
    if plan is not None:
      model = infer.prepare(model, plan)
    state = model.init_state(tokens.shape[0], 8)
    prefill, state = model(tokens[:, :-1], state=state)
    step, state = model(tokens[:, -1:], state=state)
    stateless, _ = model(tokens)
    return prefill, step, state.k, state.v, stateless

  (*want, want_stateless), (*got, got_stateless) = run(params, None), run(params, plan)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(b, np.float32), np.asarray(a, np.float32))
  a, b = np.asarray(want_stateless, np.float32), np.asarray(got_stateless, np.float32)
  np.testing.assert_allclose(b, a, rtol=0, atol=2e-2 * np.abs(a).max())


def test_cpu_switch_off_gives_the_plans_of_other_platforms(monkeypatch):
  """`CPU_CONVERTS_DOT_OPERANDS` is the one switch of the CPU workaround: off, bf16 on CPU
  plans as on a GPU (and as fp32 on CPU)."""
  for kind in ("mmfree", "transformer"):
    cfg = _bf16_model(kind=kind).cfg
    assert infer.plan_for(cfg, "cpu").layer_loop == "in_place"
    monkeypatch.setattr(plan_lib, "CPU_CONVERTS_DOT_OPERANDS", False)
    for purpose in plan_lib.PURPOSES:
      assert infer.plan_for(cfg, "cpu", purpose=purpose) == infer.plan_for(
        cfg, "gpu", purpose=purpose
      )
    monkeypatch.undo()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mmfree", "transformer"])
def test_bf16_scoring_on_cpu_equals_the_plain_forward_and_holds_one_layer(kind):
  """Perplexity's forward (`scoring.target_logprobs`) prepares a bf16 model
  (`infer.prepare_for_scoring`; on CPU: layers in the in-place loop, MatMul-free: scales
  frozen): its log-probs equal the plain forward's at bf16 tolerance (2e-2 nats: a wrong scale
  moves them by O(1)), and its compiled temporaries do not grow with depth."""
  from mmfree_jax.eval import scoring

  def temp(model):
    graphdef, params = nnx.split(model)
    tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    lowered = scoring.target_logprobs.lower(graphdef, params, tokens, tokens, None)
    return lowered.compile().memory_analysis().temp_size_in_bytes

  model = _bf16_model(kind=kind)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 97, (2, 9)), jnp.int32)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  got, _ = scoring.target_logprobs(*nnx.split(model), inputs, targets, None)
  logits, _ = model(inputs)
  want = np.take_along_axis(
    np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32))), np.asarray(targets)[..., None], -1
  )[..., 0]
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-2)
  layer_bf16 = sum(
    x.size * 2
    for x in jax.tree.leaves(nnx.state(_bf16_model(1, d_model=128, kind=kind).blocks, nnx.Param))
  )
  one, four = (temp(_bf16_model(n, d_model=128, kind=kind)) for n in (1, 4))
  assert four - one < 0.5 * layer_bf16, (one, four, layer_bf16)


def test_models_hold_no_inference_mode_and_nn_asks_no_platform():
  """How a model runs for inference lives in `mmfree_jax.infer`: the models' modules carry no
  mode attributes (frozen copies, in-place flags), not even once a plan prepared a copy, and
  no module of `nn/` imports or calls anything that names the platform."""
  import ast  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel

  from mmfree_jax import nn  # pylint: disable=import-outside-toplevel

  for kind in ("mmfree", "transformer"):
    model = _bf16_model(kind=kind)
    infer.prepare(model, infer.InferencePlan("frozen", "unrolled"))
    for _, module in nnx.iter_modules(model):
      modes = [a for a in vars(module) if a.startswith("frozen") or "in_place" in a]
      assert not modes, (type(module).__name__, modes)
  platform_names = {
    "dispatch",
    "default_backend",
    "current_platform",
    "devices",
    "local_devices",
    "platform_of",
  }
  folder = os.path.dirname(nn.__file__)
  for name in sorted(os.listdir(folder)):
    if not name.endswith(".py"):
      continue
    tree = ast.parse(open(os.path.join(folder, name), encoding="utf-8").read())
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom):
        named = {node.module or ""} | {a.name for a in node.names}
        assert not {n.rsplit(".", 1)[-1] for n in named} & platform_names, (name, named)
      if isinstance(node, ast.Attribute):
        assert node.attr not in platform_names, (name, node.attr)
