"""Ternary packing (2-bit and base-3): exact round trips, byte layout, the packed matvec, and
the packed decode path (`packed_model`) against the float model's decode.

Packed decoding accumulates `x_codes @ w_codes` exactly in integers and scales once; the float
model multiplies de-quantized values. In float64 the two agree to ~1e-15 relative (tolerance
1e-9 of the logit scale); in float32 to ~1e-6 on this tiny model (tolerance 1e-4: no int8
rounding decision flips for this seed; a flip would move a logit by ~1e-2 relative). All
storage formats give bit-identical logits (same integers, same scaling).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mmfree_jax
from mmfree_jax import ModelConfig
from mmfree_jax.nn import packed as packed_model
from mmfree_jax.numerics import quant
from mmfree_jax.numerics import ternary_packing as packing
from tests.perturb import perturb_params

PACKED = sorted(packing.PACKING_LAYOUTS)


def _random_codes(shape, seed=0):
  return np.random.default_rng(seed).integers(-1, 2, shape).astype(np.int8)


# ------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("fmt", PACKED)
def test_round_trip_every_group_value(fmt):
  k, _ = packing.PACKING_LAYOUTS[fmt]
  groups = np.array(list(itertools.product([-1, 0, 1], repeat=k)), np.int8)  # [3^k, k]
  packed = np.asarray(packing.pack_ternary(groups, fmt, axis=1))
  assert packed.dtype == np.uint8 and packed.shape == (3**k, 1)
  assert len(np.unique(packed)) == 3**k  # every group has its own byte
  np.testing.assert_array_equal(np.asarray(packing.unpack_ternary(packed, fmt, k, axis=1)), groups)


@pytest.mark.parametrize("fmt", PACKED)
@pytest.mark.parametrize("n", [7, 20])
@pytest.mark.parametrize("axis", [0, -1])
def test_round_trip_shapes_and_padding(fmt, n, axis):
  shape = [3, 5]
  shape[axis] = n
  codes = _random_codes(tuple(shape), seed=n)
  packed = packing.pack_ternary(codes, fmt, axis=axis)
  expected_shape = list(shape)
  expected_shape[axis] = packing.packed_length(n, fmt)
  assert packed.shape == tuple(expected_shape) and packed.dtype == jnp.uint8
  back = packing.unpack_ternary(packed, fmt, n, axis=axis)
  assert back.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(back), codes)


def test_byte_layout():
  # 2bit: digits c+1 at bits 2j; base3: digits c+1 times 3^j
  two_bit = packing.pack_ternary(np.array([-1, 0, 1, 1]), "2bit")
  assert int(two_bit[0]) == 0 + (1 << 2) + (2 << 4) + (2 << 6)
  assert int(packing.pack_ternary(np.array([-1, 0, 1, 1, 0]), "base3")[0]) == 3 + 18 + 54 + 81
  # padding is code 0 (digit 1)
  assert int(packing.pack_ternary(np.array([1]), "2bit")[0]) == 2 + (1 << 2) + (1 << 4) + (1 << 6)


def test_bits_per_weight_and_sizes():
  assert packing.bits_per_weight("2bit") == 2.0
  assert packing.bits_per_weight("base3") == 1.6
  codes = _random_codes((4000, 3))
  assert packing.pack_ternary(codes, "2bit").nbytes == 1000 * 3
  assert packing.pack_ternary(codes, "base3").nbytes == 800 * 3


def test_rejects_non_ternary_and_bad_format():
  with pytest.raises(ValueError, match="ternary codes"):
    packing.pack_ternary(np.array([0, 2, 1, 0]), "2bit")
  with pytest.raises(ValueError, match="unknown packing format"):
    packing.pack_ternary(np.array([0, 1, 1, 0]), "3bit")
  with pytest.raises(ValueError, match="need"):
    packing.unpack_ternary(np.zeros((3, 2), np.uint8), "2bit", 20)


# --------------------------------------------------------------------------------- matvec


@pytest.mark.parametrize("fmt", PACKED)
@pytest.mark.parametrize("method", packing.MATVEC_METHODS)
@pytest.mark.parametrize("n_in", [16, 37])
def test_packed_matvec_exact(fmt, method, n_in):
  rng = np.random.default_rng(n_in)
  codes = _random_codes((n_in, 24), seed=1)
  x = rng.integers(-128, 128, (3, n_in)).astype(np.int8)
  x[0] = 127  # extremes: the largest partial sums
  x[1] = -128
  packed = packing.pack_ternary(codes, fmt, axis=0)
  got = jax.jit(functools.partial(packing.packed_matvec, fmt=fmt, n_in=n_in, method=method))(
    jnp.asarray(x), packed
  )
  np.testing.assert_array_equal(
    np.asarray(got).astype(np.int64), x.astype(np.int64) @ codes.astype(np.int64)
  )


@pytest.mark.parametrize("fmt", PACKED)
@pytest.mark.parametrize("chunk", [1, 2, 3, 8])
def test_packed_matvec_lut_blocks(fmt, chunk):
  """The LUT sums the groups in blocks of at most `chunk` groups (then a smaller remainder):
  exact for every block size, with and without a remainder."""
  n_in, rows, n_out = 37, 3, 24  # 10 groups of 4 (2bit), 8 of 5 (base3)
  groups = packing.packed_length(n_in, fmt)
  chunk_bytes = chunk * rows * n_out * 4
  got = packing._block_size(rows, groups, n_out, chunk_bytes)
  steps = -(-groups // got)
  assert got <= chunk and steps == -(-groups // chunk) and 0 <= steps * got - groups < steps
  rng = np.random.default_rng(chunk)
  codes = _random_codes((n_in, n_out), seed=chunk)
  x = rng.integers(-128, 128, (rows, n_in)).astype(np.int8)
  x[0] = 127
  packed = packing.pack_ternary(codes, fmt, axis=0)
  got = jax.jit(
    functools.partial(packing.packed_matvec, fmt=fmt, n_in=n_in, chunk_bytes=chunk_bytes)
  )(jnp.asarray(x), packed)
  np.testing.assert_array_equal(
    np.asarray(got).astype(np.int64), x.astype(np.int64) @ codes.astype(np.int64)
  )


@pytest.mark.parametrize("fmt", PACKED)
@pytest.mark.parametrize("cols", [1, 5, 24, 100])
def test_unpacked_matmul_blocks_and_stacked_layers(fmt, cols):
  """The prefill product unpacks a block of `cols` output columns at a time (then a smaller
  remainder), from one layer of stacked codes: exact against numpy for every block size."""
  n_in, rows, n_out, layers = 37, 20, 24, 3
  block_bytes = cols * 4 * n_in
  rng = np.random.default_rng(cols)
  codes = np.stack([_random_codes((n_in, n_out), seed=cols + l) for l in range(layers)])
  x = rng.integers(-128, 128, (rows, n_in)).astype(np.int8)
  packed = jnp.stack([packing.pack_ternary(c, fmt, axis=0) for c in codes])
  product = jax.jit(
    functools.partial(packing.unpacked_matmul, fmt=fmt, n_in=n_in, block_bytes=block_bytes)
  )
  for layer in range(layers):
    got = product(jnp.asarray(x), packed, layer=jnp.int32(layer))
    np.testing.assert_array_equal(
      np.asarray(got).astype(np.int64), x.astype(np.int64) @ codes[layer].astype(np.int64)
    )
  got = product(jnp.asarray(x), packed[1])  # one unstacked matrix
  np.testing.assert_array_equal(
    np.asarray(got).astype(np.int64), x.astype(np.int64) @ codes[1].astype(np.int64)
  )


def test_unpacked_matmul_holds_one_block_of_fp32_codes():
  """Compiled temporaries of the prefill product stay near one block of fp32 codes: unpacked
  whole, the 2.7B's gate_proj held ~0.3 GB (int32 digits and fp32 codes)."""
  fmt, rows, n_in, n_out = "2bit", 32, 256, 4096
  full_fp32 = 4 * n_in * n_out

  def temp(block_bytes):
    compiled = (
      jax.jit(
        functools.partial(packing.unpacked_matmul, fmt=fmt, n_in=n_in, block_bytes=block_bytes)
      )
      .lower(
        jax.ShapeDtypeStruct((rows, n_in), jnp.int8),
        jax.ShapeDtypeStruct((packing.packed_length(n_in, fmt), n_out), jnp.uint8),
      )
      .compile()
    )
    return compiled.memory_analysis().temp_size_in_bytes

  assert temp(full_fp32 // 16) < 0.25 * full_fp32 <= temp(full_fp32)


def test_packed_matvec_lut_does_not_copy_the_codes():
  """A remainder block must not pad (copy) the codes: XLA:CPU runs that weight-only copy for
  every layer ahead of the first, so a 2-bit 2.7B decode held 0.65 GB of padded codes (0.009
  without). Compiled temporaries stay under half the codes' bytes (a copy is all of them)."""
  fmt, rows, n_in, n_out = "2bit", 1, 200, 16384  # 50 groups; blocks of 3: 16 + remainder 2
  chunk_bytes = 3 * rows * n_out * 4
  assert packing._block_size(rows, 50, n_out, chunk_bytes) == 3
  packed = jax.ShapeDtypeStruct((packing.packed_length(n_in, fmt), n_out), jnp.uint8)
  compiled = (
    jax.jit(functools.partial(packing.packed_matvec, fmt=fmt, n_in=n_in, chunk_bytes=chunk_bytes))
    .lower(jax.ShapeDtypeStruct((rows, n_in), jnp.int8), packed)
    .compile()
  )
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < 0.5 * 50 * n_out, temp


def _numpy_planes(codes: np.ndarray) -> np.ndarray:
  """Independent reference of `to_planes`: each column's +1 / -1 masks packed
  little-endian (numpy's packbits), 4 bytes to a word."""
  n_in, n_out = codes.shape
  words = -(-n_in // 32)
  out = np.zeros((2, n_out, words), np.uint32)
  for plane, value in enumerate((1, -1)):
    mask = np.zeros((n_out, words * 32), bool)
    mask[:, :n_in] = (codes == value).T
    out[plane] = np.packbits(mask, axis=-1, bitorder="little").view("<u4")
  return out


@pytest.mark.parametrize("n_in", [5, 32, 37, 100])
def test_to_planes_layout(n_in):
  codes = _random_codes((n_in, 7), seed=n_in)
  np.testing.assert_array_equal(np.asarray(packing.to_planes(codes)), _numpy_planes(codes))
  for fmt in PACKED:  # the loader's conversion from the stored bytes
    np.testing.assert_array_equal(
      np.asarray(packing.packed_to_planes(packing.pack_ternary(codes, fmt), fmt, n_in)),
      _numpy_planes(codes),
    )


@pytest.mark.parametrize("cols", [1, 5, 24])
@pytest.mark.parametrize("rows", [1, 3])
def test_planes_matvec_exact_in_blocks_and_stacked(cols, rows):
  """Exact for any block of output columns (with and without a remainder), at the int8
  extremes, on a stack of layers read at a traced index."""
  n_in, n_out = 100, 24  # 4 words, the last one part padding
  rng = np.random.default_rng(cols + rows)
  codes = [_random_codes((n_in, n_out), seed=s) for s in range(3)]
  x = rng.integers(-128, 128, (rows, n_in)).astype(np.int8)
  x[0, :50], x[0, 50:] = 127, -128
  planes = jnp.stack([jnp.asarray(_numpy_planes(c)) for c in codes])
  chunk = cols * rows * 4 * 4
  assert packing._block_size(rows, n_out, 4, chunk) == cols
  matvec = jax.jit(functools.partial(packing.planes_matvec, n_in=n_in, chunk_bytes=chunk))
  for layer in range(3):
    got = matvec(jnp.asarray(x), planes, layer=jnp.int32(layer))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(
      np.asarray(got).astype(np.int64), x.astype(np.int64) @ codes[layer].astype(np.int64)
    )


# ---------------------------------------------------------------------------- packed model


def _model(dtype):
  # d=72 and I=200: neither divisible by 5, so base-3 padding is exercised.
  cfg = ModelConfig.tiny(dtype=dtype, param_dtype=dtype, d_model=72, intermediate_size=200)
  return perturb_params(mmfree_jax.build_model(cfg, 0))


_TOKENS = np.random.default_rng(2).integers(0, 256, (2, 4)).astype(np.int32)


def _decode_all(step, state):
  out = []
  for t in range(_TOKENS.shape[1]):
    logits, state = step(jnp.asarray(_TOKENS[:, t : t + 1]), state)
    out.append(np.asarray(logits))
  return np.concatenate(out, axis=1), state


def _packed_logits(model, fmt, method="lut"):
  params, spec = packed_model.export_packed(model, fmt, method)
  step = jax.jit(functools.partial(packed_model.decode, spec=spec))
  return _decode_all(lambda t, s: step(params, t, s), packed_model.init_state(spec, 2))


def _model_logits(model):
  step = nnx.jit(mmfree_jax.decode)
  return _decode_all(lambda t, s: step(model, t, s), model.init_state(2))


@pytest.mark.slow
def test_packed_decode_equals_model_decode_f64():
  with jax.enable_x64(True):
    model = _model("float64")
    expected, expected_state = _model_logits(model)
    scale = np.max(np.abs(expected))
    for fmt, method in [("2bit", "lut"), ("base3", "lut"), ("2bit", "popcount")]:
      got, state = _packed_logits(model, fmt, method)
      assert got.shape == expected.shape == (2, 4, 256)
      np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9 * scale, err_msg=fmt)
      np.testing.assert_allclose(
        np.asarray(state.h), np.asarray(expected_state.h), rtol=1e-9, atol=1e-9
      )


@pytest.mark.slow
def test_packed_decode_fp32_all_formats_identical_and_close_to_model():
  model = _model("float32")
  expected, _ = _model_logits(model)
  reference, _ = _packed_logits(model, "float32")
  assert reference.dtype == np.float32
  scale = np.max(np.abs(expected))
  np.testing.assert_allclose(reference, expected, rtol=1e-4, atol=1e-4 * scale)
  for fmt, method in [
    ("2bit", "lut"),
    ("base3", "unpack"),
    ("bfloat16", "lut"),
    ("2bit", "popcount"),
    ("base3", "popcount"),
  ]:
    got, _ = _packed_logits(model, fmt, method)
    np.testing.assert_array_equal(got, reference, err_msg=f"{fmt}/{method}")


def test_export_stores_codes_and_mean_abs_scale():
  model = _model("float32")
  params, spec = packed_model.export_packed(model, "2bit", "lut")
  layers = model.cfg.num_layers
  assert spec.fmt == "2bit" and params.blocks.gate_proj.w.shape == (layers, 18, 400)
  planes, _ = packed_model.export_packed(model, "2bit")  # the default method: bit planes
  assert planes.blocks.gate_proj.w.shape == (layers, 2, 400, 3)  # 72 inputs: 3 words
  # 2 bits per weight, each column's inputs padded to whole 32-bit words (d=72 -> 96)
  shapes = [(72, 72)] * 4 * layers + [(72, 400), (200, 72)] * layers + [(72, 256)]
  assert packed_model.bitlinear_weight_bytes(planes, include_scales=False) == sum(
    2 * n_out * 4 * -(-n_in // 32) for n_in, n_out in shapes
  )
  assert len(packed_model.export_packed(model, "int8")[0].blocks) == layers  # unrolled
  kernel = np.asarray(model.blocks.mlp.gate_proj.kernel[...][1])  # layer 1, [72, 400]
  lin = jax.tree.map(lambda a: a[1], params.blocks.gate_proj)  # stacked: layer 1
  assert lin.w.dtype == jnp.uint8 and lin.w.shape == (18, 400)
  codes, _ = quant.quantize_weights_ternary(jnp.asarray(kernel))
  np.testing.assert_array_equal(
    np.asarray(packing.unpack_ternary(lin.w, "2bit", 72)), np.asarray(codes)
  )
  np.testing.assert_allclose(float(lin.scale), np.mean(np.abs(kernel)), rtol=1e-6)
  # all BitLinear weights at <= 2 bits each (+ one fp32 scale per matrix)
  n_weights = sum(
    np.prod(x.shape)
    for path, x in jax.tree_util.tree_leaves_with_path(
      nnx.to_pure_dict(nnx.state(model, nnx.Param))
    )
    if getattr(path[-1], "key", "") == "kernel"
  )
  n_matrices = 6 * model.cfg.num_layers + 1
  assert packed_model.bitlinear_weight_bytes(params) <= n_weights * 2 / 8 + 4 * n_matrices + 64 * 8


def test_export_errors():
  with pytest.raises(TypeError, match="MatMulFreeLM"):
    packed_model.export_packed(mmfree_jax.build_model(ModelConfig.tiny(kind="transformer")))
  model = mmfree_jax.build_model(ModelConfig.tiny())
  with pytest.raises(ValueError, match="unknown packed format"):
    packed_model.export_packed(model, "4bit")
  with pytest.raises(ValueError, match="unknown matvec"):
    packed_model.export_packed(model, "2bit", "simd")


@pytest.mark.slow
def test_popcount_decode_reads_the_planes_in_place():
  """The decode step's layer scan reads each layer's planes where they lie: its compiled
  temporaries stay under half of one layer's gate_proj planes. A copy of the stack (as padding
  the words would make, checked: 9.5x a layer's planes) or of a layer fails this."""
  cfg = ModelConfig.tiny(dtype="float32", d_model=512, num_layers=4, vocab_size=256)
  params, spec = packed_model.export_packed(mmfree_jax.build_model(cfg, 0), "2bit", "popcount")
  compiled = (
    jax.jit(functools.partial(packed_model.decode, spec=spec))
    .lower(params, jnp.zeros((1, 1), jnp.int32), packed_model.init_state(spec, 1))
    .compile()
  )
  layer_bytes = params.blocks.gate_proj.w[0].nbytes
  assert compiled.memory_analysis().temp_size_in_bytes < 0.5 * layer_bytes


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lut", "popcount"])
def test_prefill_unpacks_one_layer_at_a_time(method):
  """A prefill past `LUT_MAX_ROWS[fmt]` rows unpacks the codes to fp32 (a block at a time).
  XLA:CPU used to unpack every layer's up front and hold them all (~10 GB for the 2.7B):
  compiled temporaries must stay well under all layers' fp32 codes (1.03x of them with the
  layers unrolled; about one layer's in the layer scan: 0.2x here)."""
  layers = 6
  cfg = ModelConfig.tiny(dtype="float32", d_model=256, num_layers=layers, vocab_size=256)
  params, spec = packed_model.export_packed(mmfree_jax.build_model(cfg, 0), "2bit", method)
  rows = 4 * packed_model.LUT_MAX_ROWS["2bit"]
  compiled = (
    jax.jit(functools.partial(packed_model.forward, spec=spec))
    .lower(params, jnp.zeros((1, rows), jnp.int32))
    .compile()
  )
  temp = compiled.memory_analysis().temp_size_in_bytes
  names = ("i_proj", "f_proj", "g_proj", "o_proj", "gate_proj", "down_proj")
  n_out = lambda n: getattr(params.blocks, n).w.shape[-1 if method == "lut" else -2]
  fp32_codes = [
    4 * layers * n_out(n) * (cfg.intermediate_size if n == "down_proj" else cfg.d_model)
    for n in names
  ]
  assert temp < 0.5 * sum(fp32_codes), (temp, fp32_codes)


@pytest.mark.parametrize("fmt", ["2bit", "int8", "frozen", "latent_scale"])
def test_packed_model_holds_its_tensors_as_exported(fmt):
  """`PackedLM(params, spec).packed_params()` gives back the exported tensors, leaf for leaf,
  for a stacked and a per-layer code format and both frozen formats; the frozen ones record
  the resolved impl whose product they run ('auto' is lean on CPU)."""
  cfg = ModelConfig.tiny(vocab_size=97, d_model=32, num_layers=2, bitlinear_impl="auto")
  model = perturb_params(mmfree_jax.build_model(cfg, 0))  # norms and bounds differ
  params, spec = packed_model.export_packed(model, fmt, "lut")
  got = packed_model.PackedLM(params, spec).packed_params()
  assert jax.tree.structure(got) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert spec.method == ("lean" if fmt in packed_model.FROZEN_FORMATS else "lut")
