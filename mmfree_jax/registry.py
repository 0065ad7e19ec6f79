"""The names of every registry's choices, and how `auto` resolves on a platform; no jax here.

The config validates against these names, the CLIs offer them as flag choices, and the
registries that dispatch (`ops.recurrence.IMPLS`, `ops.bitlinear.IMPLS`, `ops.attention`,
`numerics.ternary_packing`) are keyed by them (tests/test_architecture.py checks both sides
agree). This module imports nothing from jax or from the rest of the package, so that
`import mmfree_jax.config` does not import the Pallas kernels, and a CLI can list its choices
before jax starts.

A platform is 'gpu' (Triton kernels), 'tpu' (Mosaic kernels) or 'cpu' (no kernel: the pure-JAX
paths), as `kernels.dispatch.platform_of` names a JAX backend.
"""

from __future__ import annotations

KERNEL_PLATFORMS = ("gpu", "tpu")

# `model.scan_type`: the MLGRU recurrence (ops/recurrence.py).
SCAN_TYPES = ("sequential", "associative", "chunked", "sequential_custom_vjp", "pallas", "auto")
# `model.bitlinear_impl`: BitLinear (ops/bitlinear.py).
BITLINEAR_IMPLS = ("autodiff", "lean", "int8", "fused", "auto")
# `model.attention_impl`: how the Transformer++ runs softmax attention (ops/attention.py).
#   auto    on a TPU the splash kernel for training windows of fp32/bf16 and at least
#           SPLASH_MIN_SEQ tokens; on a GPU cuDNN flash attention when it takes the inputs
#           (bf16/fp16, head_dim a multiple of 8 up to 128); XLA's attention
#           (`jax.nn.dot_product_attention`) elsewhere; the naive path for float64 (jax.nn's
#           softmax runs in fp32)
#   xla     `jax.nn.dot_product_attention(implementation='xla')`
#   cudnn   `jax.nn.dot_product_attention(implementation='cudnn')` (GPU only)
#   splash  the Pallas splash attention kernel (`kernels.attention_tpu`; TPU: compiled, CPU:
#           interpreted, for tests; GPU: XLA's with a warning). Training windows only: the
#           KV-cache path runs XLA's
#   naive   `numerics.attention.dot_product_attention`: the numerics reference of the tests
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash", "naive")
# One 128-token block: a shorter window has no masked block to skip, and padding it to a
# block would mostly compute padding, so `auto` leaves it to XLA.
SPLASH_MIN_SEQ = 128
# The packed integer matvec (`eval.py --packed_method`, numerics/ternary_packing.py):
# popcount holds the codes as bit planes; lut reads the stored bytes through a lookup table;
# unpack expands them to int8 codes.
MATVEC_METHODS = ("lut", "unpack", "popcount")
DEFAULT_MATVEC_METHOD = "popcount"
# `python -m mmfree_jax.export --format` and `--embedding_dtype` (export/layout.py): the code
# formats the CLI writes (loading reads every `nn.packed.CODE_FORMATS`) and the stored
# embedding dtypes.
EXPORT_FORMATS = ("2bit", "base3", "int8")
EMBEDDING_DTYPES = ("bfloat16", "float32", "float64", "int8")


def resolve_scan_type(scan_type: str, platform: str) -> str:
  """The implementation `scan_type` names on `platform`: `auto` is `pallas` on gpu/tpu and
  `sequential` on cpu (the fastest there, benchmarks/RESULTS.md); every other name stands for
  itself."""
  if scan_type == "auto":
    return "pallas" if platform in KERNEL_PLATFORMS else "sequential"
  return scan_type


def native_scan_types(platform: str) -> tuple[str, ...]:
  """The distinct implementations worth running (timing, comparing) on `platform`: all but the
  alias `auto`, and `pallas` only on gpu/tpu (on cpu it is Pallas' interpreter)."""
  return tuple(
    t for t in SCAN_TYPES if t != "auto" and (t != "pallas" or platform in KERNEL_PLATFORMS)
  )


def resolve_bitlinear_impl(impl: str, platform: str) -> str:
  """The implementation `impl` names on `platform`: `auto` is `fused` on gpu/tpu and `lean` on
  cpu (there is no CPU kernel; lean is the CPU benchmarks' choice); other names stand for
  themselves."""
  if impl == "auto":
    return "fused" if platform in KERNEL_PLATFORMS else "lean"
  return impl


def native_bitlinear_impls(platform: str) -> tuple[str, ...]:
  """The distinct implementations worth running (timing, comparing) on `platform`: all but
  the alias `auto`, and `fused` only on gpu/tpu (on cpu it is Pallas' interpreter)."""
  return tuple(
    b for b in BITLINEAR_IMPLS if b != "auto" and (b != "fused" or platform in KERNEL_PLATFORMS)
  )


def resolve_attention_impl(
  impl: str, dtype_name: str, head_dim: int, *, platform: str, seq: int | None = None
) -> str:
  """The implementation `impl` names (see ATTENTION_IMPLS) for inputs of dtype `dtype_name`
  ('float32', 'bfloat16', ...) and `head_dim` on `platform`; `seq` None: a training window of
  any length."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"unknown model.attention_impl {impl!r}; choose one of {ATTENTION_IMPLS}")
  if impl != "auto":
    return impl
  if dtype_name == "float64":
    return "naive"
  if (
    platform == "tpu"
    and dtype_name in ("float32", "bfloat16")
    and (seq is None or seq >= SPLASH_MIN_SEQ)
  ):
    return "splash"
  if (
    platform == "gpu"
    and dtype_name in ("bfloat16", "float16")
    and head_dim % 8 == 0
    and head_dim <= 128
  ):
    return "cudnn"
  return "xla"
