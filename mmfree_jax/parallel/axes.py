"""The logical axis names and the checks of a rule list, without jax: the config validates
`mesh.axis_rules` with them before a CLI imports jax (`sharding` re-exports them)."""

from __future__ import annotations

from typing import Sequence

PARAM_AXES = ("embed", "mlp", "inner", "heads", "vocab", "layers")
# activation_inner: the features of the MLGRU recurrence and of attention heads (the Pallas
# kernels run per shard of them, `parallel.kernel_sharding`).
ACTIVATION_AXES = (
  "activation_batch",
  "activation_seq",
  "activation_embed",
  "activation_inner",
  "activation_vocab",
)
LOGICAL_AXES = PARAM_AXES + ACTIVATION_AXES

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def normalize_rules(rules) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  """Turns config rules (lists from ml-collections) into the tuple form flax expects."""
  out = []
  for name, target in rules:
    if isinstance(target, list):
      target = tuple(target)
    out.append((name, target))
  return tuple(out)


def check_rules(rules) -> list[str]:
  """Problems of a rule list, one line each (empty when fine): every name of `LOGICAL_AXES`
  has exactly one rule, and no other name has one."""
  names = [name for name, _ in normalize_rules(rules)]
  problems = [
    f"mesh.axis_rules: unknown logical axis {n!r}; known: {list(LOGICAL_AXES)}"
    for n in dict.fromkeys(names)
    if n not in LOGICAL_AXES
  ]
  problems += [
    f"mesh.axis_rules: {n!r} has {names.count(n)} rules; give it one"
    for n in dict.fromkeys(names)
    if names.count(n) > 1
  ]
  missing = [n for n in LOGICAL_AXES if n not in names]
  if missing:
    problems.append(
      f"mesh.axis_rules: no rule for {missing}; add one per name (None = "
      "replicated), e.g. as in mmfree_jax.config's defaults"
    )
  return problems
