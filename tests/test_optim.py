"""Optimizer pieces: decay mask, LR schedules, non-finite skipping, bad settings."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mmfree_jax import config as config_lib
from mmfree_jax.nn import model as model_lib
from mmfree_jax.train import optim


def _optim_cfg(**kw):
  cfg = config_lib.base_config().optim
  cfg.update(kw)
  return cfg


def test_weight_decay_only_on_kernels_unless_embeddings_asked():
  params = nnx.split(model_lib.abstract_model(config_lib.ModelConfig.tiny()))[1].to_pure_dict()
  mask = optim.weight_decay_mask(params)
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat["['blocks']['mlp']['gate_proj']['kernel']"] is True
  assert flat["['lm_head']['kernel']"] is True
  for name in (
    "['lower_bounds']",
    "['embedding']",
    "['final_norm']['scale']",
    "['lm_head']['norm_scale']",
    "['blocks']['attn']['g_norm']['scale']",
  ):
    assert flat[name] is False, name
  with_embed = optim.weight_decay_mask(params, decay_embeddings=True)
  assert with_embed["embedding"] is True and with_embed["lower_bounds"] is False


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedules_warm_up_then_decay_to_end_ratio(schedule):
  cfg = _optim_cfg(lr=1e-3, warmup_steps=10, end_lr_ratio=0.1, schedule=schedule)
  fn = optim.learning_rate_schedule(cfg, 100)
  assert float(fn(0)) == 0.0
  np.testing.assert_allclose(float(fn(5)), 0.5e-3, rtol=1e-6)  # linear warmup
  np.testing.assert_allclose(float(fn(10)), 1e-3, rtol=1e-6)
  end = 1e-3 if schedule == "constant" else 1e-4
  np.testing.assert_allclose(float(fn(100)), end, rtol=1e-5)


def test_nonfinite_gradients_skip_the_update_and_count():
  tx = optim.make_optimizer(_optim_cfg(lr=0.1, warmup_steps=0, schedule="constant"), 10)
  params = {"kernel": jnp.ones((2, 2))}
  state = tx.init(params)
  bad = {"kernel": jnp.array([[jnp.nan, 1.0], [1.0, 1.0]])}
  updates, state = tx.update(bad, state, params)
  assert np.all(np.asarray(optax.apply_updates(params, updates)["kernel"]) == 1.0)
  assert int(state.total_notfinite) == 1
  updates, state = tx.update({"kernel": jnp.ones((2, 2))}, state, params)
  assert np.all(np.asarray(optax.apply_updates(params, updates)["kernel"]) < 1.0)


def test_bad_optimizer_settings_name_the_key():
  with pytest.raises(ValueError, match="optim.schedule"):
    optim.learning_rate_schedule(_optim_cfg(schedule="step"), 10)
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.learning_rate_schedule(_optim_cfg(warmup_steps=20), 10)
