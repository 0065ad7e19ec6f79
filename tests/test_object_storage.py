"""End to end with every path in a bucket, against real emulator processes
(tests/storage_emulators.py): the CLIs as a user runs them, pointed at the emulators by the
clients' standard variables only (`STORAGE_EMULATOR_HOST`, `TENSORSTORE_GCS_HTTP_URL`, `AWS_*`).

jsonl in both buckets -> `python -m mmfree_jax.data.prepare` -> shards in both buckets ->
`train.py --workdir=s3://…` on the gs:// shards, killed with SIGKILL after a committed
checkpoint -> resumed (a fresh process: its step is downloaded from the bucket) -> params
bitwise equal to an uninterrupted run with a gs:// workdir on the s3:// shards (same tokens,
so the same params) -> `eval.py` on both workdirs (the same results) -> `python -m
mmfree_jax.export` from the s3:// workdir to both buckets -> `eval.py --packed` from gs://,
its results in s3://; and two processes saving one checkpoint to a gs:// workdir.

Every test fails if a write lands on the local disk instead: the emulators must hold the
objects, and no `gs:`/`s3:` folder may appear in the working directory or the tmp dirs.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import portpicker
import pytest

from mmfree_jax import paths

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 6, 2
LOCK_STALE_S = 3
MARKER = "commit_success.txt"
TRAIN_FLAGS = [
  "--noprogress",
  "--sample_prompt=",
  "--config.model.vocab_size=320",
  "--config.model.d_model=64",
  "--config.model.num_layers=2",
  "--config.model.scan_type=sequential",
  "--config.data.source=array_record",
  "--config.data.tokenizer=byte",
  "--config.data.seq_len=32",
  "--config.train.global_batch=8",
  "--config.train.log_every=1",
  "--config.train.eval_every=0",
  f"--config.train.checkpoint_every={EVERY}",
  "--config.train.sample_tokens=0",
  "--config.optim.warmup_steps=1",
  # a bucket lock is taken over once its heartbeat stops (no pid check across hosts): short
  # beats so that the run after the kill -9 finds it stale in seconds, not minutes
  "--config.train.lock_heartbeat_s=1",
  f"--config.train.lock_stale_s={LOCK_STALE_S}",
]
_STORAGE_VARS = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_CLOUD_PROJECT")


def _env(*emulators) -> dict:
  """The test environment (jax platform, jit cache) with the storage variables of exactly
  `emulators`: nothing project-specific points the CLIs at a bucket."""
  env = {k: v for k, v in os.environ.items() if not (k in _STORAGE_VARS or k.startswith("AWS_"))}
  for e in emulators:
    env.update(e.env)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  return env


def _cmd(*args) -> list[str]:
  first = args[0]
  if first.endswith(".py"):
    return [sys.executable, os.path.join(REPO, first), *args[1:]]
  return [sys.executable, "-m", *args]


def _run(args, env, cwd, timeout=240) -> str:
  proc = subprocess.run(
    _cmd(*args), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
  )
  assert proc.returncode == 0, f"{args[:2]}: {proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
  return proc.stdout + proc.stderr


def _start(args, env, cwd) -> subprocess.Popen:
  return subprocess.Popen(
    _cmd(*args), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def _finish(proc, what, timeout=300) -> str:
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, f"{what}: {out[-4000:]}"
  return out


def _docs(n: int, seed: int) -> str:
  rng = np.random.default_rng(seed)
  words = "the light was upon the waters and every living thing that moveth in the earth".split()
  lines = [
    json.dumps({"text": " ".join(rng.choice(words, size=int(rng.integers(20, 60))))})
    for _ in range(n)
  ]
  return "\n".join(lines) + "\n"


def _corpus(root: str) -> str:
  """A jsonl corpus (~15k bytes, the byte tokenizer's tokens) and a small eval file written
  straight into the bucket; returns the corpus glob."""
  paths.write_atomic(paths.join(root, "corpus", "docs.jsonl"), _docs(60, 0))
  paths.write_atomic(paths.join(root, "eval", "docs.jsonl"), _docs(4, 1))
  return paths.join(root, "corpus", "*.jsonl")


def _prepare_args(inputs: str, out: str) -> list[str]:
  return [
    "mmfree_jax.data.prepare",
    f"--inputs={inputs}",
    "--format=jsonl",
    "--tokenizer=byte",
    f"--out={out}",
    "--shard_tokens=4000",
    "--record_tokens=64",
    "--val_shards=1",
  ]


def _train_args(workdir: str, data: str, *extra: str, steps: int = STEPS) -> list[str]:
  return [
    "train.py",
    f"--workdir={workdir}",
    f"--config.data.paths={data}",
    f"--config.train.steps={steps}",
    *TRAIN_FLAGS,
    *extra,
  ]


def _committed(emulator, workdir: str) -> list[int]:
  """Steps whose `checkpoints/<step>/commit_success.txt` (orbax's marker, written last on
  object storage) is in the bucket."""
  prefix = paths.join(workdir, "checkpoints") + "/"
  rel = [n[len(prefix) :].split("/") for n in emulator.list_objects(prefix) if n.startswith(prefix)]
  return sorted(int(p[0]) for p in rel if len(p) == 2 and p[0].isdigit() and p[1] == MARKER)


def _kill_after_commit(proc, emulator, workdir: str, timeout=240) -> list[int]:
  """SIGKILL `proc` once a checkpoint before the last step is committed in the bucket."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    steps = [s for s in _committed(emulator, workdir) if s < STEPS]
    if steps or proc.poll() is not None:
      break
    time.sleep(0.1)
  assert proc.poll() is None, f"the run ended before it could be killed: {proc.stdout.read()}"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  time.sleep(LOCK_STALE_S + 1)  # its lock's heartbeat is stale now: the next run takes it over
  return steps


def _params(workdir: str, step: int, tmp) -> dict:
  """The train state of a checkpoint step as saved (numpy, whatever process layout wrote it),
  read back by orbax: from a gs:// bucket, or from a copy of an s3:// one (orbax reads no
  s3:// path)."""
  path = paths.join(workdir, "checkpoints", str(step), "state")
  if paths.scheme(path) == "s3":
    local = str(tmp / f"state-{step}")
    for name in paths.find(path):
      paths.makedirs(paths.dirname(paths.join(local, name)))
      paths.write_atomic(paths.join(local, name), paths.read_bytes(paths.join(path, name)))
    path = local
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree.leaves_with_path(state)}


def _no_local_bucket_folders(*dirs) -> None:
  for d in dirs:
    for root, folders, _ in os.walk(d):
      bad = [f for f in folders if f in ("gs:", "s3:")]
      assert not bad, f"a bucket path was written to the local disk: {root}/{bad[0]}"


def _train_chain(gcs_emulator, s3_emulator, cwd) -> dict:
  """Prepares the corpus in both buckets, then trains on gs:// shards with an s3:// workdir,
  killed after a committed checkpoint and resumed, next to an uninterrupted run on the
  s3:// shards with a gs:// workdir."""
  gs, s3 = gcs_emulator.root(), s3_emulator.root()
  env = _env(gcs_emulator, s3_emulator)
  data = {root: paths.join(root, "prepared") for root in (gs, s3)}
  t = time.monotonic()
  preparing = [_start(_prepare_args(_corpus(root), out), env, cwd) for root, out in data.items()]
  for out, proc in zip(data.values(), preparing):
    _finish(proc, f"prepare into {out}")
  print(f"prepared both buckets in {time.monotonic() - t:.0f} s")
  run, reference = paths.join(s3, "run"), paths.join(gs, "reference")
  t = time.monotonic()
  killed = _start(_train_args(run, data[gs]), env, cwd)
  uninterrupted = _start(_train_args(reference, data[s3]), env, cwd)
  try:
    committed = _kill_after_commit(killed, s3_emulator, run)
    print(f"killed after {time.monotonic() - t:.0f} s with steps {committed} committed")
    resumed = _run(_train_args(run, data[gs]), env, cwd)
    _finish(uninterrupted, "the uninterrupted run")
    print(f"resumed and finished {time.monotonic() - t:.0f} s after the first start")
  finally:
    for p in (killed, uninterrupted):
      if p.poll() is None:
        p.kill()
        p.wait()
  return {
    "cwd": cwd,
    "env": env,
    "gs": gs,
    "s3": s3,
    "data": data,
    "run": run,
    "reference": reference,
    "committed_at_kill": committed,
    "resumed_log": resumed,
  }


def _check_prepared(chain, gcs_emulator, s3_emulator):
  """The same corpus prepared into both buckets: the same shards, byte for byte."""
  for emulator, root in ((gcs_emulator, chain["gs"]), (s3_emulator, chain["s3"])):
    names = emulator.list_objects(chain["data"][root])
    shards = [n for n in names if n.endswith(".array_record")]
    assert shards and paths.join(chain["data"][root], "manifest.json") in names, names
    for name in shards:
      other = name.replace(root, chain["gs" if root == chain["s3"] else "s3"])
      assert paths.read_bytes(name) == paths.read_bytes(other), name
  _no_local_bucket_folders(chain["cwd"])


def _check_resumed_bitwise(chain, gcs_emulator, s3_emulator, tmp):
  """The killed and resumed s3:// run ends with the uninterrupted gs:// run's params, bitwise,
  and its per-step losses; both buckets kept the same checkpoint steps."""
  assert chain["committed_at_kill"], "killed before any committed checkpoint"
  assert "resumed from step" in chain["resumed_log"], chain["resumed_log"][-3000:]
  names = s3_emulator.list_objects(chain["run"])
  for required in ("config.json", "metrics.jsonl", f"checkpoints/{STEPS}/commit_success.txt"):
    assert paths.join(chain["run"], required) in names, (required, names[:20])
  # the same retention (keep_checkpoints=3) in both
  assert _committed(s3_emulator, chain["run"]) == _committed(gcs_emulator, chain["reference"])
  assert _committed(gcs_emulator, chain["reference"])[-1] == STEPS
  resumed = _params(chain["run"], STEPS, tmp)
  reference = _params(chain["reference"], STEPS, tmp)
  assert sorted(resumed) == sorted(reference)
  for k in reference:
    np.testing.assert_array_equal(resumed[k], reference[k], err_msg=k)  # same arithmetic
  rows = [
    [json.loads(line) for line in paths.read_text(paths.join(w, "metrics.jsonl")).splitlines()]
    for w in (chain["run"], chain["reference"])
  ]
  losses = [{r["step"]: r["loss"] for r in rs if "loss" in r} for rs in rows]
  assert sorted(losses[0]) == list(range(1, STEPS + 1)) and losses[0] == losses[1]
  _no_local_bucket_folders(chain["cwd"])


def _ppl(results: dict) -> float:
  (value,) = results["perplexity"].values()
  return value["perplexity"]


def _check_eval_and_export(chain, gcs_emulator, s3_emulator):
  """eval.py on the s3:// and the gs:// workdir (the same params: the same results), the
  export from the s3:// workdir to gs:// and to s3:// (all at once: they only read the
  checkpoints), then eval.py --packed from gs:// with its results in s3://."""
  env, cwd, run, s3 = chain["env"], chain["cwd"], chain["run"], chain["s3"]
  doc = paths.join(chain["gs"], "eval", "docs.jsonl")
  packed = {root: paths.join(root, "packed") for root in (chain["gs"], s3)}
  procs = {
    **{
      f"eval.py on {w}": _start(["eval.py", f"--workdir={w}", f"--ppl_file={doc}"], env, cwd)
      for w in (run, chain["reference"])
    },
    **{
      f"export to {dst}": _start(
        ["mmfree_jax.export", f"--workdir={run}", f"--dst={dst}"], env, cwd
      )
      for dst in packed.values()
    },
  }
  for what, proc in procs.items():
    _finish(proc, what)
  latent, latent_gs = (
    json.loads(paths.read_text(paths.join(w, "eval", f"step_{STEPS}.json")))
    for w in (run, chain["reference"])
  )
  assert _ppl(latent) == _ppl(latent_gs), (latent, latent_gs)
  for emulator, dst in zip((gcs_emulator, s3_emulator), packed.values()):
    assert paths.join(dst, "model.safetensors") in emulator.list_objects(dst)
  gs_files, s3_files = (sorted(paths.listdir(d)) for d in packed.values())
  assert gs_files == s3_files
  for name in gs_files:  # one checkpoint, one export: the same bytes in both buckets
    assert paths.read_bytes(paths.join(packed[chain["gs"]], name)) == paths.read_bytes(
      paths.join(packed[s3], name)
    ), name
  out = paths.join(s3, "packed_eval")
  _run(
    ["eval.py", f"--packed={packed[chain['gs']]}", f"--ppl_file={doc}", f"--output_dir={out}"],
    env,
    cwd,
  )
  results = [n for n in s3_emulator.list_objects(out) if n.endswith(".json")]
  assert len(results) == 1, results
  got, want = _ppl(json.loads(paths.read_text(results[0]))), _ppl(latent)
  assert abs(got - want) <= 1e-4 * want  # test_export's packed-vs-latent tolerance
  _no_local_bucket_folders(cwd)


def test_every_path_in_a_bucket(gcs_emulator, s3_emulator, tmp_path):
  """One test, not several sharing a fixture: pytest-xdist would build the chain once per
  worker."""
  chain = _train_chain(gcs_emulator, s3_emulator, tmp_path)
  _check_prepared(chain, gcs_emulator, s3_emulator)
  _check_resumed_bitwise(chain, gcs_emulator, s3_emulator, tmp_path)
  _check_eval_and_export(chain, gcs_emulator, s3_emulator)


def test_two_processes_save_one_checkpoint_to_gcs(gcs_emulator, tmp_path):
  """Two processes (one device each) train on gs:// shards and save one checkpoint to a
  gs:// workdir, each process its shards of it; it restores."""
  env = _env(gcs_emulator)
  root = gcs_emulator.root()
  data = paths.join(root, "prepared")
  _run(_prepare_args(_corpus(root), data), env, tmp_path)
  workdir = paths.join(root, "run")
  port = portpicker.pick_unused_port()
  dist = [f"--config.dist.coordinator=localhost:{port}", "--config.dist.num_processes=2"]
  procs = [
    _start(
      _train_args(workdir, data, *dist, f"--config.dist.process_id={i}", steps=EVERY),
      env,
      tmp_path,
    )
    for i in range(2)
  ]
  try:
    for i, p in enumerate(procs):
      _finish(p, f"process {i}")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert _committed(gcs_emulator, workdir) == [EVERY]
  names = gcs_emulator.list_objects(paths.join(workdir, "checkpoints", str(EVERY), "state"))
  assert any("ocdbt.process_1" in n for n in names), names  # process 1 wrote its part
  params = _params(workdir, EVERY, tmp_path)
  assert params and all(np.isfinite(v).all() for v in params.values())
  _no_local_bucket_folders(tmp_path)
