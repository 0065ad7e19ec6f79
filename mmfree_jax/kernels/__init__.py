"""Pallas kernels for accelerators, each tested against its pure-JAX reference in `ops/`.

  recurrence_gpu.py   h_t = f_t h_{t-1} + i_t, Triton (fla's fused recurrent shape)
  recurrence_tpu.py   the same, Mosaic (time blocks on a sequential grid axis, VMEM state)
  bitlinear_quant.py  fused RMSNorm + per-token int8 absmax (GPU and TPU), 'fused' BitLinear
  sharding.py         shard_map wrappers: the kernels under a data/fsdp/tensor mesh
  dispatch.py         platform names ('gpu', 'tpu', 'cpu') and the entry points the registries
                      in `ops.recurrence` / `ops.bitlinear` call
  common.py           supported dtypes, the one-line fallback warning, compiled-or-interpreted

Every kernel takes `interpret`: None (default) compiles it when the program is lowered for its
platform (also AOT for a TPU topology from a CPU host) and runs Pallas' interpreter elsewhere.
"""
