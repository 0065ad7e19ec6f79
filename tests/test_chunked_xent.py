"""Chunked cross-entropy (`numerics.chunked_loss`, issue 27 item 4): the head and the loss over
token chunks equal the unchunked loss and every gradient in float64 (1e-12 relative: the same
per-token terms, only the order of the final sums differs), for both models, with z-loss,
document masks and chunks that do not divide the window, also under a sharded mesh; and the
compiled train step holds no `[tokens, vocab]` fp32 temporary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mmfree_jax
from mmfree_jax import config as config_lib
from mmfree_jax.numerics import chunked_loss
from mmfree_jax.parallel import mesh as mesh_lib
from mmfree_jax.parallel import sharding
from mmfree_jax.train import optim, steps
from mmfree_jax.train import state as state_lib
from tests.test_model_reference import randomize_params

F64_TOL = 1e-12
Z_LOSS = 0.1
RULES = sharding.normalize_rules(config_lib.base_config().mesh.axis_rules)
BATCH, SEQ = 4, 24


def _batch(seed=0, batch=BATCH, seq=SEQ, vocab=256):
  """Packed windows with a document boundary per row and padding (segment 0) at the end."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
  pos = np.arange(seq + 1)[None]
  segments = np.where(pos < rng.integers(2, seq - 4, (batch, 1)), 1, 2)
  segments = np.where(pos >= seq - 2, 0, segments).astype(np.int32)  # padded targets
  return {"tokens": tokens, "segment_ids": segments}


def _model(kind):
  cfg = mmfree_jax.ModelConfig.tiny(kind=kind, dtype="float64", param_dtype="float64")
  model = mmfree_jax.build_model(cfg, 0)
  randomize_params(model, seed=1)
  graphdef, params = nnx.split(model)
  return cfg, graphdef, nnx.to_pure_dict(params)


def _loss_and_grads(cfg, graphdef, params, batch, chunk, mesh=None):
  """The LM objective's loss, its sums and d loss / d params, jitted (under `mesh`)."""
  objective = steps.lm_objective(cfg, graphdef, Z_LOSS, chunk)
  ctx = steps.StepContext(steps.target_count(batch, jnp.float64), jnp.zeros((), jnp.int32))

  def run(params, batch):
    grad = jax.value_and_grad(objective.loss, has_aux=True)
    if mesh is None:
      return grad(params, batch, ctx)
    with sharding.logical_sharding(mesh, RULES):
      return grad(params, batch, ctx)

  return jax.jit(run)(params, batch)


def _assert_equal(got, want):
  """Every leaf (loss, nll/z sums, each parameter's gradient) within F64_TOL relative."""
  for (path, w), g in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
    g, w = np.asarray(g), np.asarray(w)
    err = np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-300)
    assert err <= F64_TOL, (jax.tree_util.keystr(path), err)


@pytest.mark.parametrize("kind", ["mmfree", "transformer"])
def test_chunked_loss_and_gradients_equal_unchunked(kind):
  """Chunks of 5 positions: 24 positions make 5 chunks, one padded position in the last."""
  with jax.enable_x64(True):
    cfg, graphdef, params = _model(kind)
    batch = _batch()
    want = _loss_and_grads(cfg, graphdef, params, batch, 0)
    assert float(want[0][1]["z"]) > 0  # the z-loss term is in the comparison
    _assert_equal(_loss_and_grads(cfg, graphdef, params, batch, 5), want)


MESHES = {
  "d2f2t2": {"data": 2, "fsdp": 2, "tensor": 2},
  "d2c2t2": {"data": 2, "context": 2, "tensor": 2},
}


@pytest.mark.slow
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("kind", ["mmfree", "transformer"])
def test_chunked_loss_under_a_sharded_mesh_equals_one_device(kind, mesh_name):
  """On 8 fake devices (params sharded by the trainer's rules, batch over data x fsdp, sequence
  over context, vocab over tensor), chunks of 6 (24 positions: 4 chunks) and 10 (3 chunks, 6
  padded positions) equal the unchunked loss on one device."""
  with jax.enable_x64(True):
    cfg, graphdef, params = _model(kind)
    batch = _batch(seed=2)
    want = _loss_and_grads(cfg, graphdef, params, batch, 0)
    mesh = mesh_lib.make_mesh(MESHES[mesh_name])
    shardings = state_lib.param_shardings(cfg, mesh, RULES)
    sharded = jax.device_put(params, shardings)
    batch = jax.device_put(batch, sharding.batch_sharding(mesh, RULES))
    for chunk in (6, 10):
      _assert_equal(_loss_and_grads(cfg, graphdef, sharded, batch, chunk, mesh), want)


def test_chunk_layout_and_bad_chunk():
  assert chunked_loss.chunk_layout(24, 5) == (5, 1)
  assert chunked_loss.chunk_layout(24, 8) == (3, 0)
  with pytest.raises(ValueError, match="loss chunk must be >= 1"):
    chunked_loss.chunk_layout(24, -1)


def test_config_refuses_a_chunk_the_context_does_not_split():
  cfg = config_lib.base_config()
  cfg.mesh.shape.context = 4
  cfg.train.loss_chunk_tokens = 6
  with pytest.raises(ValueError, match="loss_chunk_tokens=6 is not a multiple of mesh.shape.co"):
    config_lib.validate(cfg)
  cfg.train.loss_chunk_tokens = 8
  config_lib.validate(cfg)


def _compiled_temp_bytes(kind, chunk, tokens_shape, vocab):
  cfg = config_lib.base_config()
  cfg.model.update(kind=kind, vocab_size=vocab, d_model=32, num_layers=1, num_heads=2)
  cfg.optim.warmup_steps = 0
  model_cfg = config_lib.ModelConfig.from_config(cfg.model)
  tx = optim.make_optimizer(cfg.optim, 10)
  step = steps.make_train_step(
    model_cfg,
    state_lib.model_graphdef(model_cfg),
    tx,
    optim.learning_rate_schedule(cfg.optim, 10),
    z_loss=Z_LOSS,
    loss_chunk_tokens=chunk,
  )
  state = state_lib.abstract_train_state(model_cfg, tx)
  window = jax.ShapeDtypeStruct(tokens_shape, jnp.int32)
  compiled = jax.jit(step).lower(state, {"tokens": window, "segment_ids": window}).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("kind", ["mmfree", "transformer"])
def test_compiled_step_holds_no_tokens_by_vocab_logits(kind):
  """A train step at 2 x 512 tokens and a 16384 vocab (fp32): the unchunked step's
  temporaries hold at least one `[tokens, vocab]` fp32 array (so the measure can fail); with
  chunks of 16 positions the whole step's temporaries (the vocab-sized gradients of the
  embedding and head, the optimizer's update, one chunk's logits) are under a third of one."""
  batch, seq, vocab = 2, 512, 16384
  logits_bytes = batch * seq * vocab * 4
  full = _compiled_temp_bytes(kind, 0, (batch, seq + 1), vocab)
  chunked = _compiled_temp_bytes(kind, 16, (batch, seq + 1), vocab)
  assert full >= logits_bytes, (full, logits_bytes)
  assert chunked < logits_bytes / 3, (chunked, logits_bytes)


def test_long_context_search_solves_the_memory_line():
  """`benchmarks.aot_long_context.extrapolate`: two probes on `peak = 4 GiB + 100 KiB x t`
  (t = tokens per chip, context 4) give the longest `t` under 97% of a 95 GB HBM, rounded
  down to 8192 per chip; a refused probe counts the bytes the compiler says it needed."""
  from benchmarks import aot_long_context as lc

  gib, hbm = 2**30, 95e9
  probe = lambda t: {"seq": 4 * t, "status": "fits", "memory": {"peak_bytes": 4 * gib + 102400 * t}}
  got = lc.extrapolate([probe(65536), probe(131072)], 4, hbm)
  want = int((0.97 * hbm - 4 * gib) / 102400) // 8192 * 8192
  assert got["seq"] == 4 * want and abs(got["base_bytes"] - 4 * gib) < 1, (got, want)
  refused = {"seq": 4, "status": "oom", "oom_counts": "all", "used_bytes": 3.0}
  assert lc.peak_bytes(refused) == 3.0 and lc.peak_bytes({"status": "error"}) is None


@pytest.mark.slow
def test_chunked_loss_moves_no_token_sized_array_over_context():
  """The compiled MatMul-free train step on context 8 with chunks of 40 positions (5 per
  shard): the strided chunks stay local to each context shard; no float array with a
  sequence-sized (320, 40) or chunk-sized (40, 5) dimension is in any collective (only the
  parameter gradients' reductions and the recurrence's `[batch, d]` states)."""
  import re

  from tests import test_train_step as train_step_test

  batch, seq, chunk = 2, 320, 40
  with jax.enable_x64(True):
    mesh = mesh_lib.make_mesh({"data": 1, "context": 8})
    model_cfg, tx, schedule = train_step_test._setup("mmfree")
    shardings = state_lib.train_state_shardings(model_cfg, tx, mesh, RULES)
    batch_sharding = sharding.batch_sharding(mesh, RULES)
    step = steps.make_train_step(
      model_cfg,
      state_lib.model_graphdef(model_cfg),
      tx,
      schedule,
      loss_chunk_tokens=chunk,
      mesh=mesh,
      rules=RULES,
    )
    x = jax.ShapeDtypeStruct((batch, seq + 1), np.int32, sharding=batch_sharding)
    abstract = state_lib.abstract_train_state(model_cfg, tx, shardings)
    lowered = jax.jit(step, in_shardings=(shardings, batch_sharding)).lower(
      abstract, {"tokens": x, "segment_ids": x}
    )
    text = lowered.compile().as_text()
  collective = re.compile(
    r"=\s*(.*?)\s(all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)"
    r"(?:-start)?\("
  )
  arrays = [
    (dtype, {int(n) for n in dims.split(",") if n})
    for match in collective.finditer(text)
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", match.group(1))
  ]
  floats = [(t, dims) for t, dims in arrays if t.startswith(("f", "bf"))]
  assert ("f64", {batch, model_cfg.d_model}) in floats  # the states crossing shards
  token_sized = [(t, dims) for t, dims in floats if dims & {seq, seq // 8, chunk, chunk // 8}]
  assert not token_sized, token_sized
