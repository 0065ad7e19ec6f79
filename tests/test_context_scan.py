"""The MLGRU recurrence across sequence shards (`parallel.context_scan`, issue 27 item 2):
outputs, final states and gradients (wrt f, i, h0) with the sequence split over the context
axis equal the one-device scan in float64 (tolerance 1e-12 relative: the same sums in f64, only
grouped at the shard edges), for every scan_type, with document resets; and the compiled HLO
moves only `[batch, dim]` states across the context axis."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mmfree_jax
from mmfree_jax import ModelConfig
from mmfree_jax import config as config_lib
from mmfree_jax.kernels import common, dispatch
from mmfree_jax.ops import recurrence
from mmfree_jax.parallel import context_scan, sharding
from mmfree_jax.parallel import mesh as mesh_lib
from mmfree_jax.train import state as state_lib
from mmfree_jax.train import steps
from tests import test_train_step as train_step_test
from tests.test_model_reference import randomize_params

F64_TOL = 1e-12
MESHES = {"context8": {"data": 1, "context": 8}, "data2_context4": {"data": 2, "context": 4}}


def _data(batch, seq, dim, seed=0):
  rng = np.random.default_rng(seed)
  f = rng.uniform(0.5, 0.99, (batch, seq, dim))
  f[0, seq // 3, :] = 0.0  # a document start inside a shard
  f[-1, seq // 2, 1] = 0.0  # one on a shard's first position (seq/2 is a boundary)
  i = rng.normal(size=(batch, seq, dim))
  h0 = rng.normal(size=(batch, dim))
  return f, i, h0


def _loss_and_grads(scan, f, i, h0):
  """A loss reading every output and the final state, its value, outputs and d/d(f, i, h0)."""

  def loss(f, i, h0):
    h, last = scan(f, i, h0)
    return jnp.sum(jnp.sin(h) * jnp.cos(i)) + jnp.sum(1.3 * last), (h, last)

  (_, outs), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(f, i, h0)
  return outs + grads


def _assert_close(got, want):
  names = ("h", "final_state", "df", "di", "dh0")
  for name, g, w in zip(names, got, want):
    err = np.max(np.abs(np.asarray(g) - np.asarray(w))) / np.max(np.abs(np.asarray(w)))
    assert err <= F64_TOL, (name, err)


def _check(
  scan_type, mesh_shape, combine="ppermute", chunk_size=3, shape=(2, 64, 6), with_state=True
):
  mesh = mesh_lib.make_mesh(MESHES[mesh_shape])
  fn = recurrence.get_recurrence(scan_type, chunk_size)
  f, i, h0 = _data(*shape)
  h0 = h0 if with_state else None
  sharded = lambda f, i, h0: context_scan.context_recurrence(
    fn, f, i, h0, mesh=mesh, combine=combine
  )
  one = lambda f, i, h0: recurrence.linear_recurrence(f, i, h0, scan_type="sequential")
  if with_state:
    _assert_close(_loss_and_grads(sharded, f, i, h0), _loss_and_grads(one, f, i, h0))
  else:
    got = _loss_and_grads(lambda f, i, _: sharded(f, i, None), f, i, np.zeros(shape[::2]))
    want = _loss_and_grads(lambda f, i, _: one(f, i, None), f, i, np.zeros(shape[::2]))
    _assert_close(got[:4], want[:4])


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", sorted(MESHES))
@pytest.mark.parametrize(
  "scan_type", ["sequential", "associative", "chunked", "sequential_custom_vjp"]
)
def test_sharded_scan_equals_one_device(scan_type, mesh_shape):
  with jax.enable_x64(True):
    _check(scan_type, mesh_shape)


@pytest.mark.parametrize("mesh_shape", sorted(MESHES))
def test_all_gather_combine_equals_one_device(mesh_shape):
  with jax.enable_x64(True):
    _check("sequential", mesh_shape, combine="all_gather")
    _check("chunked", mesh_shape, combine="all_gather", with_state=False)


def test_without_initial_state():
  with jax.enable_x64(True):
    _check("associative", "context8", with_state=False)


def test_batch_the_data_axis_does_not_divide():
  # batch 1 on data 2: replicated over data, each data shard computes it whole.
  with jax.enable_x64(True):
    _check("sequential", "data2_context4", shape=(1, 16, 3))


def test_pallas_kernel_per_shard():
  """The TPU kernel, interpreted (f64 rows of 128 lanes), as each shard's scan."""
  with (
    jax.enable_x64(True),
    dispatch.kernel_platform("tpu", interpret=True),
    warnings.catch_warnings(),
  ):
    warnings.simplefilter("error", common.KernelFallbackWarning)  # the kernel, not sequential
    _check("pallas", "data2_context4", shape=(2, 16, 128))


def test_bad_input_is_refused_with_the_fix():
  f = jnp.ones((2, 12, 4))
  fn = recurrence.get_recurrence("sequential")
  mesh = mesh_lib.make_mesh({"data": 1, "context": 8})
  with pytest.raises(ValueError, match="not a multiple of the 8 context shards"):
    context_scan.context_recurrence(fn, f, f, mesh=mesh)
  with pytest.raises(ValueError, match="combine must be one of"):
    context_scan.context_recurrence(fn, f, f, mesh=mesh, combine="ring")
  plain = jax.make_mesh((8,), ("data",))
  with pytest.raises(ValueError, match="no 'context' axis"):
    context_scan.context_recurrence(fn, f, f, mesh=plain)


# ---- the compiled HLO: what crosses the context axis ----

_COLLECTIVE = re.compile(
  r"=\s*(.*?)\s(all-gather|all-reduce|reduce-scatter|collective-permute"
  r"|all-to-all)(?:-start)?\("
)
_ARRAY = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")


def _collectives(combine, mesh_shape, shape):
  """(op, elements) of every collective in the compiled fwd+bwd of the sharded scan."""
  mesh = mesh_lib.make_mesh(MESHES[mesh_shape])
  fn = recurrence.get_recurrence("sequential")

  def loss(f, i, h0):
    h, last = context_scan.context_recurrence(fn, f, i, h0, mesh=mesh, combine=combine)
    return jnp.sum(jnp.sin(h)) + jnp.sum(last)

  seq_sharding = NamedSharding(mesh, P(("data", "fsdp"), "context", None))
  x = jax.ShapeDtypeStruct(shape, jnp.float64, sharding=seq_sharding)
  h0 = jax.ShapeDtypeStruct((shape[0], shape[2]), jnp.float64)
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, h0).compile().as_text()
  found = []
  for match in _COLLECTIVE.finditer(text):
    for dims in _ARRAY.findall(match.group(1)):
      found.append((match.group(2), int(np.prod([int(n) for n in dims.split(",") if n]))))
  return found


@pytest.mark.parametrize("mesh_shape", sorted(MESHES))
def test_only_states_cross_the_context_axis(mesh_shape):
  batch, seq, dim = 2, 512, 8
  context = MESHES[mesh_shape]["context"]
  with jax.enable_x64(True):
    chain = _collectives("ppermute", mesh_shape, (batch, seq, dim))
    gather = _collectives("all_gather", mesh_shape, (batch, seq, dim))
  local_chunk = batch * (seq // context) * dim  # what a seq-sized exchange would move
  for ops in (chain, gather):
    assert ops, "no collective at all: the shards did not exchange their states"
    # O(batch * dim) per shard boundary: at most the [context, batch, dim] gathered pairs.
    assert max(n for _, n in ops) <= context * batch * dim < local_chunk, ops
  # Forward and backward each pass one [batch_shard, dim] state per chain step.
  assert sum(op == "collective-permute" for op, _ in chain) >= 2 * (context - 1)
  assert sum(n for _, n in chain) < sum(n for _, n in gather)


# ---- the model: the registry runs the context scan under a mesh that splits the sequence ----


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", sorted(MESHES))
def test_model_with_context_parallelism_equals_one_device(mesh_shape):
  """A tiny MatMul-free LM (float64, random parameters, packed documents) under
  `logical_sharding` on a context mesh: logits, final states and parameter gradients equal the
  run without a mesh."""
  mesh = mesh_lib.make_mesh(MESHES[mesh_shape])
  rules = sharding.normalize_rules(config_lib.base_config().mesh.axis_rules)
  rng = np.random.default_rng(5)
  tokens = jnp.asarray(rng.integers(0, 256, (2, 16)), jnp.int32)
  segments = jnp.asarray([[1] * 5 + [2] * 11, [3] * 8 + [4] * 8], jnp.int32)
  with jax.enable_x64(True):
    cfg = ModelConfig.tiny(
      dtype="float64", param_dtype="float64", scan_type="chunked", chunk_size=3
    )
    model = mmfree_jax.build_model(cfg, 0)
    randomize_params(model, seed=3)
    graphdef, params = nnx.split(model)
    weights = jnp.asarray(rng.normal(size=(2, 16, cfg.vocab_size)))

    def run(params, split):
      def loss(params):
        logits, state = nnx.merge(graphdef, params)(tokens, segment_ids=segments)
        return jnp.sum(jnp.tanh(logits) * weights), (logits, state)

      if not split:
        return jax.grad(loss, has_aux=True)(params)
      with sharding.logical_sharding(mesh, rules):
        return jax.grad(loss, has_aux=True)(params)

    one = jax.jit(lambda p: run(p, False))(params)
    split = jax.jit(lambda p: run(p, True))
    assert "collective_permute" in split.lower(params).as_text()  # the context scan ran
    got = split(params)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(one)):
    err = np.max(np.abs(np.asarray(g) - np.asarray(w))) / max(np.max(np.abs(np.asarray(w))), 1e-300)
    assert err <= F64_TOL, err


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mmfree", "transformer"])
def test_train_steps_on_a_context_mesh_equal_one_device(monkeypatch, kind):
  """Two trainer steps (float64, packed documents) on data 2 x context 4 equal one device, to
  the tolerances of tests/test_train_step.py (the Transformer++ through
  `parallel.context_attention`)."""
  calls = []
  real = context_scan.context_recurrence
  monkeypatch.setattr(
    context_scan,
    "context_recurrence",
    lambda *a, **k: calls.append(k["mesh"].shape["context"]) or real(*a, **k),
  )
  with jax.enable_x64(True):
    model_cfg, tx, schedule = train_step_test._setup(kind)
    batches = [train_step_test._batch(0), train_step_test._batch(1)]
    ref_losses, ref_params, _ = train_step_test._run(
      model_cfg, tx, schedule, {"data": 1}, jax.devices()[:1], batches
    )
    losses, params, _ = train_step_test._run(
      model_cfg, tx, schedule, MESHES["data2_context4"], jax.devices(), batches
    )
  if kind == "mmfree":
    assert calls and set(calls) == {4}, calls  # each layer's recurrence ran split
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-10)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-8), params, ref_params)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mmfree", "transformer"])
def test_train_step_moves_no_seq_sized_activation_over_context(kind):
  """The compiled train step (fwd + bwd + update) on context 8, packed windows `[batch, seq+1]`
  arriving split over the batch axes only: no array with a sequence dimension (whole, 320, the
  window's 321, or one shard's, 40), float or integer, is in any collective, except for the
  Transformer++ its K/V all-gather, dK/dV reduce-scatter and the keys' segment-id all-gather
  (tests/test_context_attention.py). Each device cuts its own chunks of the inputs, targets and
  segment ids (`context_positions.take_chunks`), and the reset mask and positions are computed
  per chunk: the MatMul-free step's only collectives with a sequence-independent size are the
  `[batch, d]` states and the `[batch]` id passed to the next shard."""
  batch, seq, context = 2, 320, 8
  with jax.enable_x64(True):
    mesh = mesh_lib.make_mesh(MESHES["context8"])
    model_cfg, tx, schedule = train_step_test._setup(kind)
    rules = train_step_test.RULES
    shardings = state_lib.train_state_shardings(model_cfg, tx, mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    x = jax.ShapeDtypeStruct((batch, seq + 1), np.int32, sharding=batch_sharding)
    step = jax.jit(
      steps.make_train_step(
        model_cfg, state_lib.model_graphdef(model_cfg), tx, schedule, mesh=mesh, rules=rules
      ),
      in_shardings=(shardings, batch_sharding),
    )
    text = (
      step.lower(
        state_lib.abstract_train_state(model_cfg, tx, shardings), {"tokens": x, "segment_ids": x}
      )
      .compile()
      .as_text()
    )
  arrays = [
    (dtype, [int(n) for n in dims.split(",") if n])
    for match in _COLLECTIVE.finditer(text)
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", match.group(1))
  ]
  seq_sized = [(t, dims) for t, dims in arrays if {seq + 1, seq, seq // context} & set(dims)]
  if kind == "mmfree":
    assert ("f64", [batch, model_cfg.d_model]) in arrays  # the states crossing shards
    assert not seq_sized, seq_sized
  else:
    kv = [batch, seq, model_cfg.num_heads, model_cfg.head_dim]
    allowed = [("f64", kv), ("f64", [batch, seq // context] + kv[2:]), ("s32", [batch, seq])]
    assert ("f64", kv) in seq_sized
    assert [a for a in seq_sized if a not in allowed] == []
  assert ("s32", [batch]) in arrays  # the previous shard's last segment id


def test_registry_splits_only_lengths_the_context_divides(monkeypatch):
  """Under `logical_sharding` on context 8: a 16-step input runs the context scan; a 12-step
  one (a ragged prompt) and a 1-step one (decode) run unsplit; all equal one device."""
  calls = []
  real = context_scan.context_recurrence
  monkeypatch.setattr(
    context_scan, "context_recurrence", lambda *a, **k: calls.append(a[1].shape[1]) or real(*a, **k)
  )
  mesh = mesh_lib.make_mesh(MESHES["context8"])
  rules = sharding.normalize_rules(config_lib.base_config().mesh.axis_rules)
  with jax.enable_x64(True):
    for seq in (16, 12, 1):
      f, i, h0 = _data(2, seq, 3)

      def split(f, i, h0):
        with sharding.logical_sharding(mesh, rules):
          return recurrence.linear_recurrence(f, i, h0, scan_type="associative")

      got = jax.jit(split)(f, i, h0)
      want = recurrence.linear_recurrence(f, i, h0)
      for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=F64_TOL, atol=F64_TOL)
  assert calls == [16]
