"""Checkpoint cost by storage: a small model's train state saved to and restored from a local
disk, a `gs://` bucket (a GCS emulator process on loopback) and an `s3://` one (moto's server
on loopback; checkpoints staged through a local folder, `checkpoint/staging.py`), and what
the train loop loses.

    python -m benchmarks.bench_checkpoint_storage [--preset toy|cpu|accel] [--gcs_root gs://B/P]

Saves go through `Checkpointer` (orbax, asynchronous, with checksums), as `train.py` saves.
Per backend, round-robin with the other (median of rounds):

- `save_block_s`: what `Checkpointer.save` blocks the loop for (the copy of the state to host
  memory and the checksums; the write itself runs in orbax's background thread);
- `commit_s`: save until committed (`wait`), i.e. the whole write (`s3://`: the local write
  and the upload);
- `restore_s`: `Checkpointer.restore` of the latest step into the state's shapes, checksums
  verified, by a fresh read-only Checkpointer, as a resumed run restores (`s3://`: the
  download included);
- `interval_overhead_s`: a save followed by `INTERVAL` train steps, minus `INTERVAL` steps
  without a save: the loop's cost of one checkpoint, with the background write competing for
  the same CPUs (`overhead_pct` = that over the interval's step time).

The GCS emulator (`gcp-storage-emulator`, a Python server) on loopback is not a real bucket:
no network latency or bandwidth limit, but a slow single-threaded server. Its numbers show the
code path's overhead (per-object requests, no local rename), not what a GCS region gives.
`--gcs_root gs://bucket/prefix` times a real bucket instead (the clients' own credentials),
as the row `gcs`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time

import jax
import numpy as np

from benchmarks import common, setups
from mmfree_jax import paths
from mmfree_jax.checkpoint import manager as ckpt_lib

NAME = "bench_checkpoint_storage"
# (d_model, num_layers, vocab, batch, seq) of the model whose train state is saved
SHAPES = {
  "toy": (64, 2, 256, 2, 32),
  "cpu": (256, 4, 8192, 2, 64),
  "accel": (1024, 12, 32000, 8, 1024),
}
ROUNDS = {"toy": 1, "cpu": 5, "accel": 5}
INTERVAL = 10  # train steps after each timed save


def _servers(gcs_root: str | None):
  """The tests' emulators (tests/storage_emulators.py), one process each for the whole run:
  S3 always, GCS unless a real `gcs_root` is timed."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if root not in sys.path:
    sys.path.insert(0, root)
  from tests import storage_emulators  # pylint: disable=import-outside-toplevel

  stack = contextlib.ExitStack()
  gcs = None if gcs_root else stack.enter_context(storage_emulators.gcs_server())
  return stack, gcs, stack.enter_context(storage_emulators.s3_server())


class _Backend:
  """A Checkpointer on one workdir and a counter of the steps it saved.

  Each backend numbers its steps from its own `first_step`: in one process, tensorstore's
  OCDBT cache mixes up `checkpoints/<step>/state` of a local and a `gs://` checkpoint with the
  same step (the `gs://` write then fails with "Malformed StorageGeneration"); a training run
  writes one workdir and never meets this.
  """

  def __init__(self, workdir: str, first_step: int):
    self.workdir = workdir
    self.checkpointer = ckpt_lib.Checkpointer(workdir, keep=2)
    self.step = first_step

  def save(self, state) -> float:
    """Starts a save of `state`; returns the seconds it blocked."""
    self.step += 1
    t = time.perf_counter()
    self.checkpointer.save(self.step, state, None, {"bench": NAME})
    return time.perf_counter() - t


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _time_round(backends: dict, runner, times: dict) -> None:
  """One round: for each backend a save + INTERVAL steps, commit, restore; then plain steps."""
  for name, b in backends.items():
    t = time.perf_counter()
    times[name]["save_block_s"].append(b.save(runner.state))
    for _ in range(INTERVAL):
      metrics = runner()
    jax.block_until_ready(metrics)
    times[name]["interval_s"].append(time.perf_counter() - t)
    b.checkpointer.wait()
    t = time.perf_counter()
    b.save(runner.state)
    b.checkpointer.wait()
    times[name]["commit_s"].append(time.perf_counter() - t)
    abstract = _abstract(runner.state)
    t = time.perf_counter()
    reader = ckpt_lib.Checkpointer(b.workdir, read_only=True)
    jax.block_until_ready(reader.restore(b.step, abstract))
    times[name]["restore_s"].append(time.perf_counter() - t)
    reader.close()
  t = time.perf_counter()
  for _ in range(INTERVAL):
    metrics = runner()
  jax.block_until_ready(metrics)
  times["plain_interval_s"].append(time.perf_counter() - t)


def _empty_times(names) -> dict:
  keys = ("save_block_s", "interval_s", "commit_s", "restore_s")
  return {n: {k: [] for k in keys} for n in names} | {"plain_interval_s": []}


def _rows(times: dict, names, state_bytes: int) -> list[dict]:
  plain = float(np.median(times["plain_interval_s"]))
  rows = []
  for name in names:
    med = {k: float(np.median(v)) for k, v in times[name].items()}
    overhead = med["interval_s"] - plain
    rows.append(
      {
        "backend": name,
        "state_bytes": state_bytes,
        "save_block_s": med["save_block_s"],
        "commit_s": med["commit_s"],
        "commit_mb_per_s": state_bytes / 2**20 / med["commit_s"],
        "restore_s": med["restore_s"],
        "interval_s": med["interval_s"],
        "plain_interval_s": plain,
        "interval_overhead_s": overhead,
        "overhead_pct": 100 * overhead / plain,
        "times": times[name],
      }
    )
  return rows


def run(preset: str, gcs_root: str | None = None) -> dict:
  d, num_layers, vocab, batch, seq = SHAPES[preset]
  setup = setups.train_setup(setups.model_config("mmfree", d, num_layers, vocab))
  compiled, _, _ = setups.compile_step(setup, batch, seq)
  runner = setups.StepRunner(setup, compiled, setups.random_batch(batch, seq, vocab))
  jax.block_until_ready(runner())
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(runner.state))
  names = ("local", "gcs" if gcs_root else "gcs_emulator", "s3_emulator")
  times = _empty_times(names)
  stack, gcs, s3 = _servers(gcs_root)
  with tempfile.TemporaryDirectory() as local, stack:
    remote = paths.join(gcs_root, f"{NAME}-{os.getpid()}") if gcs_root else gcs.root()
    backends = {
      names[0]: _Backend(local, 0),
      names[1]: _Backend(remote, 10**6),
      names[2]: _Backend(s3.root(), 2 * 10**6),
    }
    try:
      if preset != "toy":  # warm-up: the first save and restore of each backend
        _time_round(backends, runner, _empty_times(names))
      for _ in range(ROUNDS[preset]):
        _time_round(backends, runner, times)
    finally:
      for b in backends.values():
        b.checkpointer.close()
  return {
    "rows": _rows(times, names, state_bytes),
    "rounds": ROUNDS[preset],
    "interval_steps": INTERVAL,
    "model": {"d_model": d, "num_layers": num_layers, "vocab_size": vocab},
    "batch": batch,
    "seq_len": seq,
  }


def main(argv=None):
  def extra(parser):
    parser.add_argument("--gcs_root", default=None, help="a real gs:// prefix to time")

  args = common.parse_args(NAME, __doc__, extra, argv)
  results = run(args.preset, args.gcs_root)
  for r in results["rows"]:
    print(
      f"{r['backend']:>13}: {common.fmt_bytes(r['state_bytes'])} state, save blocks "
      f"{r['save_block_s']:.3f} s, commit {r['commit_s']:.3f} s, restore {r['restore_s']:.3f} s, "
      f"{INTERVAL} steps + save {r['interval_s']:.3f} s vs {r['plain_interval_s']:.3f} s "
      f"({r['overhead_pct']:+.1f}%)"
    )
  common.write_json(
    args.out,
    NAME,
    args.preset,
    results,
    [
      "Checkpointer.save (async, checksums) of the live train state; local = a temporary "
      "directory, gcs_emulator = gcp-storage-emulator on loopback (not a real bucket), "
      "s3_emulator = moto's server on loopback, staged through a local folder",
      f"overhead = (save + {INTERVAL} train steps) - ({INTERVAL} train steps), backends "
      "and the plain interval timed round-robin, median of rounds",
    ],
  )


def markdown(c: dict, res: dict) -> str:
  """The RESULTS.md section of these results (`benchmarks.report`)."""
  rows = [
    [
      r["backend"],
      f"{r['save_block_s']:.3f}",
      f"{r['commit_s']:.3f}",
      f"{r['commit_mb_per_s']:.0f}",
      f"{r['restore_s']:.3f}",
      f"{r['interval_overhead_s']:.3f}",
      f"{r['overhead_pct']:+.1f}%",
    ]
    for r in c["rows"]
  ]
  m = c["model"]
  size = common.fmt_bytes(c["rows"][0]["state_bytes"])
  plain = c["rows"][0]["plain_interval_s"]
  return (
    f"## 13. Checkpoint cost by storage (`bench_checkpoint_storage`, MatMul-free d={m['d_model']} "
    f"L={m['num_layers']} V={m['vocab_size']}: {size} train state, median of {c['rounds']} "
    "rounds)\n\n"
    + common.md_table(
      [
        "backend",
        "save blocks s",
        "commit s",
        "commit MiB/s",
        "restore s",
        f"loop cost per save s ({c['interval_steps']} steps)",
        "of the interval",
      ],
      rows,
    )
    + f"\n\n`save blocks` is what the train loop waits for at a checkpoint (host copy and "
    "checksums; orbax writes in a background thread); `loop cost per save` adds the "
    f"slowdown of the next {c['interval_steps']} train steps ({plain:.3f} s without a save) "
    "while that write runs: on this CPU host the steps and the write share the cores (and "
    "the machine's other load, above), on an accelerator host the step runs on the device. "
    "`commit` is the whole write. `restore` is a fresh reader's, as a resumed run's. "
    "`gcs_emulator` is gcp-storage-emulator and `s3_emulator` moto's server, both on "
    "loopback, **not real buckets**: no network, but Python servers; they measure the "
    "object-storage code paths, not GCS or S3 throughput. `s3_emulator` stages through a "
    "local folder (`checkpoint/staging.py`): its commit is the local write plus the upload, "
    "its restore the download plus a local restore. A checkpoint interval shorter than "
    "`commit` makes the next save wait for the previous one."
  )


if __name__ == "__main__":
  main()
