"""Pallas kernels for accelerators, each tested against its pure-JAX reference in `numerics/`.

Kernels import `numerics` (formulas, constants, dtypes), `parallel.kernel_sharding` (shard_map)
and `registry` (platform names), never `ops/`: the registries in `ops/` call them.

  recurrence_gpu.py   h_t = f_t h_{t-1} + i_t, Triton (fla's fused recurrent shape)
  recurrence_tpu.py   the same, Mosaic (time blocks on a sequential grid axis, VMEM state)
  bitlinear_quant.py  fused RMSNorm + per-token int8 absmax (GPU and TPU), 'fused' BitLinear
  dispatch.py         platform names ('gpu', 'tpu', 'cpu') and the entry points the registries
                      in `ops.recurrence` / `ops.bitlinear` call
  common.py           supported dtypes, the one-line fallback warning, compiled-or-interpreted

Every kernel takes `interpret`: None (default) compiles it when the program is lowered for its
platform (also AOT for a TPU topology from a CPU host) and runs Pallas' interpreter elsewhere.
"""
