"""The analytic roofline of one sharded train step per chip, and like-for-like comparisons
with the paper's H100 throughput. Pure arithmetic (no compile): `benchmarks.aot_tpu` ranks
its compile search by it and reports it next to the compiled memory.

    step time = max(compute, HBM, ICI)     a bound: perfect overlap, kernels at peak
    compute   = (model FLOPs + the forward the remat policy recomputes) / bf16 peak;
                model FLOPs = `mmfree_jax.accounting.train_flops_per_token` per token
    HBM       = only the traffic known without measuring: optimizer state (params and two
                AdamW moments, fp32) read and written once, gradients written and read,
                bf16 weights read 3x per microbatch (forward, backward, remat), gradient
                accumulation. Activation traffic is NOT modelled (a hand count would be a
                guess; XLA's cost analysis counts a loop body once), so this is a lower
                bound on HBM time, and an "HBM" bound means the known traffic alone exceeds
                compute.
    ICI       = FSDP weight all-gathers (2 per microbatch) and gradient reduce-scatters,
                tensor-parallel activation all-reduces (4 per layer), data-parallel gradient
                all-reduce; ring cost bytes x (n-1)/n at half the chip's bidirectional ICI

`int8`: the forward's BitLinear matmuls (2N of the 6N) at the int8 peak, the rest at bf16.

The paper reports MEASURED H100 throughput; a bound is not comparable with it. `vs_paper`
gives the two like-for-like ratios: bound vs bound (this roofline applied to one H100 SXM,
compute only, as the most favourable case for the H100) and both at the paper's MFU (the
ratio of the chips' peaks).
"""

from __future__ import annotations

import dataclasses

from mmfree_jax import accounting, hardware

GLOBAL_BATCH, SEQ_LEN = 256, 2048
# The paper's measured training throughput per H100 (tokens/s/GPU).
PAPER_H100_TOKENS_PER_S = {"370m": 104e3, "1.3b": 41e3, "2.7b": 20e3}
PAPER_GPU = "H100 SXM"
TARGET_RATIO = 1.3


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice: its GCP name, libtpu topology, chip count and chip (`mmfree_jax.hardware`)."""

  slice_name: str
  topology: str
  chips: int
  chip: hardware.Chip


SLICES = {
  "v5e": Slice("v5e-8", "v5e:2x4", 8, hardware.chip("TPU v5e")),
  "v5p": Slice("v5p-8", "v5p:2x2x1", 4, hardware.chip("TPU v5p")),
  "v6e": Slice("v6e-8", "v6e:2x4", 8, hardware.chip("TPU v6e")),
}


def mesh_candidates(chips: int) -> list[dict]:
  out = [{"data": 1, "fsdp": chips, "tensor": 1}]
  if chips >= 4:
    out.append({"data": 1, "fsdp": chips // 2, "tensor": 2})
    out.append({"data": 2, "fsdp": chips // 2, "tensor": 1})
  return out


def _flops(model_cfg, tokens: float, remat: str) -> tuple[float, float, float]:
  """(model FLOPs, hardware FLOPs with remat recompute, int8-eligible forward FLOPs)."""
  n_mm = accounting.matmul_params(model_cfg)
  model = accounting.train_flops_per_token(model_cfg, SEQ_LEN) * tokens
  recompute = (2.0 * n_mm if remat == "full" else 0.0) * tokens
  if model_cfg.kind == "transformer" and remat != "none":  # batched attention dots recomputed
    recompute += accounting.attention_flops_per_token(model_cfg, SEQ_LEN) * tokens
  int8_fwd = 2.0 * n_mm * tokens if model_cfg.kind == "mmfree" else 0.0
  return model, model + recompute, int8_fwd


def _hbm_known_bytes(n_params: int, mesh: dict, micro: int) -> float:
  shards = mesh["fsdp"] * mesh["tensor"]
  hbm = 2 * n_params * 12 / shards  # params + two AdamW moments (fp32), read and written
  hbm += 2 * 4 * n_params / shards  # gradients written and read
  hbm += micro * 3 * 2 * n_params / mesh["tensor"]  # bf16 weights: fwd, bwd, remat reads
  if micro > 1:
    hbm += micro * 2 * 4 * n_params / shards  # gradient accumulation (read + write fp32)
  return hbm


def _ici_bytes(model_cfg, n_params: int, mesh: dict, micro: int, tokens: float) -> float:
  f, t, d = mesh["fsdp"], mesh["tensor"], mesh["data"]
  ici = 0.0
  if f > 1:
    ici += micro * (2 * 4 + 4) * n_params / t * (f - 1) / f  # gathers + reduce-scatter
  if t > 1:  # 4 all-reduces per layer of the bf16 [rows, T, d] activations a chip holds
    ici += 4 * model_cfg.num_layers * 2 * 2 * tokens * t * model_cfg.d_model * (t - 1) / t
  if d > 1:
    ici += 2 * 4 * n_params / (f * t) * (d - 1) / d
  return ici


def estimate(model_cfg, n_params: int, sl: Slice, mesh: dict, micro: int, remat: str) -> dict:
  """The roofline of one step per chip (module docstring): seconds per term, the bound,
  tokens/s per chip, and the int8-forward variant for MatMul-free."""
  chip = sl.chip
  tokens = GLOBAL_BATCH * SEQ_LEN / sl.chips
  model, hw, int8_fwd = _flops(model_cfg, tokens, remat)
  compute_s = hw / chip.bf16_flops
  hbm = _hbm_known_bytes(n_params, mesh, micro)
  hbm_s = hbm / chip.hbm_bytes_per_s
  ici = _ici_bytes(model_cfg, n_params, mesh, micro, tokens)
  ici_s = ici / (chip.ici_bytes_per_s / 2)
  step_s = max(compute_s, hbm_s, ici_s)
  out = {
    "flops_analytic_model": model,
    "flops_analytic_hw": hw,
    "compute_s": compute_s,
    "hbm_known_bytes": hbm,
    "hbm_s": hbm_s,
    "ici_bytes": ici,
    "ici_s": ici_s,
    "step_s": step_s,
    "bound": ("compute", "HBM", "ICI")[[compute_s, hbm_s, ici_s].index(step_s)],
    "tokens_per_s_chip": tokens / step_s,
    "mfu_at_estimate": model / step_s / chip.bf16_flops,
  }
  if int8_fwd:
    int8_s = int8_fwd / chip.int8_ops + (hw - int8_fwd) / chip.bf16_flops
    out.update(
      int8_step_s=max(int8_s, hbm_s, ici_s),
      int8_tokens_per_s_chip=tokens / max(int8_s, hbm_s, ici_s),
    )
  return out


def vs_paper(
  model_cfg, size: str, chip: hardware.Chip, bound_tokens_per_s: float, remat: str = "none"
) -> dict:
  """Like-for-like comparisons of `chip` with the paper's measured H100 throughput at `size`.

  - `paper_mfu`: the paper's tokens/s x model FLOPs per token / the H100's bf16 peak;
  - `at_paper_mfu`: this chip at that MFU over the paper (= the ratio of the peaks);
  - `bound_vs_bound`: this chip's roofline over the same roofline on one H100 (its compute
    term alone, remat recompute included: no HBM or ICI term can only favour the H100)."""
  gpu = hardware.chip(PAPER_GPU)
  paper = PAPER_H100_TOKENS_PER_S[size]
  model_per_token = accounting.train_flops_per_token(model_cfg, SEQ_LEN)
  _, hw, _ = _flops(model_cfg, 1.0, remat)
  paper_mfu = paper * model_per_token / gpu.bf16_flops
  h100_bound = gpu.bf16_flops / hw
  return {
    "paper_tokens_per_s": paper,
    "paper_mfu": paper_mfu,
    "at_paper_mfu": paper_mfu * chip.bf16_flops / model_per_token / paper,
    "h100_bound_tokens_per_s": h100_bound,
    "bound_vs_bound": bound_tokens_per_s / h100_bound,
    "bound_vs_paper_measured": bound_tokens_per_s / paper,
  }
