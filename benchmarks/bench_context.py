"""Context parallelism on a CPU host: one long-sequence training step of a small MatMul-free LM
with the sequence split over 8 fake devices (`mesh.shape.context=8`) vs the same step on one
device. Per device: XLA's compiled memory analysis (peak = arguments + outputs + temporaries -
donated); and the step's wall time, both programs timed round-robin.

    python -m benchmarks.bench_context [--preset toy|cpu|accel]

The 8 devices are `--xla_force_host_platform_device_count=8` (set here when jax is not yet
imported): they share this host's cores, so the wall time compares the same arithmetic run as
8 shards plus the context collectives with the one-device program, not 8 chips. The memory is
what each chip of a real context-8 mesh would hold.
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules and "device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  )

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common, setups  # noqa: E402
from mmfree_jax import config as config_lib  # noqa: E402
from mmfree_jax.parallel import mesh as mesh_lib  # noqa: E402
from mmfree_jax.parallel import sharding  # noqa: E402
from mmfree_jax.train import optim, steps  # noqa: E402
from mmfree_jax.train import state as state_lib  # noqa: E402

NAME = "bench_context"
CONTEXT = 8
# (d_model, num_layers, vocab, batch, [seq, ...]); timed: seqs whose steps are timed.
SHAPES = {
  "toy": (64, 2, 256, 1, [256]),
  "cpu": (256, 2, 1024, 1, [16384, 65536]),
  "accel": (1024, 4, 32000, 1, [65536, 262144]),
}
TIMED = {"toy": [256], "cpu": [16384], "accel": [65536]}
ROUNDS = {"toy": 1, "cpu": 2, "accel": 3}


def _step(cfg, mesh):
  """The trainer's step on `mesh` (AdamW, donated state), its live state and abstract args."""
  rules = sharding.normalize_rules(config_lib.base_config().mesh.axis_rules)
  optim_cfg = config_lib.base_config().optim
  optim_cfg.update(warmup_steps=0, schedule="constant")
  tx = optim.make_optimizer(optim_cfg, 1000)
  schedule = optim.learning_rate_schedule(optim_cfg, 1000)
  shardings = state_lib.train_state_shardings(cfg, tx, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  step = jax.jit(
    steps.make_train_step(cfg, state_lib.model_graphdef(cfg), tx, schedule, mesh=mesh, rules=rules),
    in_shardings=(shardings, batch_sharding),
    out_shardings=(shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )
  return step, tx, shardings, batch_sharding


def _measure(cfg, mesh, batch: int, seq: int, timed: bool):
  """(memory stats, compile s, a zero-argument step runner or None)."""
  step, tx, shardings, batch_sharding = _step(cfg, mesh)
  window = jax.ShapeDtypeStruct((batch, seq + 1), np.int32, sharding=batch_sharding)
  abstract = state_lib.abstract_train_state(cfg, tx, shardings)
  t0 = common.time.perf_counter()
  compiled = step.lower(abstract, {"tokens": window, "segment_ids": window}).compile()
  compile_s = common.time.perf_counter() - t0
  stats = common.memory_stats(compiled)
  if not timed:
    return stats, compile_s, None
  holder = {"state": state_lib.create_sharded_train_state(cfg, tx, 0, shardings)}
  data = jax.device_put(setups.random_batch(batch, seq, cfg.vocab_size), batch_sharding)

  def run():
    holder["state"], metrics = compiled(holder["state"], data)
    return metrics

  return stats, compile_s, run


def run(preset: str) -> dict:
  if jax.device_count() < CONTEXT:
    raise SystemExit(
      f"{NAME} needs {CONTEXT} devices, found {jax.device_count()}; run it in a fresh "
      f"process (python -m benchmarks.{NAME}) or set XLA_FLAGS="
      f"--xla_force_host_platform_device_count={CONTEXT}"
    )
  d, num_layers, vocab, batch, seqs = SHAPES[preset]
  cfg = setups.model_config("mmfree", d, num_layers, vocab)
  meshes = {
    "one_device": mesh_lib.make_mesh({"data": 1}, jax.devices()[:1]),
    f"context{CONTEXT}": mesh_lib.make_mesh({"data": 1, "context": CONTEXT}),
  }
  rows = []
  for seq in seqs:
    timed = seq in TIMED[preset]
    measured = {name: _measure(cfg, mesh, batch, seq, timed) for name, mesh in meshes.items()}
    times = {}
    if timed:
      runners = {name: m[2] for name, m in measured.items()}
      times = common.interleaved_times(runners, ROUNDS[preset])
    one_peak = measured["one_device"][0]["peak_bytes"]
    for name, (stats, compile_s, _) in measured.items():
      row = {"mesh": name, "seq": seq, "tokens": batch * seq, "compile_s": compile_s, **stats}
      row["peak_vs_one_device"] = stats["peak_bytes"] / one_peak
      if timed:
        row["step_s"] = times[name]["median_s"]
        row["times_s"] = times[name]["times_s"]
        row["step_vs_one_device"] = times[name]["median_s"] / times["one_device"]["median_s"]
      rows.append(row)
  return {
    "rows": rows,
    "context": CONTEXT,
    "model": {"d_model": d, "num_layers": num_layers, "vocab_size": vocab, "dtype": "float32"},
    "batch": batch,
    "scan_type": cfg.scan_type,
    "rounds": ROUNDS[preset],
  }


def main(argv=None):
  args = common.parse_args(NAME, __doc__, None, argv)
  results = run(args.preset)
  for r in results["rows"]:
    timing = f", step {r['step_s']:.2f} s" if "step_s" in r else ""
    print(
      f"T={r['seq']:>7} {r['mesh']:>10}: peak {common.fmt_bytes(r['peak_bytes'])} per device "
      f"({r['peak_vs_one_device']:.3f}x one device){timing}"
    )
  common.write_json(
    args.out,
    NAME,
    args.preset,
    results,
    [
      f"one train step (AdamW) of batch {results['batch']}: the sequence on one device vs "
      f"split over {CONTEXT} fake CPU devices (mesh.shape.context={CONTEXT}) sharing this "
      "host's cores",
      "peak = XLA compiled memory analysis per device (arguments + outputs + temporaries - "
      "donated); step_s = median wall time, both meshes timed round-robin",
    ],
  )


def markdown(c: dict, res: dict) -> str:
  """The RESULTS.md section of these results (`benchmarks.report`)."""
  rows = [
    [
      f"{r['seq']:,}",
      r["mesh"],
      common.fmt_bytes(r["peak_bytes"]),
      common.fmt_bytes(r["temp_bytes"]),
      f"{r['peak_vs_one_device']:.3f}x",
      f"{r['step_s']:.2f}" if "step_s" in r else "-",
      f"{r['step_vs_one_device']:.2f}x" if "step_vs_one_device" in r else "-",
    ]
    for r in c["rows"]
  ]
  m = c["model"]
  return (
    f"## 14. Context parallelism on CPU (`bench_context`, MatMul-free d={m['d_model']} "
    f"L={m['num_layers']} V={m['vocab_size']} {m['dtype']}, batch {c['batch']}, one train "
    f"step, context {c['context']} on fake CPU devices)\n\n"
    + common.md_table(
      [
        "T",
        "mesh",
        "peak per device",
        "temporaries",
        "peak vs one device",
        "step s",
        "step vs one device",
      ],
      rows,
    )
    + f"\n\nThe {c['context']} fake devices share this host's cores: the step time compares the "
    "same arithmetic run as shards (plus the second scan pass of each chunk and the "
    "state exchanges) with the one-device program, not 8 chips; the memory is what each chip "
    "of a context mesh holds. Parameters and optimizer state are replicated over context "
    "(add fsdp to split them), so at small T they dominate and the ratio tends to 1; the "
    "activations, which grow with T, are split.\n"
  )


if __name__ == "__main__":
  main()
