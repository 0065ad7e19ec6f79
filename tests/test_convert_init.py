"""The converted student's scale calibration (`mmfree_jax.convert.calibrate`): the ternary gain,
the teacher's o_proj/down_proj input RMS, and that the calibrated init puts each student block's
update to the residual stream on the teacher's scale (the plain copy is ~20x off)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmfree_jax.config import ModelConfig
from mmfree_jax.convert import (
  Calibration,
  calibration_from_teacher,
  init_student_params,
  input_rms,
  student_config,
  teacher_projection_inputs,
  ternary_gain,
)
from mmfree_jax.nn import blockwise
from mmfree_jax.nn.model import build_model
from mmfree_jax.numerics import quant


@pytest.fixture(scope="module")
def setup():
  """A small randomly initialised Transformer++ (its own init: 0.02-std kernels, GQA) and a
  batch of packed random tokens."""
  teacher_cfg = ModelConfig.tiny(kind="transformer", num_heads=4, num_kv_heads=2, rms_norm_eps=1e-5)
  student_cfg = student_config(teacher_cfg)
  teacher = build_model(teacher_cfg, nnx.Rngs(params=0))
  student = build_model(student_cfg, nnx.Rngs(params=1))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, teacher_cfg.vocab_size, (8, 32)), jnp.int32)
  segments = jnp.asarray(
    np.where(np.arange(32)[None] < rng.integers(4, 28, (8, 1)), 1, 2), jnp.int32
  )
  return teacher_cfg, student_cfg, teacher, student, tokens, segments


def _params(model):
  return nnx.split(model)[1].to_pure_dict()


def test_ternary_gain_is_the_least_squares_fit():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(0, 0.05, (3, 96, 64)), jnp.float32)
  gain = ternary_gain(w)
  assert gain.shape == (3,)
  for layer in range(3):
    q = np.asarray(quant.fake_quantize_weights(w[layer]), np.float64)
    wl = np.asarray(w[layer], np.float64)
    assert float(gain[layer]) == pytest.approx((wl * q).sum() / (q * q).sum(), rel=1e-5)
    # A Gaussian kernel: Q(W) shrinks W x; the gain (~1.34) undoes it, a better fit than 1.
    assert 1.25 < float(gain[layer]) < 1.45
    err = lambda a: np.linalg.norm(wl - a * q)
    assert err(float(gain[layer])) < 0.95 * err(1.0)  # measured 0.905
  assert float(ternary_gain(w[0])) == pytest.approx(float(gain[0]))
  with pytest.raises(ValueError, match="kernel must be"):
    ternary_gain(w[0, 0])
  norm = ternary_gain(w, "norm")  # ||W|| / ||Q(W)||: lsq / norm is the cosine of W and Q(W)
  for layer in range(3):
    q = np.asarray(quant.fake_quantize_weights(w[layer]), np.float64)
    wl = np.asarray(w[layer], np.float64)
    assert float(norm[layer]) == pytest.approx(np.linalg.norm(wl) / np.linalg.norm(q), rel=1e-5)
    cosine = (wl * q).sum() / (np.linalg.norm(wl) * np.linalg.norm(q))
    assert float(gain[layer] / norm[layer]) == pytest.approx(cosine, rel=1e-5)
  with pytest.raises(ValueError, match="unknown gain"):
    ternary_gain(w, "rms")


def test_input_rms_is_the_mean_token_rms_over_counted_tokens():
  x = np.zeros((2, 1, 3, 4), np.float32)
  x[0, 0, 0], x[0, 0, 1], x[0, 0, 2] = 1.0, 3.0, 100.0  # token RMS 1, 3, 100
  x[1] = 2.0
  mask = np.array([[True, True, False]])
  np.testing.assert_allclose(input_rms(jnp.asarray(x), jnp.asarray(mask)), [2.0, 2.0])
  np.testing.assert_allclose(input_rms(jnp.asarray(x)), [104 / 3, 2.0], rtol=1e-6)


@pytest.mark.slow
def test_projection_inputs_rebuild_the_teacher_blocks(setup):
  """o_in @ W_o and down_in @ W_down are the two residual updates of each teacher block."""
  teacher_cfg, _, teacher, _, tokens, segments = setup
  hidden = blockwise.transformer_hidden_states(teacher, tokens, segments)
  o_in, down_in = teacher_projection_inputs(teacher, tokens, segments)
  assert o_in.shape == (teacher_cfg.num_layers, 8, 32, teacher_cfg.d_model)
  assert down_in.shape == (teacher_cfg.num_layers, 8, 32, teacher_cfg.intermediate_size)
  p = _params(teacher)["blocks"]
  for layer in range(teacher_cfg.num_layers):
    rebuilt = (
      hidden[layer]
      + o_in[layer] @ p["attn"]["o_proj"]["kernel"][layer]
      + down_in[layer] @ p["mlp"]["down_proj"]["kernel"][layer]
    )
    np.testing.assert_allclose(rebuilt, hidden[layer + 1], atol=1e-6)
  # The teacher is left as it was, also with writable numpy leaves (whose per-layer slices are
  # views): its o_proj is swapped, not written into.
  graphdef, state = nnx.split(teacher)
  numpy_params = jax.tree.map(lambda x: np.array(x), state.to_pure_dict())
  state.replace_by_pure_dict(numpy_params)
  before = np.array(numpy_params["blocks"]["attn"]["o_proj"]["kernel"])
  o_np, _ = teacher_projection_inputs(nnx.merge(graphdef, state), tokens, segments)
  np.testing.assert_array_equal(numpy_params["blocks"]["attn"]["o_proj"]["kernel"], before)
  np.testing.assert_allclose(o_np, o_in, atol=1e-6)


def test_calibration_is_folded_into_the_norm_scales(setup):
  teacher_cfg, student_cfg, teacher, student, tokens, segments = setup
  t, fresh = _params(teacher), _params(student)
  plain = init_student_params(t, teacher_cfg, fresh, student_cfg)
  same = init_student_params(t, teacher_cfg, fresh, student_cfg, Calibration())
  jax.tree.map(np.testing.assert_array_equal, plain, same)  # no calibration: the plain copy
  o_rms, down_rms = jnp.asarray([0.5, 0.25]), jnp.asarray([2.0, 4.0])
  cal = init_student_params(
    t,
    teacher_cfg,
    fresh,
    student_cfg,
    Calibration(ternary=True, o_proj_rms=o_rms, down_proj_rms=down_rms),
  )
  tb = t["blocks"]
  gain = lambda kernel: np.asarray(ternary_gain(kernel))[:, None]
  for group, name, kernel, rms in (
    ("attn", "o_proj", tb["attn"]["o_proj"]["kernel"], o_rms),
    ("mlp", "down_proj", tb["mlp"]["down_proj"]["kernel"], down_rms),
  ):
    np.testing.assert_array_equal(plain["blocks"][group][name]["norm_scale"], 1.0)
    np.testing.assert_allclose(
      cal["blocks"][group][name]["norm_scale"],
      np.broadcast_to(
        gain(kernel) * np.asarray(rms)[:, None], plain["blocks"][group][name]["norm_scale"].shape
      ),
      rtol=1e-6,
    )
  np.testing.assert_allclose(
    cal["blocks"]["attn"]["g_proj"]["norm_scale"],
    plain["blocks"]["attn"]["g_proj"]["norm_scale"] * gain(tb["attn"]["q_proj"]["kernel"]),
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    cal["blocks"]["mlp"]["gate_proj"]["norm_scale"],
    plain["blocks"]["mlp"]["gate_proj"]["norm_scale"] * gain(tb["mlp"]["gate_proj"]["kernel"]),
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    cal["lm_head"]["norm_scale"],
    plain["lm_head"]["norm_scale"] * float(ternary_gain(t["lm_head"]["kernel"])),
    rtol=1e-6,
  )
  norm = init_student_params(
    t, teacher_cfg, fresh, student_cfg, Calibration(ternary=True, block_gain="norm")
  )
  np.testing.assert_allclose(
    norm["blocks"]["mlp"]["down_proj"]["norm_scale"],
    np.broadcast_to(
      np.asarray(ternary_gain(tb["mlp"]["down_proj"]["kernel"], "norm"))[:, None],
      plain["blocks"]["mlp"]["down_proj"]["norm_scale"].shape,
    ),
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    norm["lm_head"]["norm_scale"], cal["lm_head"]["norm_scale"], rtol=1e-6
  )  # the head keeps the least-squares gain
  for key in ("kernel",):  # the weights themselves are the plain copy's
    np.testing.assert_array_equal(
      cal["blocks"]["attn"]["o_proj"][key], plain["blocks"]["attn"]["o_proj"][key]
    )


@pytest.mark.slow
def test_calibrated_student_blocks_match_the_teacher_update_scale(setup):
  """On the teacher's block inputs, RMS(student block update) / RMS(teacher block update)
  lies within [1/2, 2] per layer with the calibration; the plain copy's is > 5 (the
  BitLinear normalises the o_proj/down_proj inputs the teacher reads at RMS ~0.01-0.06)."""
  teacher_cfg, student_cfg, teacher, student, tokens, segments = setup
  t, fresh = _params(teacher), _params(student)
  graphdef = nnx.split(student)[0]
  hidden = blockwise.transformer_hidden_states(teacher, tokens, segments)
  calibration = calibration_from_teacher(teacher, tokens[:4], segments[:4])  # other rows
  rms = lambda z: float(jnp.sqrt(jnp.mean(jnp.square(z))))

  def ratios(calib):
    params = init_student_params(t, teacher_cfg, fresh, student_cfg, calib)
    model = nnx.merge(graphdef, params)
    out = blockwise.mmfree_block_outputs(model, hidden[:-1, 4:], segments[4:])
    return [
      rms(out[l] - hidden[l, 4:]) / rms(hidden[l + 1, 4:] - hidden[l, 4:])
      for l in range(teacher_cfg.num_layers)
    ]

  calibrated, plain = ratios(calibration), ratios(None)
  assert all(0.5 <= r <= 2.0 for r in calibrated), calibrated
  assert all(r > 5.0 for r in plain), plain


def test_mapping_picks_the_mlgru_sources(setup):
  from mmfree_jax.convert import ConversionError

  teacher_cfg, student_cfg, teacher, student, _, _ = setup
  t, fresh = _params(teacher), _params(student)
  default = init_student_params(t, teacher_cfg, fresh, student_cfg)
  swapped = init_student_params(t, teacher_cfg, fresh, student_cfg, mapping="qkv")
  s, d = swapped["blocks"]["attn"], default["blocks"]["attn"]
  np.testing.assert_array_equal(s["i_proj"]["kernel"], d["g_proj"]["kernel"])  # Q -> i
  np.testing.assert_array_equal(s["g_proj"]["kernel"], d["i_proj"]["kernel"])  # V -> g
  np.testing.assert_array_equal(s["f_proj"]["kernel"], d["f_proj"]["kernel"])
  for bad in ("vvq", "vk", "abc"):
    with pytest.raises(ConversionError, match="permutation of 'vkq'"):
      init_student_params(t, teacher_cfg, fresh, student_cfg, mapping=bad)
