"""Which kernel runs where: the platform names and how the registries in `ops.recurrence` and
`ops.bitlinear` resolve them, and the sharded recurrence and attention entry points.

Platforms are 'gpu' (Triton kernels), 'tpu' (Mosaic kernels) and 'cpu' (no kernel: the pure-JAX
paths). `platform_of` maps a JAX backend or device platform ('cuda', 'rocm', 'tpu', 'cpu') to
one of them, so a model can be resolved for the devices of its mesh, including an AOT target
(TPU topology devices on a CPU host).
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings

import jax

from mmfree_jax import registry
from mmfree_jax.kernels import attention_tpu, common, recurrence_gpu, recurrence_tpu
from mmfree_jax.parallel import kernel_sharding

KERNEL_PLATFORMS = registry.KERNEL_PLATFORMS
_GPU_BACKENDS = ("gpu", "cuda", "rocm")


def platform_of(backend: str) -> str:
  """'gpu', 'tpu' or 'cpu' for a JAX backend / device platform name."""
  backend = backend.lower()
  if backend in _GPU_BACKENDS:
    return "gpu"
  if backend == "tpu":
    return "tpu"
  return "cpu"


def default_platform() -> str:
  """The platform of `jax.default_backend()` (the devices a plain `jax.jit` runs on)."""
  return platform_of(jax.default_backend())


_OVERRIDE: contextvars.ContextVar = contextvars.ContextVar("mmfree_kernel_platform", default=None)


@contextlib.contextmanager
def kernel_platform(platform: str, interpret=None):
  """Kernels traced inside the block are those of `platform` ('gpu' or 'tpu'), whatever the
  backend: on a CPU backend they run interpreted (tests); lowered for that platform, compiled.
  `interpret` (True / "tpu") forces the interpreter, which also takes float64 (f64 tests)."""
  _check(platform)
  token = _OVERRIDE.set((platform, interpret))
  try:
    yield
  finally:
    _OVERRIDE.reset(token)


def current_platform() -> str:
  """The platform kernels are traced for: a `kernel_platform` override, else the devices of the
  `parallel.kernel_sharding` mesh, active or suspended inside its shard_map (TPU topology
  devices for an AOT compile from a CPU host), else `jax.default_backend()`."""
  override = _OVERRIDE.get()
  if override is not None:
    return override[0]
  mesh = kernel_sharding.mesh()  # also inside a context shard_map (`suspended()`)
  if mesh is not None:
    return platform_of(mesh.devices.flat[0].platform)
  return default_platform()


def kernel_platform_or_interpret(what: str) -> str:
  """`current_platform()` when it has kernels; on CPU the TPU kernels, interpreted, with a
  warning (Pallas' interpreter is for tests: `auto` picks the pure-JAX paths on CPU)."""
  platform = current_platform()
  if platform in KERNEL_PLATFORMS:
    return platform
  warnings.warn(
    f"{what}: no Pallas kernel for the {platform} backend; running the TPU kernel "
    "in Pallas interpret mode (slow, meant for tests; 'auto' picks the pure-JAX "
    "implementation on CPU)",
    common.KernelFallbackWarning,
    stacklevel=3,
  )
  return "tpu"


def interpret_mode(interpret=None):
  """An explicit `interpret`, else the `kernel_platform` block's, else None (decided when
  lowering)."""
  if interpret is not None:
    return interpret
  override = _OVERRIDE.get()
  return None if override is None else override[1]


def _check(platform: str) -> None:
  if platform not in KERNEL_PLATFORMS:
    raise ValueError(f"kernel platform must be one of {KERNEL_PLATFORMS}; got {platform!r}")


def recurrence(f, i, initial_state=None, *, platform: str, interpret=None, fallback=None):
  """`h_t = f_t h_{t-1} + i_t` with the `platform` kernel, per shard under
  `parallel.kernel_sharding`. Shapes as in `ops.recurrence`; `interpret` and `fallback` as in
  the kernels (interpret None: compiled when lowered for the platform, interpreted elsewhere,
  or as a `kernel_platform` block says)."""
  _check(platform)
  interpret = interpret_mode(interpret)
  kernel = recurrence_gpu.recurrence_gpu if platform == "gpu" else recurrence_tpu.recurrence_tpu
  fn = lambda f, i, h0: kernel(f, i, h0, interpret=interpret, fallback=fallback)
  return kernel_sharding.recurrence(fn, f, i, initial_state)


def attention(
  q, k, v, segment_ids=None, *, interpret=None, fallback=None, kv_segment_ids=None, q_offset=0
):
  """Causal (segment-masked) attention with the TPU splash kernel (`kernels.attention_tpu`),
  per shard under `parallel.kernel_sharding` (batch and heads split). Shapes as in
  `ops.attention.causal_attention`; inputs the kernel cannot take run `fallback(q, k, v,
  segment_ids)` on the whole arrays with a one-line warning (a ValueError without one).
  `kv_segment_ids`, `q_offset`: a chunk of queries against the window's keys up to its end
  (`attention_tpu.splash_attention`; inside `parallel.context_attention`'s shard_map)."""
  interpret = interpret_mode(interpret)
  reason = attention_tpu.unsupported(q, k, v, segment_ids, q_offset)
  if reason is not None:
    return common.fall_back("splash attention", reason, fallback, q, k, v, segment_ids)
  fn = lambda q, k, v, s: attention_tpu.splash_attention(
    q, k, v, s, interpret=interpret, kv_segment_ids=kv_segment_ids, q_offset=q_offset
  )
  return kernel_sharding.attention(fn, q, k, v, segment_ids)
