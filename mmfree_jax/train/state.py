"""Training state (params, optimizer state, step, RNG) and its sharded creation.

Params are the pure dict of `nnx.split(model)` (fp32 by default); the model is rebuilt inside
the jitted step with `nnx.merge(graphdef, params)`. The state is created directly sharded:
the init is jitted with `out_shardings`, so no full host copy ever exists.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from mmfree_jax.config import ModelConfig
from mmfree_jax.nn.model import abstract_model, build_model
from mmfree_jax.parallel import sharding


class TrainState(NamedTuple):
  """`step` int32 scalar; `params` nested dict; `opt_state` optax state; `rng` uint32 [2]."""

  step: jax.Array
  params: dict
  opt_state: Any
  rng: jax.Array


def model_graphdef(cfg: ModelConfig):
  """The static structure of the model (no arrays), used with `nnx.merge`."""
  graphdef, _ = nnx.split(abstract_model(cfg))
  return graphdef


def init_train_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int) -> TrainState:
  """Pure init: model params from `seed`, zero optimizer moments, step 0."""
  _, params = nnx.split(build_model(cfg, nnx.Rngs(params=seed)))
  params = params.to_pure_dict()
  rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), rng)


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules) -> dict:
  """NamedShardings of a model's params (pure dict) from their logical axes."""
  _, abstract_params = nnx.split(abstract_model(cfg))
  logical = nnx.get_partition_spec(abstract_params).to_pure_dict()
  return sharding.tree_shardings(abstract_params.to_pure_dict(), logical, mesh, rules)


def train_state_shardings(
  cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, rules
) -> TrainState:
  """NamedShardings for every leaf of the train state, from the params' logical axes.

  Optimizer moments follow their params; scalars (counts, step, rng) are replicated.
  """
  params = param_shardings(cfg, mesh, rules)
  abstract_params = nnx.split(abstract_model(cfg))[1].to_pure_dict()
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = sharding.replicated(mesh)
  opt_shardings = optax.tree_map_params(
    tx, lambda _, s: s, abstract_opt, params, transform_non_params=lambda _: replicated
  )
  return TrainState(replicated, params, opt_shardings, replicated)


def abstract_train_state(
  cfg: ModelConfig, tx: optax.GradientTransformation, shardings: TrainState | None = None
) -> TrainState:
  """ShapeDtypeStructs (with shardings if given) of the train state, e.g. to restore into."""
  abstract = jax.eval_shape(lambda: init_train_state(cfg, tx, 0))
  if shardings is None:
    return abstract
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


def create_sharded_train_state(
  cfg: ModelConfig, tx: optax.GradientTransformation, seed: int, shardings: TrainState
) -> TrainState:
  """Initializes the train state on device, each leaf born with its sharding."""
  init = jax.jit(lambda: init_train_state(cfg, tx, seed), out_shardings=shardings)
  return init()


def train_state_from_params(
  params: dict, tx: optax.GradientTransformation, step: int, seed: int, shardings: TrainState
) -> TrainState:
  """A train state around given params (e.g. imported weights): fresh optimizer moments."""

  def build(params):
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))
    return TrainState(jnp.asarray(step, jnp.int32), params, tx.init(params), rng)

  return jax.jit(build, in_shardings=(shardings.params,), out_shardings=shardings)(params)
