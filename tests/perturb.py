"""Test helper: random parameters away from their init (norm scales != 1, lower bounds != 0),
so that a dropped norm or lower bound changes outputs."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def perturb_params(model: nnx.Module, seed: int = 1, std: float = 0.3) -> nnx.Module:
  """Adds N(0, std) noise to every parameter of `model`, in place; returns the model.

  The sum is taken in numpy (no eager jax op, each of which would compile) and cast back to
  each parameter's dtype.
  """
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)
  nnx.update(
    model,
    jax.tree.map(
      lambda p: jnp.asarray(np.asarray(p) + rng.normal(0.0, std, p.shape), p.dtype), state
    ),
  )
  return model
