"""Numerics: pure functions on arrays, no parameters, no config (docs/architecture.md §2).

  dtypes.py           `acc_dtype`: the fp32 (f64 under x64) accumulation/statistics dtype
  quant.py            RMSNorm, int8 absmax activations, ternary weights, STE, `bitlinear`
  bitlinear.py        the `model.bitlinear_impl` registry (autodiff, lean custom_vjp, ...)
  recurrence.py       the `model.scan_type` registry for `h_t = f_t h_{t-1} + i_t`
  mlgru.py            the MLGRU gate and output formulas
  attention.py        RoPE, masks, attention (the numerics reference)
  ternary_packing.py  2-bit / base-3 ternary weight codes and the packed integer matvec
  loss.py             cross entropy, z-loss, perplexity
"""
