"""What the per-array checksums cost a checkpoint save: save time with and without them.

    python -m benchmarks.bench_checkpoint [--preset toy|cpu|accel]

For each size, a state of 8 float32 arrays is saved to a fresh temporary workdir until
committed (`Checkpointer.save` + wait, i.e. digests + orbax write), and the same items without
the `checksums` item through orbax directly; the two are timed round-robin. `digest_s` times
`checksum.digests` alone (on device, then 16 bytes per array to the host).
"""

from __future__ import annotations

import tempfile

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from benchmarks import common
from mmfree_jax.checkpoint import checksum
from mmfree_jax.checkpoint import manager as ckpt_lib

NAME = "bench_checkpoint"
LEAVES = 8


def _state(mbytes: int) -> dict:
  rows = max(1, mbytes * 2**20 // (4 * 1024 * LEAVES))
  key = jax.random.key(0)
  return {
    f"w{i}": jax.random.normal(jax.random.fold_in(key, i), (rows, 1024), jnp.float32)
    for i in range(LEAVES)
  }


def _time_size(mbytes: int, rounds: int, workdir: str) -> dict:
  state = jax.block_until_ready(_state(mbytes))
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=2)
  steps = iter(range(1, 10**6))

  def with_checksums():
    checkpointer.save(next(steps), state, None, {"bench": mbytes})
    checkpointer.wait()

  def without_checksums():
    checkpointer.manager.save(
      next(steps),
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), config=ocp.args.JsonSave({"bench": mbytes})
      ),
    )
    checkpointer.wait()

  try:
    times = common.interleaved_times(
      {
        "with": with_checksums,
        "without": without_checksums,
        "digest": lambda: checksum.digests(state),
      },
      rounds,
    )
  finally:
    checkpointer.close()
  with_s, without_s = times["with"]["median_s"], times["without"]["median_s"]
  return {
    "mbytes": mbytes,
    "with_checksums_s": with_s,
    "without_checksums_s": without_s,
    "overhead_pct": 100 * (with_s - without_s) / without_s,
    "digest_s": times["digest"]["median_s"],
    "digest_gb_per_s": mbytes * 2**20 / 1e9 / times["digest"]["median_s"],
    "times": times,
  }


def run(preset: str) -> dict:
  sizes = {"toy": (1, 4), "cpu": (4, 64, 256), "accel": (256, 1024, 4096)}[preset]
  rounds = {"toy": 2, "cpu": 5, "accel": 5}[preset]
  rows = []
  for mbytes in sizes:
    with tempfile.TemporaryDirectory() as workdir:
      rows.append(_time_size(mbytes, rounds, workdir))
  return {"rows": rows, "rounds": rounds, "leaves": LEAVES}


def main(argv=None):
  args = common.parse_args(NAME, __doc__, None, argv)
  results = run(args.preset)
  for r in results["rows"]:
    print(
      f"{r['mbytes']:5d} MiB  save {r['without_checksums_s']:.3f} s -> "
      f"{r['with_checksums_s']:.3f} s with checksums ({r['overhead_pct']:+.1f}%), "
      f"digests alone {r['digest_s']:.3f} s ({r['digest_gb_per_s']:.2f} GB/s)"
    )
  common.write_json(
    args.out,
    NAME,
    args.preset,
    results,
    [
      (
        "save = Checkpointer.save + wait until committed, to a local temporary "
        "directory; with/without checksums and the digests alone timed "
        "round-robin, median of rounds"
      ),
      f"state: {LEAVES} float32 arrays of [rows, 1024]",
    ],
  )


def markdown(c: dict, res: dict) -> str:
  """The RESULTS.md section of these results (`benchmarks.report`)."""
  rows = [
    [
      r["mbytes"],
      f"{r['without_checksums_s']:.3f}",
      f"{r['with_checksums_s']:.3f}",
      f"{r['overhead_pct']:+.1f}%",
      f"{r['digest_s']:.3f}",
      f"{r['digest_gb_per_s']:.2f}",
    ]
    for r in c["rows"]
  ]
  return (
    f"## 12. Checkpoint save with per-array checksums (`bench_checkpoint`, "
    f"{c['leaves']} float32 arrays, local disk, median of {c['rounds']} rounds)\n\n"
    + common.md_table(
      ["MiB", "save s", "save + checksums s", "overhead", "digests s", "digests GB/s"], rows
    )
    + "\n\n`digests s` is what the checksums themselves cost: one pass over the arrays on "
    "device, before the save returns (the write stays asynchronous). The two save "
    "columns also carry the disk and CPU contention of the machine (see its load "
    "average above): their difference beyond the digests' time is not attributed here."
  )


if __name__ == "__main__":
  main()
