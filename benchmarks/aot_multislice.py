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

from benchmarks import aot_tpu  # pylint: disable=g-import-not-at-top

RESULTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                            "aot_multislice.json")
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
  devices = topologies.get_topology_desc(aot_tpu.CHIPS[chip_name].topology, "tpu",
                                         num_slices=num_slices).devices
  mesh = mesh_lib.make_mesh({**shape, "data": shape["data"] * num_slices}, devices)
  rules = sharding.normalize_rules(cfg.mesh.axis_rules)
  tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
  shardings = state_lib.train_state_shardings(model_cfg, tx, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  step = jax.jit(
      steps.make_train_step(model_cfg, state_lib.model_graphdef(model_cfg), tx,
                            optim.learning_rate_schedule(cfg.optim, cfg.train.steps),
                            microbatches=micro, mesh=mesh, rules=rules),
      in_shardings=(shardings, batch_sharding),
      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  rows = aot_tpu.GLOBAL_BATCH * num_slices
  window = jax.ShapeDtypeStruct((rows, aot_tpu.SEQ_LEN + 1), jnp.int32, sharding=batch_sharding)
  abstract = state_lib.abstract_train_state(model_cfg, tx, shardings)
  t0 = time.perf_counter()
  compiled = step.lower(abstract, {"tokens": window, "segment_ids": window}).compile()
  mem = compiled.memory_analysis()
  memory = {"argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes),
            "temp_bytes": int(mem.temp_size_in_bytes),
            "alias_bytes": int(mem.alias_size_in_bytes)}
  memory["peak_bytes"] = (memory["argument_bytes"] + memory["output_bytes"]
                          + memory["temp_bytes"] - memory["alias_bytes"])
  transfers = dcn.dcn_transfers(compiled.as_text())
  return {"kind": kind, "slice": aot_tpu.CHIPS[chip_name].slice_name, "num_slices": num_slices,
          "mesh": dict(mesh.shape), "microbatches": micro, "remat": remat,
          "global_batch": rows, "compile_s": round(time.perf_counter() - t0, 1),
          "memory": memory,
          "dcn": {"transfers": len(transfers),
                  "kinds": sorted({t.kind for t in transfers}),
                  "elements_per_chip": sum(t.elements for t in transfers),
                  "in_loop": sum(t.in_loop for t in transfers)}}


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
      results = []
      if os.path.exists(RESULTS_PATH):  # re-read: runs for other slices may have written
        with open(RESULTS_PATH) as f:
          results = json.load(f)
      results = [r for r in results if (r["kind"], r["slice"], r["num_slices"])
                 != (kind, aot_tpu.CHIPS[chip_name].slice_name, num_slices)] + [row]
      os.makedirs(os.path.dirname(RESULTS_PATH), exist_ok=True)
      with open(RESULTS_PATH, "w") as f:
        json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
