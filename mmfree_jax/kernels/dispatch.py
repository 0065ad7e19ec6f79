"""Which kernel runs where: the platform names, and the sharded entry points the registries
in `ops.recurrence` and `ops.bitlinear` call.

Platforms are 'gpu' (Triton kernels), 'tpu' (Mosaic kernels) and 'cpu' (no kernel: the pure-JAX
paths). `platform_of` maps a JAX backend or device platform ('cuda', 'rocm', 'tpu', 'cpu') to
one of them, so a model can be resolved for the devices of its mesh, including an AOT target
(TPU topology devices on a CPU host).
"""

from __future__ import annotations

import jax

from mmfree_jax.kernels import bitlinear_quant
from mmfree_jax.kernels import recurrence_gpu
from mmfree_jax.kernels import recurrence_tpu
from mmfree_jax.kernels import sharding

KERNEL_PLATFORMS = ("gpu", "tpu")
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


def _check(platform: str) -> None:
  if platform not in KERNEL_PLATFORMS:
    raise ValueError(f"kernel platform must be one of {KERNEL_PLATFORMS}; got {platform!r}")


def recurrence(f, i, initial_state=None, *, platform: str, interpret=None):
  """`h_t = f_t h_{t-1} + i_t` with the `platform` kernel, per shard under
  `sharding.kernel_sharding`. Shapes as in `ops.recurrence`; `interpret` as in the kernels
  (None: compiled when lowered for the platform, interpreted elsewhere)."""
  _check(platform)
  if platform == "gpu":
    fn = lambda f, i, h0: recurrence_gpu.recurrence_gpu(f, i, h0, interpret=interpret)
  else:
    fn = lambda f, i, h0: recurrence_tpu.recurrence_tpu(f, i, h0, interpret=interpret)
  return sharding.recurrence(fn, f, i, initial_state)


def bitlinear(x, kernel, norm_scale, *, eps, dtype=None, platform: str, interpret=None):
  """The 'fused' BitLinear (`bitlinear_quant.bitlinear_fused`) for `platform`."""
  _check(platform)
  return bitlinear_quant.bitlinear_fused(x, kernel, norm_scale, eps=eps, dtype=dtype,
                                         platform=platform, interpret=interpret)
