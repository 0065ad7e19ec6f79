"""Logical axis rules: parameter and activation names are separate sets, every name has one
rule, and no array's spec relies on flax dropping a mesh axis used twice (issue 25 item 4)."""

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mmfree_jax import config as config_lib
from mmfree_jax.config import ModelConfig
from mmfree_jax.nn.model import abstract_model
from mmfree_jax.parallel import sharding

RULES = sharding.normalize_rules(config_lib.base_config().mesh.axis_rules)


def test_param_and_activation_names_are_disjoint_and_all_have_a_rule():
  assert not set(sharding.PARAM_AXES) & set(sharding.ACTIVATION_AXES)
  assert sharding.check_rules(RULES) == []
  names = [name for name, _ in RULES]
  assert sorted(names) == sorted(sharding.LOGICAL_AXES)


@pytest.mark.parametrize("kind", ["mmfree", "transformer"])
def test_every_param_spec_resolves_without_a_mesh_axis_twice(kind):
  _, specs = nnx.split(nnx.get_partition_spec(abstract_model(ModelConfig.tiny(kind=kind))))
  leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  assert leaves
  for spec in leaves:
    assert all(name in sharding.PARAM_AXES for name in spec if name is not None), spec
    resolved = sharding.logical_to_spec(tuple(spec), RULES)  # raises on a conflict
    axes = [
      a
      for entry in resolved
      if entry is not None
      for a in (entry if isinstance(entry, tuple) else (entry,))
    ]
    assert len(axes) == len(set(axes)), (spec, resolved)


def test_activation_specs_keep_the_layout_flax_chose_before():
  # Before the split, ("batch", "seq", "embed") resolved to this only because flax dropped
  # 'fsdp' from embed (already taken by batch); now it is what the rules say. The sequence goes
  # on 'context', of size 1 (the layout as before) unless context parallelism is on.
  assert sharding.logical_to_spec(
    ("activation_batch", "activation_seq", "activation_embed"), RULES
  ) == P(("data", "fsdp"), "context", None)
  assert sharding.logical_to_spec(
    ("activation_batch", "activation_seq", "activation_vocab"), RULES
  ) == P(("data", "fsdp"), "context", "tensor")
  assert sharding.logical_to_spec(("vocab", "embed"), RULES) == P("tensor", "fsdp")


def test_a_conflict_is_an_error_naming_both_axes():
  rules = [(n, t) for n, t in RULES if n != "activation_embed"] + [("activation_embed", "fsdp")]
  with pytest.raises(
    ValueError,
    match=r"'activation_batch' and 'activation_embed' both map "
    r"to mesh axis 'fsdp'.*mesh.axis_rules",
  ):
    sharding.logical_to_spec(("activation_batch", "activation_seq", "activation_embed"), rules)
  with pytest.raises(ValueError, match="'seq' has no rule in mesh.axis_rules"):
    sharding.logical_to_spec(("seq",), RULES)


def test_old_rule_names_are_refused_with_the_fix():
  old = [("batch", ("data", "fsdp")), ("seq", None)] + [
    (n, t) for n, t in RULES if n in sharding.PARAM_AXES
  ]
  problems = sharding.check_rules(old + [("embed", None)])
  text = "\n".join(problems)
  assert "unknown logical axis 'batch'" in text and "unknown logical axis 'seq'" in text
  assert "'embed' has 2 rules" in text
  assert "no rule for ['activation_batch'" in text
