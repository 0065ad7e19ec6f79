"""Registries: the functions behind each `model.*_impl` / `scan_type` name, dispatching between
the pure-JAX numerics (`numerics/`) and the Pallas kernels (`kernels/`) for the platform. The
names themselves are `registry` (jax-free), which the config validates against.

  bitlinear.py        `model.bitlinear_impl`: autodiff, lean custom_vjp, int8, fused, auto;
                      and the frozen (quantize-once) forward for inference
  recurrence.py       `model.scan_type`: the pure-JAX scans, pallas, auto
  attention.py        `model.attention_impl`: splash kernel, cuDNN / XLA, naive, auto
"""
