"""`benchmarks.roofline` (the step-time bound `benchmarks.aot_tpu` ranks and reports) and the
aot_tpu table built from compiled points: like-for-like comparisons with the paper, no
activation-traffic guess, and an int8 estimate only for a program compiled with int8."""

import json

import pytest

from benchmarks import aot_tpu, roofline
from mmfree_jax import accounting, hardware


def _cfg(kind="mmfree", size="370m", remat="none"):
  return aot_tpu.model_config(kind, size, remat)[1]


def test_paper_comparison_is_like_for_like():
  cfg = _cfg()
  fpt = accounting.train_flops_per_token(cfg, roofline.SEQ_LEN)
  v5p, h100 = hardware.chip("TPU v5p"), hardware.chip("H100 SXM")
  # a v5p bound of 2x the paper's measured figure is no claim against a measured H100
  v = roofline.vs_paper(cfg, "370m", v5p, bound_tokens_per_s=2 * 104e3)
  assert v["paper_mfu"] == pytest.approx(104e3 * fpt / h100.bf16_flops)
  assert 0.2 < v["paper_mfu"] < 0.23  # ~21.5%: the paper's H100 ran far below its peak
  assert v["at_paper_mfu"] == pytest.approx(459 / 989.5)  # equal MFU: the ratio of the peaks
  assert v["h100_bound_tokens_per_s"] == pytest.approx(h100.bf16_flops / fpt)
  assert v["h100_bound_tokens_per_s"] / 104e3 == pytest.approx(4.65, abs=0.01)
  assert v["bound_vs_bound"] == pytest.approx(2 * 104e3 / v["h100_bound_tokens_per_s"])


def test_estimate_terms():
  cfg = _cfg()
  n = accounting.param_count(cfg)
  sl = roofline.SLICES["v5p"]
  mesh = {"data": 1, "fsdp": 4, "tensor": 1}
  e = roofline.estimate(cfg, n, sl, mesh, micro=2, remat="full")
  tokens = 256 * 2048 / 4
  hw = (accounting.train_flops_per_token(cfg, 2048) + 2 * accounting.matmul_params(cfg)) * tokens
  assert e["compute_s"] == pytest.approx(hw / 459e12)
  # only weights and optimizer state: no activation bytes in the HBM term
  known = 2 * 12 * n / 4 + 2 * 4 * n / 4 + 2 * 3 * 2 * n + 2 * 2 * 4 * n / 4
  assert e["hbm_known_bytes"] == pytest.approx(known)
  assert e["step_s"] == max(e["compute_s"], e["hbm_s"], e["ici_s"])
  assert e["int8_tokens_per_s_chip"] > e["tokens_per_s_chip"]
  assert "int8_tokens_per_s_chip" not in roofline.estimate(
    _cfg("transformer"), n, sl, mesh, 2, "none"
  )


def test_point_keys_round_trip():
  mesh = {"data": 2, "fsdp": 4, "tensor": 1}
  key = aot_tpu._key("mmfree", "1.3b", "v5e", mesh, 16, "dots_no_batch")
  assert aot_tpu.spec_of(key + aot_tpu.INT8_SUFFIX) == dict(
    kind="mmfree", size="1.3b", chip_name="v5e", micro=16, remat="dots_no_batch", mesh_shape=mesh
  )


def _cache(tmp_path, int8_status=None):
  key = "mmfree/370m/v5p/d1f4t1/mb2/dots_no_batch"
  point = {
    "status": "fits",
    "mesh": {"data": 1, "fsdp": 4, "tensor": 1},
    "microbatches": 2,
    "remat": "dots_no_batch",
    "n_params": accounting.param_count(_cfg()),
    "compile_s": 1.0,
    "xla_flops": 1e12,
    "xla_bytes_accessed": 1e12,
    "memory": {"argument_bytes": 1, "temp_bytes": 2, "peak_bytes": 3},
  }
  points = {key: point}
  if int8_status:
    points[key + aot_tpu.INT8_SUFFIX] = dict(point, status=int8_status)
  path = tmp_path / "aot.json"
  path.write_text(
    json.dumps(
      {
        "points": points,
        "searches": {"mmfree/370m/v5p": {"chosen": key, "tried": [{"key": key, "status": "fits"}]}},
      }
    )
  )
  return aot_tpu.Cache(str(path), "test")


@pytest.mark.parametrize("int8_status", [None, "oom", "fits"])
def test_int8_estimate_only_for_a_compiled_int8_program(tmp_path, int8_status):
  rows = aot_tpu.summarize(_cache(tmp_path, int8_status))
  row = next(r for r in rows if r["fits"])
  assert row["slice"] == "v5p-8" and "int8_tokens_per_s_chip" not in row["estimate"]
  assert row["int8"]["status"] == (int8_status or "not compiled")
  assert ("tokens_per_s_chip" in row["int8"]) == (int8_status == "fits")
  assert row["vs_paper"]["at_paper_mfu"] == pytest.approx(459 / 989.5)
