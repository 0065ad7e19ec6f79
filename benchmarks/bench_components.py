"""Where a train step's time goes, by component: MatMul-free vs Transformer++ at one small
shape (default d=256, L=4, T=128, B=16, vocab 4096).

    python -m benchmarks.bench_components [--preset toy|cpu|accel]

Each component is timed as forward+backward (grad of sum(y * cotangent)) on the step's
activation shapes, all components and both full train steps round-robin in one run:

    BitLinear (autodiff / lean) vs Dense for each projection shape (d->d, d->2I, I->d, head)
    RMSNorm, the recurrence (each scan_type), the MLGRU gate arithmetic, softmax attention

`estimate` sums the components with their per-step counts; `other` = measured step -
estimate (embedding, loss, optimizer, scan-over-layers bookkeeping, fusion differences).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, setups
from mmfree_jax import registry
from mmfree_jax.kernels import dispatch
from mmfree_jax.numerics import attention as attention_ref
from mmfree_jax.numerics import quant
from mmfree_jax.ops import bitlinear as bitlinear_lean
from mmfree_jax.ops import recurrence

NAME = "bench_components"

SHAPE = {
  "toy": (64, 2, 32, 4, 256),
  "cpu": (256, 4, 128, 16, 4096),
  "accel": (1024, 24, 2048, 8, 32000),
}
ROUNDS = {"toy": 2, "cpu": 7, "accel": 10}


def _fwd_bwd(fn, *args):
  """Jitted grad of sum(fn(*args) * cotangent) w.r.t. all args; returns a thunk."""
  out = jax.eval_shape(fn, *args)
  ct = jnp.asarray(np.random.default_rng(0).normal(size=out.shape), out.dtype)
  g = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * ct), argnums=tuple(range(len(args)))))
  return functools.partial(g, *args)


def _summarize(
  ms: dict, components: list, steps: list, counts_mm: dict, counts_tf: dict
) -> tuple[list, dict]:
  """Per-component rows, and each step against the sum of its counted components."""
  rows = [
    {
      "component": k,
      "ms": ms[k],
      "count_mmfree": counts_mm.get(k, 0),
      "count_transformer": counts_tf.get(k, 0),
    }
    for k in components
  ]
  est_mm = sum(ms[k] * c for k, c in counts_mm.items())
  est_mm_lean = est_mm + sum(
    (ms[k.replace("bitlinear", "bitlinear_lean")] - ms[k]) * c
    for k, c in counts_mm.items()
    if k.startswith("bitlinear ")
  )
  est_tf = sum(ms[k] * c for k, c in counts_tf.items())
  estimates = {"mmfree": est_mm, "mmfree_lean": est_mm_lean, "transformer": est_tf}
  summary = {
    "step_ms": {k: ms[k] for k in steps},
    "estimate_ms": estimates,
    "other_ms": {k: ms[f"step {k}"] - v for k, v in estimates.items() if f"step {k}" in ms},
    "over_transformer": {
      k: ms[f"step {k}"] / ms["step transformer"]
      for k in estimates
      if f"step {k}" in ms and k != "transformer"
    },
  }
  return rows, summary


def _ones(k: int) -> jax.Array:
  """An RMSNorm gain of ones, `[k]` fp32."""
  return jnp.ones((k,), jnp.float32)


def _projection_fns(arr, n: int, d: int, inter: int, vocab: int, num_layers: int):
  """Forward + backward of each projection shape of `n` tokens as BitLinear (autodiff and
  lean) and dense. `arr(*shape, s=)` draws fp32 normals. Returns (fns, the MatMul-free LM's
  and the Transformer++'s count of each per step)."""
  proj_shapes = {
    "d->d": (d, d),
    "d->2I": (d, 2 * inter),
    "I->d": (inter, d),
    "head d->V": (d, vocab),
  }
  fns, counts_mm, counts_tf = {}, {}, {}
  per_layer = {"d->d": 4, "d->2I": 1, "I->d": 1}
  for label, (din, dout) in proj_shapes.items():
    x, w = arr(n, din), arr(din, dout, s=0.02)
    count = 1 if label.startswith("head") else num_layers * per_layer[label]
    fns[f"bitlinear {label}"] = _fwd_bwd(quant.bitlinear, x, w, _ones(din))
    fns[f"bitlinear_lean {label}"] = _fwd_bwd(bitlinear_lean.bitlinear_lean, x, w, _ones(din))
    fns[f"dense {label}"] = _fwd_bwd(lambda x, w: x @ w, x, w)
    counts_mm[f"bitlinear {label}"] = count
    counts_tf[f"dense {label}"] = count
  return fns, counts_mm, counts_tf


def _step_runners(preset: str, d: int, num_layers: int, vocab: int, batch: int, seq: int) -> dict:
  """Compiled full train steps (MatMul-free autodiff / lean BitLinear, Transformer++) by name;
  none at the toy preset."""
  steps = {}
  step_variants = [
    ("step mmfree", "mmfree", {"bitlinear_impl": "autodiff"}),
    ("step mmfree_lean", "mmfree", {"bitlinear_impl": "lean"}),
    ("step transformer", "transformer", {}),
  ]
  if preset == "toy":  # the smoke test keeps compiles few (bench_train runs toy steps)
    step_variants = []
  for name, kind, extra in step_variants:
    cfg = setups.model_config(kind, d, num_layers, vocab, **extra)
    setup = setups.train_setup(cfg)
    compiled, _, _ = setups.compile_step(setup, batch, seq)
    steps[name] = setups.StepRunner(setup, compiled, setups.random_batch(batch, seq, vocab))
  return steps


def _print_times(components: list[dict], step_ms: dict, summary) -> None:
  """Prints each component's time and counts, each full step's time, then the summary."""
  for c in components:
    print(
      f"{c['component']:32s} {c['ms']:8.2f} ms  x{c['count_mmfree']} mmfree  "
      f"x{c['count_transformer']} transformer"
    )
  for k, v in step_ms.items():
    print(f"{k:32s} {v:8.2f} ms")
  print(summary)


def run(preset: str) -> dict:
  d, num_layers, seq, batch, vocab = SHAPE[preset]
  mm_cfg = setups.model_config("mmfree", d, num_layers, vocab)
  inter = mm_cfg.intermediate_size
  n = batch * seq
  rng = np.random.default_rng(0)
  arr = lambda *shape, s=1.0: jnp.asarray(rng.normal(size=shape) * s, jnp.float32)
  fns, counts_mm, counts_tf = _projection_fns(arr, n, d, inter, vocab, num_layers)
  x = arr(n, d)
  fns["rmsnorm d"] = _fwd_bwd(lambda x, g: quant.rms_norm(x, g, 1e-6), x, _ones(d))
  counts_mm["rmsnorm d"] = 3 * num_layers + 1  # attn_norm, mlp_norm, g_norm; final
  counts_tf["rmsnorm d"] = 2 * num_layers + 1
  f = jnp.asarray(rng.uniform(0.8, 1.0, (batch, seq, d)), jnp.float32)
  i = arr(batch, seq, d, s=0.1)
  for scan_type in registry.native_scan_types(dispatch.default_platform()):
    rec = recurrence.get_recurrence(scan_type, mm_cfg.chunk_size)
    fns[f"recurrence {scan_type}"] = _fwd_bwd(lambda f, i, rec=rec: rec(f, i)[0], f, i)
  scan_type = registry.resolve_scan_type(mm_cfg.scan_type, dispatch.default_platform())
  counts_mm[f"recurrence {scan_type}"] = num_layers

  def gates(fz, iz, gz, h, lb):  # the MLGRU element-wise arithmetic around the recurrence
    fs = jax.nn.sigmoid(fz)
    fs = lb + (1 - lb) * fs
    ii = jax.nn.silu(iz) * (1 - fs)
    g = quant.rms_norm(gz, None, 1e-6)
    return g * h * jax.nn.sigmoid(h) + ii + fs

  fns["mlgru gates"] = _fwd_bwd(
    gates,
    arr(batch, seq, d),
    arr(batch, seq, d),
    arr(batch, seq, d),
    arr(batch, seq, d),
    arr(d, s=0.1),
  )
  counts_mm["mlgru gates"] = num_layers
  fns["glu silu*up"] = _fwd_bwd(lambda a, b: jax.nn.silu(a) * b, arr(n, inter), arr(n, inter))
  counts_mm["glu silu*up"] = num_layers
  counts_tf["glu silu*up"] = num_layers
  heads = max(1, d // 64)
  q = arr(batch, seq, heads, d // heads)
  pos = jnp.broadcast_to(jnp.arange(seq), (batch, seq))

  def attn(q, k, v):
    mask = attention_ref.causal_mask(pos, pos)
    return attention_ref.dot_product_attention(
      attention_ref.rope(q, pos), attention_ref.rope(k, pos), v, mask
    )

  fns["attention (rope+softmax)"] = _fwd_bwd(attn, q, q, q)
  counts_tf["attention (rope+softmax)"] = num_layers

  steps = _step_runners(preset, d, num_layers, vocab, batch, seq)
  times = common.interleaved_times({**fns, **steps}, ROUNDS[preset], warmup=1)
  ms = {k: 1e3 * v["median_s"] for k, v in times.items()}
  components, summary = _summarize(ms, list(fns), list(steps), counts_mm, counts_tf)
  _print_times(components, {k: ms[k] for k in steps}, summary)
  return {
    "shape": {
      "d_model": d,
      "num_layers": num_layers,
      "seq_len": seq,
      "batch": batch,
      "vocab": vocab,
      "intermediate": inter,
      "scan_type": scan_type,
    },
    "components": components,
    "summary": summary,
  }


def main(argv=None):
  args = common.parse_args(NAME, __doc__, None, argv)
  results = run(args.preset)
  common.write_json(
    args.out,
    NAME,
    args.preset,
    results,
    [
      "each component: jitted grad of sum(y*ct) on the step's shapes; "
      "median of round-robin rounds with the full train steps",
      "estimate = sum(component ms x count per step); other = step - estimate",
    ],
  )


def markdown(c: dict, res: dict) -> str:
  """The RESULTS.md section of these results (`benchmarks.report`)."""
  sh, sm = c["shape"], c["summary"]
  rows = [
    [x["component"], x["ms"], x["count_mmfree"], x["count_transformer"]] for x in c["components"]
  ]
  rows += [[k, v, "", ""] for k, v in sm["step_ms"].items()]
  rows += [[f"sum of counted components: {k}", v, "", ""] for k, v in sm["estimate_ms"].items()]
  return (
    f"### Train step by component (`bench_components`, d={sh['d_model']}, "
    f"L={sh['num_layers']}, T={sh['seq_len']}, B={sh['batch']}, vocab {sh['vocab']}; "
    "fwd+bwd ms, median of round-robin rounds)\n\n"
    + common.md_table(["component", "ms", "x per mmfree step", "x per Transformer++ step"], rows)
    + "\n\nstep time / Transformer++ step time: "
    + ", ".join(f"{k} {v:.2f}" for k, v in sm["over_transformer"].items())
  )


if __name__ == "__main__":
  main()
