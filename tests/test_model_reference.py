"""The full MatMul-free LM forward against a numpy re-implementation of docs/architecture.md §1.

The numpy model below is written from the spec formulas (docs/architecture.md §1) (rmsnorm,
bitlinear, sigmoid, silu, a for-loop recurrence, the lower-bound formula, the fused GLU split, the
ternary lm_head) and reads the parameters by name from `nnx.state(model)`; it never calls mmfree_jax
code. Both sides run in float64 with every parameter randomized (norm scales != 1, lower bounds !=
0), so they agree to ~1e-12; the tolerance is 1e-9 relative to the logit scale.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import mmfree_jax
from mmfree_jax import ModelConfig

TOL = 1e-9
SEQ = 7


# ------------------------------------------------------------------------- numpy model


def np_rmsnorm(x, gamma, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * gamma


def np_round_half_away(x):
  trunc = np.trunc(x)
  return np.where(np.abs(x - trunc) == 0.5, trunc + np.sign(x), np.rint(x))


def np_bitlinear(x, w, gamma):
  xn = np_rmsnorm(x, gamma, 1e-6)
  sx = 127.0 / np.maximum(np.max(np.abs(xn), axis=-1, keepdims=True), 1e-5)
  xq = np.clip(np_round_half_away(xn * sx), -128, 127) / sx
  sw = 1.0 / max(np.mean(np.abs(w)), 1e-5)
  wq = np.clip(np.rint(w * sw), -1, 1) / sw  # rint: half-even
  return xq @ wq


def np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_silu(x):
  return x * np_sigmoid(x)


def np_softmax(x, axis):
  e = np.exp(x - np.max(x, axis=axis, keepdims=True))
  return e / np.sum(e, axis=axis, keepdims=True)


def np_mmfree_forward(params, tokens, *, num_layers, eps, use_lower_bound, segment_ids=None):
  """params: {path tuple: np.ndarray} from nnx.state(model); tokens [B, T] -> logits [B, T, V]."""
  P = params
  layer = lambda l, *path: P[("blocks",) + path][l]  # stacked: leading layers axis
  proj = lambda l, name, x: np_bitlinear(
    x, layer(l, "attn", name, "kernel"), layer(l, "attn", name, "norm_scale")
  )
  batch, seq = tokens.shape
  if use_lower_bound:
    p = np_softmax(P[("lower_bounds",)], axis=0)
    lb = np.cumsum(p, axis=0) - p[0]
  reset = np.zeros((batch, seq), bool)
  if segment_ids is not None:
    reset[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]

  x = P[("embedding",)][tokens]
  for l in range(num_layers):
    # token mixer: MLGRU
    a = np_rmsnorm(x, layer(l, "attn_norm", "scale"), eps)
    i, f, g = proj(l, "i_proj", a), proj(l, "f_proj", a), proj(l, "g_proj", a)
    f = np_sigmoid(f)
    if l > 0 and use_lower_bound:
      f = lb[l] + (1.0 - lb[l]) * f
    i = np_silu(i) * (1.0 - f)
    h = np.zeros_like(i)
    state = np.zeros((batch, i.shape[-1]))
    for t in range(seq):
      f_t = np.where(reset[:, t, None], 0.0, f[:, t])
      state = f_t * state + i[:, t]
      h[:, t] = state
    o = np_rmsnorm(g, layer(l, "attn", "g_norm", "scale"), eps) * h * np_sigmoid(h)
    x = x + proj(l, "o_proj", o)
    # channel mixer: GLU with one fused gate_proj, split (gate, up)
    m = np_rmsnorm(x, layer(l, "mlp_norm", "scale"), eps)
    gu = np_bitlinear(
      m, layer(l, "mlp", "gate_proj", "kernel"), layer(l, "mlp", "gate_proj", "norm_scale")
    )
    gate, up = np.split(gu, 2, axis=-1)
    x = x + np_bitlinear(
      np_silu(gate) * up,
      layer(l, "mlp", "down_proj", "kernel"),
      layer(l, "mlp", "down_proj", "norm_scale"),
    )
  x = np_rmsnorm(x, P[("final_norm", "scale")], eps)
  return np_bitlinear(x, P[("lm_head", "kernel")], P[("lm_head", "norm_scale")])


# ----------------------------------------------------------------------------- helpers


def randomize_params(model, seed):
  """Sets every parameter to random values (scales around 1 with random signs/sizes, lower
  bounds ~N(0,1)) through nnx.update; returns {path: np.ndarray}."""
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)
  flat = {}
  for path, var in nnx.to_flat_state(state):
    value = np.asarray(var.get_value())
    name = path[-1]
    if name in ("scale", "norm_scale"):
      new = rng.uniform(0.5, 1.5, value.shape)
    elif name == "lower_bounds":
      new = rng.normal(0.0, 1.0, value.shape)
    elif name == "embedding":
      new = rng.normal(0.0, 1.0, value.shape)
    else:  # kernels
      new = rng.normal(0.0, 0.1, value.shape)
    flat[path] = new.astype(value.dtype)
    var.set_value(jnp.asarray(flat[path]))
  nnx.update(model, state)
  # read back what the model now holds, by name
  out = {
    path: np.asarray(var.get_value())
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }
  for path, value in flat.items():
    np.testing.assert_array_equal(out[path], value)
  return out


@nnx.jit
def _jit_forwards(model, calls):
  """Logits of `model(tokens, segment_ids=s)` for each (tokens, s) in calls: one compile."""
  return [model(t, segment_ids=s)[0] for t, s in calls]


def _forwards(model, *calls):
  """calls: (tokens,) or (tokens, segment_ids) tuples of numpy arrays -> list of np logits."""
  calls = tuple(
    (jnp.asarray(c[0], jnp.int32), None if len(c) == 1 else jnp.asarray(c[1], jnp.int32))
    for c in calls
  )
  return [np.asarray(x) for x in _jit_forwards(model, calls)]


def _tokens(seed, batch=2, seq=SEQ, vocab=256):
  return np.random.default_rng(seed).integers(0, vocab, (batch, seq)).astype(np.int32)


# -------------------------------------------------------------------------------- tests

# Two documents per row, the second starting at CUT in both rows (so the documents run alone
# form one [2, SEQ - CUT] batch). Segment ids are arbitrary labels, not necessarily 1, 2.
CUT = 3
SEGMENTS = np.array([[1, 1, 1, 2, 2, 2, 2], [5, 5, 5, 7, 7, 7, 7]], np.int32)


def _f64_model(seed=1, **overrides):
  cfg = ModelConfig.tiny(dtype="float64", param_dtype="float64", **overrides)
  model = mmfree_jax.build_model(cfg, 0)
  return model, randomize_params(model, seed=seed)


def _np_reference(params, cfg, tokens, **kw):
  return np_mmfree_forward(
    params,
    tokens,
    num_layers=cfg.num_layers,
    eps=cfg.rms_norm_eps,
    use_lower_bound=cfg.use_lower_bound,
    **kw,
  )


def test_mmfree_forward_matches_numpy_reference_f64():
  tokens = _tokens(2)
  with jax.enable_x64(True):
    model, params = _f64_model()
    assert model.cfg.use_lower_bound and model.cfg.reset_at_doc_start
    logits, packed, alone = _forwards(model, (tokens,), (tokens, SEGMENTS), (tokens[:, CUT:],))
  assert logits.dtype == np.float64 and logits.shape == (2, SEQ, model.cfg.vocab_size)
  expected = _np_reference(params, model.cfg, tokens)
  scale = np.max(np.abs(expected))
  np.testing.assert_allclose(logits, expected, rtol=TOL, atol=TOL * scale)
  # the randomized lower bounds matter: without them the reference differs
  other = np_mmfree_forward(
    params, tokens, num_layers=2, eps=model.cfg.rms_norm_eps, use_lower_bound=False
  )
  assert np.max(np.abs(other - expected)) > 1e-3 * scale

  # Packed documents with reset_at_doc_start: the reference restarts the recurrence (f = 0)
  # at each document start ...
  expected_packed = _np_reference(params, model.cfg, tokens, segment_ids=SEGMENTS)
  np.testing.assert_allclose(packed, expected_packed, rtol=TOL, atol=TOL * scale)
  # ... so the second document's logits equal that document run alone,
  np.testing.assert_allclose(packed[:, CUT:], alone, rtol=TOL, atol=TOL * np.max(np.abs(alone)))
  # and the first document's equal the unpacked row's (nothing leaks backwards).
  np.testing.assert_allclose(packed[:, :CUT], logits[:, :CUT], rtol=TOL, atol=TOL * scale)
  # Without the reset the second document sees the first (so the check above can fail).
  assert np.max(np.abs(logits[:, CUT:] - alone)) > 1e-3 * np.max(np.abs(alone))


def test_mmfree_without_lower_bound_matches_numpy_reference_f64():
  tokens = _tokens(3)
  with jax.enable_x64(True):
    model, params = _f64_model(use_lower_bound=False)
    assert ("lower_bounds",) not in params
    (logits,) = _forwards(model, (tokens,))
  expected = _np_reference(params, model.cfg, tokens)
  scale = np.max(np.abs(expected))
  np.testing.assert_allclose(logits, expected, rtol=TOL, atol=TOL * scale)


def test_mmfree_reset_off_ignores_segments():
  # reset_at_doc_start=False reproduces the reference (no reset): segment ids then change
  # nothing, and the second document sees the first.
  tokens = _tokens(2)
  with jax.enable_x64(True):
    model, params = _f64_model(reset_at_doc_start=False)
    (packed,) = _forwards(model, (tokens, SEGMENTS))
  expected = _np_reference(params, model.cfg, tokens)  # no segment ids: no reset
  np.testing.assert_allclose(packed, expected, rtol=TOL, atol=TOL * np.max(np.abs(expected)))
  expected_reset = _np_reference(params, model.cfg, tokens, segment_ids=SEGMENTS)
  assert np.max(np.abs(expected_reset - expected)) > 1e-3 * np.max(np.abs(expected))


def test_transformer_second_document_equals_document_alone():
  # Positions restart at the document start and attention stays inside the document.
  # float64; tolerance 1e-9 relative to the logit scale.
  tokens = _tokens(4)
  with jax.enable_x64(True):
    model, _ = _f64_model(kind="transformer")
    packed, alone, unpacked = _forwards(model, (tokens, SEGMENTS), (tokens[:, CUT:],), (tokens,))
  scale = np.max(np.abs(alone))
  np.testing.assert_allclose(packed[:, CUT:], alone, rtol=TOL, atol=TOL * scale)
  np.testing.assert_allclose(packed[:, :CUT], unpacked[:, :CUT], rtol=TOL, atol=TOL * scale)
  assert np.max(np.abs(unpacked[:, CUT:] - alone)) > 1e-3 * scale  # unpacked: no isolation
