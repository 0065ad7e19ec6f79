"""Runs a trained model for decoding or scoring as its `InferencePlan` says.

`prepare(model, plan)` returns a `PlannedLM`: the model's call contract (`model(tokens,
segment_ids=, state=) -> (logits, state)`, `init_state`, `cfg`) on a prepared model, driving
its own `__call__` with the plan's layer loop. A MatMul-free model with weights 'frozen' is
prepared as the one quantized inference model (`nn.packed.PackedLM` in a frozen format:
per-layer weights quantized once for an unrolled loop, the stacked kernels with their scales
for the in-place loop); a Transformer++ (no quantizer) is a copy, its layers sliced once
when unrolled. The caller's model is untouched. Generation prepares inside its jitted loop
(`prepare_for_decoding`), scoring inside its jitted forward (`prepare_for_scoring`); a packed
model is returned as it is (it runs its stored codes).
"""

from __future__ import annotations

import collections.abc

import jax
from flax import nnx

from mmfree_jax.infer import loops
from mmfree_jax.infer.plan import InferencePlan, plan_for
from mmfree_jax.nn.model import (
  MatMulFreeLM,
  TransformerLM,
  layer_blocks,
  scan_blocks,
  unroll_blocks,
)
from mmfree_jax.nn.packed import FROZEN, LATENT_SCALE, PackedLM


class PlannedLM(nnx.Module):
  """A latent model run as `plan` says (see `infer.plan`). Make it with `prepare`."""

  def __init__(self, model: MatMulFreeLM | TransformerLM, plan: InferencePlan):
    if plan.weights == "packed":
      raise ValueError("a packed plan runs a PackedLM: nn.packed.PackedLM.from_model(model)")
    self.cfg = model.cfg
    self.plan = plan
    layers = None  # per-layer blocks of a Transformer++ (weights='frozen', unrolled)
    unrolled = plan.layer_loop == "unrolled"
    if plan.weights == "frozen" and isinstance(model, MatMulFreeLM):
      model = PackedLM.from_model(model, FROZEN if unrolled else LATENT_SCALE)
    else:
      model = nnx.merge(*nnx.split(model))  # a copy
      if plan.weights == "frozen" and unrolled:
        layers = nnx.data(nnx.List(layer_blocks(model.blocks)))
    self.layers = layers
    self.model = model

  def init_state(self, batch: int, max_len: int | None = None):
    return self.model.init_state(batch, max_len)

  def _layer_loop(self, blocks, x, per_layer, body):
    """The plan's `nn.model.LayerLoop` over `blocks` (the model's stacked blocks)."""
    per_layer_list = isinstance(per_layer, list)  # per-layer KV caches: unrolled
    if self.layers is not None or per_layer_list or self.plan.layer_loop == "unrolled":
      if self.plan.order_layers:
        body = loops.ordered(body)
      if self.layers is not None:
        blocks = self.layers
      elif not isinstance(blocks, collections.abc.Sequence):  # stacked: static slices
        blocks = layer_blocks(blocks)
      return unroll_blocks(blocks, x, per_layer, body)
    if self.plan.layer_loop == "in_place":
      return loops.in_place_layers(blocks, x, per_layer, body)
    return scan_blocks(blocks, x, per_layer, body, "none")

  def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None, state=None):
    """The model's `__call__` (same contract), its layers run by the plan's loop."""
    return self.model(tokens, segment_ids=segment_ids, state=state, layer_loop=self._layer_loop)


def prepare(
  model: nnx.Module, plan: InferencePlan | None = None, *, purpose: str = "decode"
) -> nnx.Module:
  """`model` ready to run as `plan` says (default: `plan_for(model.cfg, purpose=purpose)`): a
  `PlannedLM` for a latent model; a `PackedLM` (or a model already prepared) as it is."""
  if isinstance(model, (PackedLM, PlannedLM)):
    return model
  if not isinstance(model, (MatMulFreeLM, TransformerLM)):
    raise TypeError(
      f"prepare takes a MatMulFreeLM, TransformerLM or PackedLM; got {type(model).__name__}"
    )
  return PlannedLM(model, plan or plan_for(model.cfg, purpose=purpose))


def prepare_for_decoding(model: nnx.Module) -> nnx.Module:
  """As `generate` runs a model: `prepare(model, purpose='decode')`. Call it where the
  prepared weights should live: inside the jitted loop, before its steps."""
  return prepare(model, purpose="decode")


def prepare_for_scoring(model: nnx.Module) -> nnx.Module:
  """As scoring runs a model once per jitted call: `prepare(model, purpose='score')`."""
  return prepare(model, purpose="score")
