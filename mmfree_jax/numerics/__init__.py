"""Numerics: pure functions on arrays, no parameters, no config, no kernels
(docs/architecture.md §2). Everything above (kernels, registries, layers) computes with these.

  dtypes.py           `acc_dtype`: the fp32 (f64 under x64) accumulation/statistics dtype
  quant.py            RMSNorm, int8 absmax activations, ternary weights, STE, `bitlinear`
  recurrence.py       `h_t = f_t h_{t-1} + i_t` in pure JAX: sequential, associative, chunked,
                      custom-vjp (the references of the Pallas recurrence kernels)
  attention.py        RoPE, masks, naive softmax attention (the reference), KV-cache attention
  mlgru.py            the MLGRU gate and output formulas
  ternary_packing.py  2-bit / base-3 ternary weight codes and the packed integer matvec
  loss.py             cross entropy, z-loss, perplexity
  distill_loss.py     the distillation losses (KL on logits, hidden-state MSE)
"""
