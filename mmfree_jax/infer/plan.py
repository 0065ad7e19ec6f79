"""How a trained model runs for inference on a platform: the `InferencePlan`.

A plan is chosen once per model and platform (`plan_for`) and read by `infer.runner`; the
models themselves hold no inference mode. Three fields:

  weights       'latent'  the parameters as trained (MatMul-free: quantized at every call)
                'frozen'  every BitLinear quantized once: the MatMul-free LM runs as the
                          quantized inference model (`nn.packed.PackedLM`, a frozen format);
                          the Transformer++ has no quantizer, for it 'frozen' only slices
                          the layers once
                'packed'  stored ternary codes (`nn.packed.PackedLM`, which is its own runner)
  layer_loop    'scan'     `lax.scan` over the stacked layers (the models' own loop)
                'unrolled' one block per layer, statically sliced (per-layer frozen copies
                           when weights='frozen'): a decode step then reads each weight where
                           it lies, where a scan copies every layer's weights at every token
                'in_place' a loop over the stacked layers whose carry holds the params behind
                           an optimization barrier (`infer.loops.in_place_layers`)
  order_layers  in an unrolled loop, each layer's weights are computed only once the previous
                layer's output is (`infer.loops.ordered_after`)

The one platform workaround is `CPU_CONVERTS_DOT_OPERANDS`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mmfree_jax import registry
from mmfree_jax.config import ModelConfig
from mmfree_jax.kernels import dispatch

# XLA:CPU under a bf16/fp16 compute dtype converts the operands of every dot to fp32 and, given
# stacked (or per-layer) weights, runs every layer's conversion up front and keeps them all
# (3x the weights' bytes). Measured (benchmarks/RESULTS.md, notes on packed inference): the
# bf16 2.7B generate with per-layer frozen copies held 22.2 GB at 0.11 tokens/s; a bf16
# Transformer++ decode step (d=512, L=8) 167 MB of temporaries, 17 MB with the layers
# ordered. Where this holds, the plans convert one layer's weights at a time instead: the
# in-place loop, and ordered layers where per-layer KV caches keep them unrolled. Set it to
# False if a future XLA:CPU converts inside the loop: the outputs stay the same.
CPU_CONVERTS_DOT_OPERANDS = True

WEIGHTS = ("latent", "frozen", "packed")
LAYER_LOOPS = ("scan", "unrolled", "in_place")
PURPOSES = ("decode", "score")


@dataclasses.dataclass(frozen=True)
class InferencePlan:
  """How to run a model for inference (hashable: it is static in jitted functions)."""

  weights: str = "latent"
  layer_loop: str = "scan"
  order_layers: bool = False

  def __post_init__(self):
    if self.weights not in WEIGHTS:
      raise ValueError(f"unknown weights {self.weights!r}; choose one of {WEIGHTS}")
    if self.layer_loop not in LAYER_LOOPS:
      raise ValueError(f"unknown layer_loop {self.layer_loop!r}; choose one of {LAYER_LOOPS}")


def converts_dot_operands(cfg: ModelConfig, platform: str) -> bool:
  """Whether `CPU_CONVERTS_DOT_OPERANDS` applies: XLA:CPU and a compute dtype under 32 bits."""
  return (
    CPU_CONVERTS_DOT_OPERANDS and platform == "cpu" and jnp.dtype(cfg.compute_dtype).itemsize < 4
  )


def plan_for(
  cfg: ModelConfig, platform: str | None = None, *, purpose: str = "decode"
) -> InferencePlan:
  """The plan for a latent `MatMulFreeLM` / `TransformerLM` of `cfg` on `platform` ('cpu',
  'gpu', 'tpu'; None = `kernels.dispatch.current_platform()`).

  purpose: 'decode' (generation: many calls per weight, so a per-layer frozen copy pays for
  itself) or 'score' (one forward per jitted call: the model as trained, scanned).
  Where `converts_dot_operands`, the layers stay stacked and are converted one at a time for
  both purposes: a MatMul-free model with a float BitLinear freezes only its scales and runs
  the in-place loop (a frozen copy saves no work there: every call converts it again); a
  Transformer++ runs the in-place loop without state and ordered unrolled layers with its
  per-layer KV caches. A MatMul-free `bitlinear_impl=int8` multiplies int8 codes, which no
  conversion touches: it keeps the usual plan.
  """
  if purpose not in PURPOSES:
    raise ValueError(f"unknown purpose {purpose!r}; choose one of {PURPOSES}")
  platform = platform or dispatch.current_platform()
  if converts_dot_operands(cfg, platform):
    if cfg.kind == "transformer":
      return InferencePlan("latent", "in_place", order_layers=True)
    if registry.resolve_bitlinear_impl(cfg.bitlinear_impl, platform) != "int8":
      return InferencePlan("frozen", "in_place")
  if purpose == "decode":
    return InferencePlan("frozen", "unrolled")
  return InferencePlan("latent", "scan")


def copies_layers(plan: InferencePlan) -> bool:
  """Whether running `plan` makes a per-layer copy of the blocks' weights."""
  return plan.weights == "frozen" and plan.layer_loop == "unrolled"
