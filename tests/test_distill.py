"""Transformer → MatMul-free conversion: student initialisation, distillation losses, the
distill step (pure, jitted, frozen teacher, sharded == unsharded) and resume through train().

References are independent: numpy for the losses, the models' own full forward for the
block-wise paths, a Python loop for the K/V widening.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmfree_jax import config as config_lib
from mmfree_jax.checkpoint import loading
from mmfree_jax.checkpoint.manager import Checkpointer
from mmfree_jax.config import ModelConfig
from mmfree_jax.convert import ConversionError, init_student_params, student_config
from mmfree_jax.convert import teacher as teacher_lib
from mmfree_jax.nn import blockwise
from mmfree_jax.nn.model import abstract_model
from mmfree_jax.numerics import distill_loss, quant
from mmfree_jax.parallel import mesh as mesh_lib
from mmfree_jax.parallel import sharding
from mmfree_jax.train import distill, optim
from mmfree_jax.train import state as state_lib
from mmfree_jax.train import steps as steps_lib
from mmfree_jax.train.steps import StepContext
from mmfree_jax.train.trainer import train
from tests.test_training_e2e import check_resume_is_exact
from tests.train_configs import small_config

RULES = sharding.normalize_rules(config_lib.base_config().mesh.axis_rules)


def _teacher_cfg(**overrides):
  values = dict(kind="transformer", num_heads=4, num_kv_heads=2, rms_norm_eps=1e-5)
  values.update(overrides)
  return ModelConfig.tiny(**values)


def _random_params(cfg, seed):
  """Every leaf random (norm scales around 1, lower bounds 0), so a mix-up of any two leaves
  shows. Shapes from the abstract model: no eager init."""
  _, abstract = nnx.split(abstract_model(cfg))
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = jax.tree_util.keystr(path)
    if "lower_bounds" in name:
      return jnp.zeros(x.shape, x.dtype)
    value = rng.normal(0.0, 0.1, x.shape) + (1.0 if "scale" in name else 0.0)
    return jnp.asarray(value, x.dtype)

  return jax.tree_util.tree_map_with_path(leaf, abstract.to_pure_dict())


def _batch(seed, batch=8, seq=16, vocab=256):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
  cut = rng.integers(2, seq, (batch, 1))
  segments = np.where(np.arange(seq + 1)[None] < cut, 1, 2).astype(np.int32)
  return {"tokens": tokens, "segment_ids": segments}


@pytest.fixture(scope="module")
def pair():
  teacher_cfg = _teacher_cfg()
  student_cfg = student_config(teacher_cfg)
  teacher = _random_params(teacher_cfg, 0)
  fresh = _random_params(student_cfg, 1)
  return teacher_cfg, student_cfg, teacher, fresh


# --------------------------------------------------------------------- initialisation


def test_student_init_copies_and_maps_every_leaf(pair):
  teacher_cfg, student_cfg, t, fresh = pair
  s = init_student_params(t, teacher_cfg, fresh, student_cfg)
  assert jax.tree.structure(s) == jax.tree.structure(fresh)
  np.testing.assert_array_equal(s["embedding"], t["embedding"])
  np.testing.assert_array_equal(s["lm_head"]["kernel"], t["lm_head"]["kernel"])
  np.testing.assert_array_equal(s["lm_head"]["norm_scale"], t["final_norm"]["scale"])
  sb, tb = s["blocks"], t["blocks"]
  np.testing.assert_array_equal(sb["mlp"]["gate_proj"]["kernel"], tb["mlp"]["gate_proj"]["kernel"])
  np.testing.assert_array_equal(sb["mlp"]["down_proj"]["kernel"], tb["mlp"]["down_proj"]["kernel"])
  np.testing.assert_array_equal(sb["mlp"]["gate_proj"]["norm_scale"], tb["mlp_norm"]["scale"])
  np.testing.assert_array_equal(sb["attn"]["g_proj"]["kernel"], tb["attn"]["q_proj"]["kernel"])
  np.testing.assert_array_equal(sb["attn"]["o_proj"]["kernel"], tb["attn"]["o_proj"]["kernel"])
  for proj in "ifg":
    np.testing.assert_array_equal(
      sb["attn"][f"{proj}_proj"]["norm_scale"], tb["attn_norm"]["scale"]
    )
  # GQA widening by a Python loop: query head h reads K/V head h // group.
  hd, group = teacher_cfg.head_dim, teacher_cfg.num_heads // teacher_cfg.num_kv_heads
  for ours, theirs in (("i", "v"), ("f", "k")):
    kv = np.asarray(tb["attn"][f"{theirs}_proj"]["kernel"])
    want = np.concatenate(
      [kv[:, :, (h // group) * hd : (h // group + 1) * hd] for h in range(teacher_cfg.num_heads)],
      axis=-1,
    )
    np.testing.assert_array_equal(sb["attn"][f"{ours}_proj"]["kernel"], want)
  for ones in (
    sb["attn_norm"]["scale"],
    sb["mlp_norm"]["scale"],
    s["final_norm"]["scale"],
    sb["attn"]["o_proj"]["norm_scale"],
    sb["attn"]["g_norm"]["scale"],
    sb["mlp"]["down_proj"]["norm_scale"],
  ):
    np.testing.assert_array_equal(ones, np.ones_like(ones))
  np.testing.assert_array_equal(s["lower_bounds"], fresh["lower_bounds"])


def test_folded_norms_give_the_teachers_projection_inputs(pair):
  """Student: attn_norm (scale 1) then the BitLinear's own norm (teacher gamma). Without
  quantization that is the teacher's `rmsnorm(x) gamma @ W` (an RMSNorm of an RMSNormed
  vector is the identity up to eps)."""
  teacher_cfg, student_cfg, t, fresh = pair
  s = init_student_params(t, teacher_cfg, fresh, student_cfg)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 64)), jnp.float32)
  gamma = t["blocks"]["attn_norm"]["scale"][0]
  teacher_q = (
    quant.rms_norm(x, gamma, teacher_cfg.rms_norm_eps) @ t["blocks"]["attn"]["q_proj"]["kernel"][0]
  )
  g = s["blocks"]["attn"]["g_proj"]
  student_g = quant.bitlinear(
    quant.rms_norm(x, s["blocks"]["attn_norm"]["scale"][0], student_cfg.rms_norm_eps),
    g["kernel"][0],
    g["norm_scale"][0],
    quantize=False,
  )
  np.testing.assert_allclose(student_g, teacher_q, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
  "change,match",
  [
    ({"d_model": 32}, "d_model"),
    ({"num_layers": 3}, "num_layers"),
    ({"vocab_size": 300}, "vocab_size"),
    ({"intermediate_size": 512}, "intermediate_size"),
  ],
)
def test_mismatched_student_is_refused_by_name(pair, change, match):
  teacher_cfg = pair[0]
  with pytest.raises(ConversionError, match=match):
    student_config(teacher_cfg, **change)


# ---------------------------------------------------------------------------- losses


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_kl_and_hidden_mse_match_numpy():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 5, 7)) * 3, rng.normal(size=(2, 5, 7)) * 3
  mask = rng.random((2, 5)) > 0.3
  with jax.enable_x64(True):
    kl, count = distill_loss.kl_divergence_sums(
      jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask), temperature=2.0
    )
    lt, ls = _np_log_softmax(t / 2.0), _np_log_softmax(s / 2.0)
    want = 4.0 * np.sum(np.sum(np.exp(lt) * (lt - ls), -1) * mask)
    np.testing.assert_allclose(float(kl), want, rtol=1e-12)
    assert float(count) == mask.sum()
    same, _ = distill_loss.kl_divergence_sums(jnp.asarray(t), jnp.asarray(t), jnp.asarray(mask))
    assert abs(float(same)) < 1e-12
    hs, ht = rng.normal(size=(3, 2, 5, 4)), rng.normal(size=(3, 2, 5, 4))
    err, ref, n = distill_loss.hidden_mse_sums(jnp.asarray(hs), jnp.asarray(ht), jnp.asarray(mask))
    np.testing.assert_allclose(float(err), np.sum(np.mean((hs - ht) ** 2, -1) * mask), rtol=1e-12)
    np.testing.assert_allclose(float(ref), np.sum(np.mean(ht**2, -1) * mask), rtol=1e-12)
    assert float(n) == mask.sum()
  with pytest.raises(ValueError, match="temperature"):
    distill_loss.kl_divergence_sums(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask), 0.0)


def test_quantization_strength_interpolates_between_float_and_ternary():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 32)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(32, 8)) * 0.1, jnp.float32)
  scale = jnp.ones((32,))
  full = quant.bitlinear(x, w, scale)
  with quant.quantization_strength(0.0):
    off = quant.bitlinear(x, w, scale)
  with quant.quantization_strength(1.0):
    on = quant.bitlinear(x, w, scale)
  np.testing.assert_allclose(off, quant.bitlinear(x, w, scale, quantize=False), atol=1e-6)
  np.testing.assert_allclose(on, full, atol=1e-6)
  assert np.abs(np.asarray(off - full)).max() > 1e-2
  assert float(distill.quant_strength(0, 4)) == 0.25 and float(distill.quant_strength(9, 4)) == 1
  assert distill.quant_strength(3, 0) is None


# ------------------------------------------------------------------ block-wise forward


def test_blockwise_paths_reproduce_the_full_forward(pair):
  teacher_cfg, student_cfg, t, fresh = pair
  graph_t = state_lib.model_graphdef(teacher_cfg)
  graph_s = state_lib.model_graphdef(student_cfg)
  batch = _batch(0, batch=2, seq=12)
  tokens, segments = batch["tokens"][:, :-1], batch["segment_ids"][:, :-1]

  @jax.jit
  def run(tp, sp):
    teacher, student = nnx.merge(graph_t, tp), nnx.merge(graph_s, sp)
    hidden = blockwise.transformer_hidden_states(teacher, tokens, segments)
    t_logits = teacher.lm_head(teacher.final_norm(hidden[-1]))
    # Student: feed each block the output of the previous one (two passes for two layers).
    x0 = student.embed_tokens(tokens)
    x1 = blockwise.mmfree_block_outputs(student, jnp.stack([x0, x0]), segments)[0]
    x2 = blockwise.mmfree_block_outputs(student, jnp.stack([x0, x1]), segments)[1]
    s_logits = student.lm_head(student.final_norm(x2))
    return (
      t_logits,
      teacher(tokens, segment_ids=segments)[0],
      s_logits,
      student(tokens, segment_ids=segments)[0],
    )

  t_block, t_full, s_block, s_full = run(t, fresh)
  np.testing.assert_allclose(t_block, t_full, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(s_block, s_full, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- the step


def _zero_residual_branches(params):
  """o_proj and down_proj kernels zero: every block is the identity (BitLinear of a zero
  kernel outputs 0: its weight scale floors at 1e-5 and every code is 0)."""
  params = jax.tree.map(lambda x: x, params)  # new dicts, same leaves
  params["blocks"]["attn"]["o_proj"]["kernel"] = jnp.zeros_like(
    params["blocks"]["attn"]["o_proj"]["kernel"]
  )
  params["blocks"]["mlp"]["down_proj"]["kernel"] = jnp.zeros_like(
    params["blocks"]["mlp"]["down_proj"]["kernel"]
  )
  return params


def test_teacher_gets_no_gradient_and_stage1_is_zero_for_identity_blocks(pair):
  """Stage 1 (the teacher merged with stop_gradient serves both stages the same way)."""
  stage = 1
  teacher_cfg, student_cfg, t, fresh = pair
  settings = distill.DistillSettings(teacher="", alpha=0.5, temperature=2.0)
  loss = distill.distill_objective(
    student_cfg,
    state_lib.model_graphdef(student_cfg),
    teacher_cfg,
    state_lib.model_graphdef(teacher_cfg),
    settings,
    stage=stage,
  ).loss
  batch, tokens = _batch(1), jnp.asarray(16 * 8, jnp.float32)
  sums = lambda s: (s["nll"], s["kl"], s["hidden_err"], s["hidden_ref"])
  fn = jax.jit(
    jax.value_and_grad(
      lambda sp, tp: loss(sp, batch, StepContext(tokens, jnp.zeros((), jnp.int32), tp)),
      argnums=(0, 1),
      has_aux=True,
    )
  )
  s = init_student_params(t, teacher_cfg, fresh, student_cfg)
  (value, aux), (student_grads, teacher_grads) = fn(s, t)
  nll, kl, err, ref = sums(aux)
  assert float(value) > 0.0
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(teacher_grads))
  assert any(float(jnp.max(jnp.abs(g))) > 0.0 for g in jax.tree.leaves(student_grads))
  assert float(nll) == float(kl) == 0.0 and float(ref) > 0.0
  (value, aux), _ = fn(_zero_residual_branches(s), _zero_residual_branches(t))
  err = aux["hidden_err"]
  assert float(value) == 0.0 and float(err) == 0.0


def _distill_run(pair, stage, mesh_shape, devices, microbatches, batches):
  teacher_cfg, student_cfg, t, fresh = pair
  teacher_cfg = dataclasses.replace(teacher_cfg, dtype="float64", param_dtype="float64")
  student_cfg = dataclasses.replace(student_cfg, dtype="float64", param_dtype="float64")
  cfg = config_lib.base_config()
  cfg.optim.update(lr=1e-2, warmup_steps=0, schedule="constant")
  tx, schedule = optim.make_optimizer(cfg.optim, 10), optim.learning_rate_schedule(cfg.optim, 10)
  mesh = mesh_lib.make_mesh(mesh_shape, devices)
  shardings = state_lib.train_state_shardings(student_cfg, tx, mesh, RULES)
  teacher_shardings = state_lib.param_shardings(teacher_cfg, mesh, RULES)
  f64 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)
  teacher = jax.device_put(f64(t), teacher_shardings)
  params = distill.student_params_from_teacher(
    teacher, teacher_cfg, f64(fresh), student_cfg, shardings.params
  )
  state = state_lib.train_state_from_params(params, tx, 0, 0, shardings)
  settings = distill.DistillSettings(teacher="", alpha=0.7, temperature=2.0)
  batch_sharding = sharding.batch_sharding(mesh, RULES)
  step = jax.jit(
    distill.make_distill_step(
      student_cfg,
      state_lib.model_graphdef(student_cfg),
      teacher_cfg,
      state_lib.model_graphdef(teacher_cfg),
      tx,
      schedule,
      settings,
      stage,
      microbatches=microbatches,
      mesh=mesh,
      rules=RULES,
    ),
    in_shardings=(shardings, batch_sharding, teacher_shardings),
  )
  metrics = []
  for b in batches:
    before = jax.device_get(state)
    new_state, m = step(state, jax.device_put(b, batch_sharding), teacher)
    again, m2 = step(state, jax.device_put(b, batch_sharding), teacher)  # pure: same inputs,
    assert jax.tree.all(jax.tree.map(np.array_equal, jax.device_get(m), jax.device_get(m2)))
    assert jax.tree.all(jax.tree.map(np.array_equal, before, jax.device_get(state)))
    state = new_state
    metrics.append(jax.device_get(m))
  return metrics, jax.device_get(state.params)


@pytest.mark.slow
def test_sharded_distill_step_equals_one_device(pair):
  """Stage 2 (teacher and student forward, KL + CE) on a data x fsdp x tensor mesh with 2
  microbatches vs one device and one batch; f64 so reduction order cannot show. Stage 1 runs
  sharded (8-way data) in the train() test below."""
  batches = [_batch(10), _batch(11)]
  with jax.enable_x64(True):
    one, p_one = _distill_run(
      pair, 2, {"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1], 1, batches
    )
    eight, p_eight = _distill_run(
      pair, 2, {"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8], 2, batches
    )
  for a, b in zip(one, eight):
    for key in ("kl", "loss", "distill_loss", "grad_norm"):
      np.testing.assert_allclose(b[key], a[key], rtol=1e-10, err_msg=key)
  assert one[1]["distill_loss"] < one[0]["distill_loss"]  # it learns
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-9), p_one, p_eight)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_accumulate_gradients_k_microbatches_equal_one_batch_distill_loss(pair, stage):
  """The one accumulation helper (`steps.accumulate_gradients`) on both distillation losses:
  4 strided microbatches equal one batch in loss, metric sums and gradients (f64); the
  teacher's params are the step's inputs and get no gradient either way."""
  teacher_cfg, student_cfg, t, fresh = pair
  with jax.enable_x64(True):
    teacher_cfg = dataclasses.replace(teacher_cfg, dtype="float64", param_dtype="float64")
    student_cfg = dataclasses.replace(student_cfg, dtype="float64", param_dtype="float64")
    f64 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)
    teacher = f64(t)
    student = init_student_params(teacher, teacher_cfg, f64(fresh), student_cfg)
    settings = distill.DistillSettings(teacher="", alpha=0.7, temperature=2.0)
    objective = distill.distill_objective(
      student_cfg,
      state_lib.model_graphdef(student_cfg),
      teacher_cfg,
      state_lib.model_graphdef(teacher_cfg),
      settings,
      stage,
      z_loss=1e-4,
    )
    batch = jax.tree.map(jnp.asarray, _batch(12))
    ctx = StepContext(steps_lib.target_count(batch, jnp.float64), jnp.int32(1), teacher)
    run = jax.jit(
      lambda p, k: steps_lib.accumulate_gradients(objective.loss, p, batch, ctx, k),
      static_argnums=1,
    )
    one, four = run(student, 1), run(student, 4)
  assert float(one[0]) > 0
  key = "hidden_err" if stage == 1 else "kl"
  assert float(one[1][key]) > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14), four, one)


# ---------------------------------------------------------------- through train()


def _teacher_workdir(path, **model):
  """A params-only Transformer++ workdir (random weights), as an import would leave it."""
  cfg = config_lib.config_from_dict(
    {
      "model": {
        "kind": "transformer",
        "vocab_size": 320,
        "d_model": 64,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        **model,
      },
      "data": {"tokenizer": "byte"},
    }
  )
  model_cfg = ModelConfig.from_config(cfg.model)
  params = _random_params(model_cfg, 5)
  checkpointer = Checkpointer(str(path))
  checkpointer.save_params(0, params, cfg.to_dict())
  checkpointer.close()
  loading.save_workdir_config(str(path), cfg)
  return str(path)


def _distill_config(teacher, **overrides):
  return small_config(
    **{
      "distill.teacher": teacher,
      "distill.stage1_steps": 2,
      "model.bitlinear_impl": "autodiff",
      "distill.quant_ramp_steps": 3,
      "distill.temperature": 2.0,
      "train.steps": 4,
      "train.checkpoint_every": 2,
      "train.eval_batches": 0,
      **overrides,
    }
  )


@pytest.mark.slow
def test_distill_through_train_resumes_exactly(tmp_path):
  teacher = _teacher_workdir(tmp_path / "teacher")
  full = train(_distill_config(teacher), str(tmp_path / "full"), progress=False)
  assert [r["stage"] for r in full.history] == [1, 1, 2, 2]
  assert [r["quant_strength"] for r in full.history] == pytest.approx([1 / 3, 2 / 3, 1, 1])
  assert full.history[0]["hidden_mse"] > 0 and full.history[-1]["kl"] > 0
  assert int(full.state.step) == 4
  check_resume_is_exact(
    lambda **kw: train(_distill_config(teacher), str(tmp_path / "split"), progress=False, **kw),
    full,
    stop_after=1,
  )


@pytest.mark.slow
@pytest.mark.parametrize(
  "mesh_shape", [{"data": -1, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}]
)
def test_distill_init_is_calibrated_on_the_batch_step_0_trains_on(tmp_path, mesh_shape, capsys):
  """`distill.calibrate` through train(): with lr 0 the state after step 1 is the init, which
  must equal the library's calibrated copy computed here, unsharded, from a fresh iterator's
  first batch (and differ from the plain copy by far more than that tolerance); the teacher
  and the batch are sharded like training's in train()."""
  from mmfree_jax import data as data_lib
  from mmfree_jax.convert import named_calibration
  from mmfree_jax.data.cache import default_cache_dir
  from mmfree_jax.nn.model import build_model
  from mmfree_jax.numerics import loss as loss_lib

  teacher_dir = _teacher_workdir(tmp_path / "teacher")
  cfg = _distill_config(
    teacher_dir,
    **{
      "train.steps": 1,
      "optim.lr": 0.0,
      "distill.stage1_steps": 0,
      "distill.quant_ramp_steps": 0,
      "distill.calibrate": "all_norm",
      "distill.mapping": "kqv",
      "mesh.shape": mesh_shape,
    },
  )
  got = jax.device_get(train(cfg, str(tmp_path / "run"), progress=False).state.params)
  line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("distill: ")]
  assert len(line) == 1 and "calibrate all_norm, o_proj input RMS [" in line[0], line
  assert "mapping kqv" in line[0]

  student = config_lib.validate(cfg)
  settings = distill.DistillSettings.from_config(cfg.distill)
  teacher_cfg = teacher_lib.read_teacher_config(settings.teacher, student)
  teacher_params = teacher_lib.load_teacher_params(settings.teacher, teacher_cfg)
  tokenizer = data_lib.tokenizer_from_config(cfg.data, cache_dir=default_cache_dir())
  batch = next(
    iter(
      data_lib.train_iterator(
        cfg.data, tokenizer, global_batch=cfg.train.global_batch, cache_dir=default_cache_dir()
      )
    )
  )
  inputs, segments, _, mask = loss_lib.split_window(
    jnp.asarray(batch["tokens"]), jnp.asarray(batch["segment_ids"])
  )
  teacher = nnx.merge(state_lib.model_graphdef(teacher_cfg), teacher_params)
  calibration = named_calibration(
    "all_norm", teacher, inputs, segments if teacher_cfg.reset_at_doc_start else None, mask
  )
  _, fresh = nnx.split(build_model(student, nnx.Rngs(params=cfg.train.seed)))
  fresh = fresh.to_pure_dict()
  want = init_student_params(teacher_params, teacher_cfg, fresh, student, calibration, "kqv")
  plain = init_student_params(teacher_params, teacher_cfg, fresh, student)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
    got,
    want,
  )
  o_scale = lambda p: np.asarray(p["blocks"]["attn"]["o_proj"]["norm_scale"])
  assert np.abs(o_scale(got) - o_scale(plain)).max() > 1e-2
  i_kernel = lambda p: np.asarray(p["blocks"]["attn"]["i_proj"]["kernel"])
  assert np.abs(i_kernel(got) - i_kernel(plain)).max() > 1e-2  # i <- K, not V


@pytest.mark.parametrize(
  "overrides,error,match",
  [
    ({"model.d_model": 32}, ConversionError, "d_model"),
    ({"model.kind": "transformer"}, ValueError, "MatMul-free student"),
    ({"distill.alpha": 1.5}, ValueError, "alpha"),
    ({"model.bitlinear_impl": "lean"}, ValueError, "autodiff"),
    ({"distill.calibrate": "most"}, ValueError, "all_norm"),
    ({"distill.mapping": "vvq"}, ValueError, "permutation of 'vkq'"),
  ],
)
def test_bad_distill_config_fails_before_compute(tmp_path, overrides, error, match):
  teacher = _teacher_workdir(tmp_path / "teacher")
  with pytest.raises(error, match=match):
    train(_distill_config(teacher, **overrides), str(tmp_path / "run"), progress=False)
  assert not (tmp_path / "run" / "checkpoints").exists() or not os.listdir(
    tmp_path / "run" / "checkpoints"
  )
