"""Issue 28, checkpoint and process side: uncommitted steps are set aside and re-saved,
corrupted checkpoint bytes are refused (checksums), the stale-lock takeover is atomic, and
grain workers die with their trainer."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmfree_jax.checkpoint import checksum, loading
from mmfree_jax.checkpoint import manager as ckpt_lib
from mmfree_jax.train import trainer
from mmfree_jax.train.workdir_lock import LOCK_NAME
from tests.train_configs import small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


# -------------------------------------------------------------------- uncommitted step folders


@pytest.mark.slow
def test_uncommitted_final_step_is_set_aside_and_saved_again(tmp_path):
  work = str(tmp_path)
  over = {"train.steps": 4, "train.checkpoint_every": 2}
  trainer.train(small_config(**over), work, progress=False)
  os.remove(tmp_path / "checkpoints" / "4" / ckpt_lib.COMMIT_MARKER)  # a save cut short
  result = trainer.train(small_config(**over), work, progress=False)
  assert [r["step"] for r in result.history] == [3, 4]  # resumed from 2, redid 3 and 4
  model, _, step = loading.load_model(work)
  assert step == 4  # saved again, not skipped because a folder named 4 was there
  _, saved = nnx.split(model)
  jax.tree.map(np.testing.assert_array_equal, saved.to_pure_dict(), result.state.params)
  aside = tmp_path / "abandoned_checkpoints"
  (moved,) = os.listdir(aside)
  assert moved.endswith("-uncommitted") and os.listdir(aside / moved) == ["4"]
  with open(tmp_path / "metrics.jsonl") as f:
    assert json.loads(f.readlines()[-1])["step"] == 4


# ------------------------------------------------------------------- checksums of saved arrays


def _fmix(h):
  h = h ^ (h >> 16)
  h = (h * 0x85EBCA6B) % 2**32
  h = h ^ (h >> 13)
  h = (h * 0xC2B2AE35) % 2**32
  return h ^ (h >> 16)


def _numpy_digest(x):
  """The documented digest in numpy (uint64 arithmetic, reduced mod 2^32)."""
  x = np.asarray(x)
  words = (
    (
      x.view(np.uint32)
      if x.dtype.itemsize == 4
      else x.view({1: np.uint8, 2: np.uint16}[x.dtype.itemsize])
    )
    .astype(np.uint64)
    .ravel()
  )
  index = np.arange(words.size, dtype=np.uint64)
  h = _fmix(words ^ (index * checksum._K % 2**32) ^ checksum._S)
  return f"{int(h.sum() % 2**32):08x}{int((h * (index | 1)).sum() % 2**32):08x}"


def test_checksum_matches_numpy_is_sharding_invariant_and_sees_every_bit():
  rng = np.random.default_rng(0)
  tree = {
    "w": rng.normal(size=(16, 24)).astype(np.float32),
    "b": rng.normal(size=(16,)).astype(jnp.bfloat16),
    "q": rng.integers(-128, 128, size=(8, 3), dtype=np.int8),
    "step": np.int32(7),
  }
  saved = checksum.digests(tree)
  for name, x in tree.items():
    assert saved[name] == {"digest": _numpy_digest(x), "dtype": str(x.dtype)}, name
  mesh = jax.make_mesh((8,), ("fsdp",))
  sharded = {
    k: jax.device_put(v, NamedSharding(mesh, P("fsdp") if np.ndim(v) else P()))
    for k, v in tree.items()
  }
  assert len(sharded["w"].sharding.device_set) == 8
  assert checksum.digests(sharded) == saved  # any mesh gives the global array's digest
  for name in ("w", "b", "q"):
    flat = tree[name].reshape(-1).view(np.uint8)
    for byte, bit in ((0, 0), (flat.size // 2, 7), (flat.size - 1, 3)):  # one flipped bit
      bad = flat.copy()
      bad[byte] ^= 1 << bit
      changed = dict(tree, **{name: bad.view(tree[name].dtype).reshape(tree[name].shape)})
      assert checksum.mismatches(changed, saved) == [name]
  swapped = tree["w"].copy()
  swapped[[0, 1]] = swapped[[1, 0]]  # same values, other places
  assert checksum.mismatches(dict(tree, w=swapped), saved) == ["w"]


def _flip_16_bytes(state_dir, key):
  """XORs 16 bytes in the middle of one stored chunk (zstd-compressed, same size), found by its
  key in orbax's OCDBT store, as bit rot would. zstd frames carry no checksum here: the chunk
  still decodes, to other values (NaN, huge numbers). Writing through the store, rather than
  patching a file at an offset, hits this chunk whatever the concurrent writers' file layout."""
  store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{state_dir}/"}).result()
  data = bytearray(store.read(key).result().value)
  middle = len(data) // 2
  data[middle : middle + 16] = bytes(b ^ 0x5A for b in data[middle : middle + 16])
  store.write(key, bytes(data)).result()


@pytest.mark.slow
@pytest.mark.subprocess
def test_corrupted_array_bytes_are_refused_on_resume_and_load_sharded(tmp_path):
  work = str(tmp_path)
  fsdp = {"data": 1, "fsdp": 8, "tensor": 1}  # each array saved from 8 shards
  cfg = lambda steps: small_config(
    **{"train.steps": steps, "train.checkpoint_every": 2, "mesh.shape": fsdp}
  )
  trainer.train(cfg(4), work, progress=False)
  assert loading.load_model(work)[2] == 4  # one device: another sharding, still verified
  _flip_16_bytes(tmp_path / "checkpoints" / "4" / "state", b"params.embedding/0.0")
  refused = (
    r"checkpoint step 4 .* corrupted: the bytes read for params/embedding do not "
    r"match .*--restore_step.*\[2\]"
  )
  with pytest.raises(ckpt_lib.CheckpointError, match=refused):
    trainer.train(cfg(6), work, progress=False, allow_steps_change=True)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"step 4 .* params/embedding do .*--step"):
    loading.load_model(work)
  proc = subprocess.run(
    [sys.executable, os.path.join(REPO, "eval.py"), f"--workdir={work}", "--ppl_split=val"],
    capture_output=True,
    text=True,
    env=dict(_env(), JAX_PLATFORMS="cpu"),
    timeout=300,
    check=False,
  )
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith("eval.py: error: checkpoint step 4 "), (
    proc.stderr[-2000:]
  )
  assert loading.load_model(work, step=2)[2] == 2  # eval.py --step=2
  result = trainer.train(cfg(6), work, progress=False, restore_step=2, allow_steps_change=True)
  assert int(result.state.step) == 6


# ------------------------------------------------------------------ stale-lock takeover race

# Waits for a common start time, tries the lock once, then holds it (never releases) until its
# stdin closes, so a racer that comes late finds a live holder, not a free workdir.
_RACER = r"""
import sys, time
from mmfree_jax.train.workdir_lock import WorkdirLock, WorkdirLockedError
work, start = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
try:
  WorkdirLock(work).acquire()
except WorkdirLockedError:
  print("verdict: refused", flush=True)
  sys.exit(0)
print("verdict: held", flush=True)
sys.stdin.read()
"""


def _verdict(proc):
  for line in proc.stdout:  # the takeover prints a note first
    if line.startswith("verdict: "):
      return line.split()[1]
  return "exited"


@pytest.mark.slow
@pytest.mark.subprocess
def test_stale_lock_race_has_exactly_one_holder(tmp_path):
  racers, trials = 6, 10
  for trial in range(trials):
    work = tmp_path / str(trial)
    work.mkdir()
    (work / LOCK_NAME).write_text(
      json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": "earlier"})
    )
    start = time.time() + 1.5
    procs = [
      subprocess.Popen(
        [sys.executable, "-c", _RACER, str(work), str(start)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
      )
      for _ in range(racers)
    ]
    verdicts = [_verdict(p) for p in procs]
    for p in procs:
      p.stdin.close()
    errors = [p.stderr.read() for p in procs]
    for p in procs:
      p.wait(timeout=30)
    assert set(verdicts) <= {"held", "refused"}, (verdicts, errors)
    assert verdicts.count("held") == 1, f"trial {trial}: {verdicts}"


# --------------------------------------------------------------- grain workers die with parent


def _children():
  """{pid: parent pid} of every live (not zombie) process, from /proc."""
  table = {}
  for name in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{name}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
      continue
    if fields[0] != "Z":
      table[int(name)] = int(fields[1])
  return table


def _descendants(pid):
  table, found, frontier = _children(), set(), {pid}
  while frontier:
    frontier = {c for c, parent in table.items() if parent in frontier} - found
    found |= frontier
  return found


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process table from /proc")
def test_grain_workers_die_with_a_sigkilled_trainer(tmp_path):
  work = tmp_path / "work"
  overrides = {
    "data.worker_count": 2,
    "train.steps": 100000,
    "train.checkpoint_every": 0,
    "train.log_every": 1,
  }
  proc = subprocess.Popen(
    [
      sys.executable,
      os.path.join(REPO, "tests", "_train_worker.py"),
      str(work),
      str(tmp_path / "out"),
      json.dumps(overrides),
    ],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    env=_env(),
  )
  try:
    deadline = time.time() + 300
    while not (work / "metrics.jsonl").exists() or not (work / "metrics.jsonl").read_text():
      assert proc.poll() is None and time.time() < deadline, "the trainer made no step"
      time.sleep(0.2)
    children = _descendants(proc.pid)
    assert len(children) >= 2, children  # the two grain workers (and spawn's helpers)
  finally:
    proc.kill()
    proc.wait()
  killed = time.time()
  while (alive := children & set(_children())) and time.time() < killed + 10:
    time.sleep(0.1)
  print(f"{len(children)} child processes, gone {time.time() - killed:.1f} s after the kill")
  for pid in alive:  # do not leave them behind when the test fails
    os.kill(pid, signal.SIGKILL)
  assert not alive, f"processes {sorted(alive)} outlived their SIGKILLed trainer by 10 s"
