"""The 370M train step on one and on two TPU slices, compiled on this CPU host (libtpu AOT).

    python -m benchmarks.aot_multislice [--only v5e] [--kind mmfree]

For each slice type, the mesh / microbatches / remat that `benchmarks.aot_tpu` found to fit
one slice (256 x 2048 tokens per step) is compiled again for two slices of that type
(`topologies.get_topology_desc(..., num_slices=2)`, the mesh from `parallel.mesh.make_mesh`:
data spans the slices) with twice the global batch, so each chip does the same work. Reported
per point: compiled per-chip memory (XLA memory_analysis) and, from the compiled HLO
(`parallel.dcn`), every collective that crosses slices: its kind, its per-chip payload and
whether it runs inside a loop (per layer or per microbatch). Writes
`results/aot_multislice.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from benchmarks import aot_tpu, common  # pylint: disable=g-import-not-at-top

RESULTS_PATH = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), "results", "aot_multislice.json"
)
# The one-slice points of RESULTS.md's TPU table (benchmarks.aot_tpu's search), 370M.
POINTS = {
  ("mmfree", "v5e"): ({"data": 1, "fsdp": 4, "tensor": 2}, 32, "none"),
  ("mmfree", "v5p"): ({"data": 1, "fsdp": 4, "tensor": 1}, 2, "dots_no_batch"),
  ("transformer", "v5e"): ({"data": 1, "fsdp": 8, "tensor": 1}, 32, "none"),
  ("transformer", "v5p"): ({"data": 1, "fsdp": 4, "tensor": 1}, 8, "none"),
}


def compile_step(kind: str, chip_name: str, num_slices: int) -> dict:
  """Compiles the 370M step for `num_slices` slices of `chip_name`; memory and DCN traffic."""
  import jax
  import jax.numpy as jnp
  from jax.experimental import topologies

  from mmfree_jax.parallel import dcn, sharding
  from mmfree_jax.parallel import mesh as mesh_lib
  from mmfree_jax.train import optim, steps
  from mmfree_jax.train import state as state_lib

  shape, micro, remat = POINTS[(kind, chip_name)]
  cfg, model_cfg = aot_tpu.model_config(kind, "370m", remat)
  devices = topologies.get_topology_desc(
    aot_tpu.CHIPS[chip_name].topology, "tpu", num_slices=num_slices
  ).devices
  mesh = mesh_lib.make_mesh({**shape, "data": shape["data"] * num_slices}, devices)
  rules = sharding.normalize_rules(cfg.mesh.axis_rules)
  tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
  shardings = state_lib.train_state_shardings(model_cfg, tx, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  step = jax.jit(
    steps.make_train_step(
      model_cfg,
      state_lib.model_graphdef(model_cfg),
      tx,
      optim.learning_rate_schedule(cfg.optim, cfg.train.steps),
      microbatches=micro,
      mesh=mesh,
      rules=rules,
    ),
    in_shardings=(shardings, batch_sharding),
    out_shardings=(shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )
  rows = aot_tpu.GLOBAL_BATCH * num_slices
  window = jax.ShapeDtypeStruct((rows, aot_tpu.SEQ_LEN + 1), jnp.int32, sharding=batch_sharding)
  abstract = state_lib.abstract_train_state(model_cfg, tx, shardings)
  t0 = time.perf_counter()
  compiled = step.lower(abstract, {"tokens": window, "segment_ids": window}).compile()
  memory = common.memory_stats(compiled)
  transfers = dcn.dcn_transfers(compiled.as_text())
  return {
    "kind": kind,
    "slice": aot_tpu.CHIPS[chip_name].slice_name,
    "num_slices": num_slices,
    "mesh": dict(mesh.shape),
    "microbatches": micro,
    "remat": remat,
    "global_batch": rows,
    "compile_s": round(time.perf_counter() - t0, 1),
    "memory": memory,
    "dcn": {
      "transfers": len(transfers),
      "kinds": sorted({t.kind for t in transfers}),
      "elements_per_chip": sum(t.elements for t in transfers),
      "in_loop": sum(t.in_loop for t in transfers),
    },
  }


def _gib(b) -> str:
  return f"{b / 2**30:.2f}"


def _pairs(result: dict):
  """(one-slice row, two-slice row) per (kind, slice), in POINTS order."""
  rows = {(r["kind"], r["slice"], r["num_slices"]): r for r in (result or {}).get("rows", [])}
  for kind, chip_name in POINTS:
    name = aot_tpu.CHIPS[chip_name].slice_name
    if (kind, name, 1) in rows and (kind, name, 2) in rows:
      yield rows[(kind, name, 1)], rows[(kind, name, 2)]


def targets(result: dict, res: dict) -> list[list]:
  """The RESULTS.md targets rows (`benchmarks.report`)."""
  out = []
  for one, two in _pairs(result):
    what = f"{two['kind']} 370m, 2 x {two['slice']} (XLA TPU compile on CPU)"
    out.append(
      [
        f"only the gradient all-reduce crosses slices, once per step: {what}",
        (
          f"{two['dcn']['transfers']} DCN transfers ({', '.join(two['dcn']['kinds'])}), "
          f"{two['dcn']['in_loop']} inside a loop ({two['microbatches']} microbatches)"
        ),
        common.yes(two["dcn"]["kinds"] == ["ALL_REDUCE"] and two["dcn"]["in_loop"] == 0),
      ]
    )
    out.append(
      [
        f"per-chip memory of 2 slices = 1 slice: {what}",
        (
          f"peak {_gib(two['memory']['peak_bytes'])} vs "
          f"{_gib(one['memory']['peak_bytes'])} GiB / chip "
          f"({(two['memory']['peak_bytes'] - one['memory']['peak_bytes']) / 2**20:+.1f} MiB)"
        ),
        common.yes(two["memory"]["peak_bytes"] == one["memory"]["peak_bytes"]),
      ]
    )
  return out


def markdown(result: dict, res: dict) -> str:
  """The RESULTS.md section (`benchmarks.report`)."""
  rows = []
  for one, two in _pairs(result):
    for r in (one, two):
      mesh = "/".join(str(r["mesh"][a]) for a in ("data", "fsdp", "tensor"))
      rows.append(
        [
          f"{r['kind']} 370m",
          f"{r['num_slices']} x {r['slice']}",
          mesh,
          r["microbatches"],
          r["remat"],
          r["global_batch"],
          _gib(r["memory"]["argument_bytes"]),
          _gib(r["memory"]["temp_bytes"]),
          _gib(r["memory"]["peak_bytes"]),
          r["dcn"]["transfers"],
          ", ".join(r["dcn"]["kinds"]) or "-",
          f"{r['dcn']['elements_per_chip'] / 2**20:.1f}",
          r["dcn"]["in_loop"],
          f"{r['compile_s']:.0f}",
        ]
      )
  if not rows:
    return ""
  return "\n".join(
    [
      "## 9b. Two TPU slices (multi-slice, DCN), compiled on CPU (`aot_multislice`)",
      "",
      (
        "The 370M step at the one-slice point of section 9 (mesh, microbatches, remat), compiled "
        "again for two slices of the same type (`get_topology_desc(..., num_slices=2)`; the mesh "
        "from `parallel.mesh.make_mesh`, data across the slices) with twice the global batch, so "
        "each chip does the same work. DCN columns come from the compiled per-slice HLO "
        "(`parallel.dcn`): transfers = collectives that cross slices, their kinds, their "
        "elements per chip as the program spells them (M = 2^20; a transfer inside a loop "
        "counted once, though it runs per iteration), and how many run inside a loop (per layer "
        "or per microbatch instead of once per step). A one-slice row needs no DCN. The "
        "microbatches are accumulated per data shard (`parallel.sharding.sum_over_shards`), "
        "so the gradients cross once, after the scan; arguments and outputs per chip equal one "
        "slice's, and what the peak adds is in XLA's temporaries of the two-slice program "
        "(another program than one slice's plain scan, with the DCN all-reduce's buffers), "
        "below one fp32 copy of the chip's gradients."
      ),
      "",
      common.md_table(
        [
          "model",
          "slices",
          "mesh d/f/t",
          "micro-batches",
          "remat",
          "global batch",
          "args GiB",
          "temp GiB",
          "peak GiB",
          "DCN transfers",
          "DCN kinds",
          "DCN M elements / chip (static)",
          "DCN in loops",
          "compile s",
        ],
        rows,
      ),
    ]
  )


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--only", default="", help="a chip prefix: v5e, v5p")
  p.add_argument("--kind", default="mmfree", choices=("mmfree", "transformer", "all"))
  args = p.parse_args(argv)
  for kind, chip_name in POINTS:
    if args.kind not in ("all", kind) or not chip_name.startswith(args.only):
      continue
    for num_slices in (1, 2):
      row = compile_step(kind, chip_name, num_slices)
      print(json.dumps(row), flush=True)
      save(row)
  return 0


def save(row: dict) -> None:
  """Adds (or replaces) one point in the JSON, re-read first: other runs may have written."""
  rows = []
  if os.path.exists(RESULTS_PATH):
    with open(RESULTS_PATH) as f:
      rows = json.load(f)["results"]["rows"]
  key = lambda r: (r["kind"], r["slice"], r["num_slices"])
  rows = [r for r in rows if key(r) != key(row)] + [row]
  common.write_json(RESULTS_PATH, "aot_multislice", "accel", {"rows": rows}, [])


if __name__ == "__main__":
  raise SystemExit(main())
