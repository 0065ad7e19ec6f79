"""The chip table (`mmfree_jax.hardware`), the FLOP / parameter / memory accounting read from
the model's shapes (`mmfree_jax.accounting`) and the MFU the trainer logs (`train.metrics`)."""

import json
import math
import types

import jax
import numpy as np
import pytest

from mmfree_jax import accounting, hardware
from mmfree_jax.config import ModelConfig
from mmfree_jax.eval import runner
from mmfree_jax.nn import model as model_lib
from mmfree_jax.train import metrics

# ------------------------------------------------------------------------------ chip table


@pytest.mark.parametrize(
  "kind,name",
  [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA GH200 480GB", "GH200 96GB"),
    ("NVIDIA B200", "B200"),
    ("TPU v4", "TPU v4"),
    ("TPU v5 lite", "TPU v5e"),
    ("TPU v5", "TPU v5p"),
    ("TPU v6 lite", "TPU v6e"),
  ],
)
def test_device_kinds_resolve_exactly(kind, name):
  assert hardware.lookup(kind).name == name


def test_no_prefix_matching():
  # a PCIe or NVL card starts like the SXM part but must not get its peaks
  assert hardware.lookup("NVIDIA H100 PCIe").bf16_flops < hardware.chip("H100 SXM").bf16_flops
  assert hardware.lookup("NVIDIA H100 NVL").bf16_flops < hardware.chip("H100 SXM").bf16_flops
  for unknown in ("NVIDIA H100", "NVIDIA H100 80GB HBM3 (new)", "TPU v5 litex", "TPU", "cpu"):
    assert hardware.lookup(unknown) is None, unknown


def test_table_is_consistent():
  for chip in hardware.CHIPS.values():
    assert chip.int8_ops >= chip.bf16_flops > 0 and chip.hbm_bytes > 1e9
    assert chip.hbm_bytes_per_s > 1e11 and chip.device_kinds
  with pytest.raises(ValueError, match="unknown chip 'TPU v9'.*TPU v5p"):
    hardware.chip("TPU v9")


# ------------------------------------------------------------------------------------ MFU


def _fake_devices(monkeypatch, kind):
  monkeypatch.setattr(jax, "devices", lambda *a: [types.SimpleNamespace(device_kind=kind)])

  def no_measurement(*a, **k):
    raise AssertionError("a chip in the table must not be measured")

  monkeypatch.setattr(metrics, "measure_matmul_peak", no_measurement)


def test_mfu_on_v5p_uses_its_datasheet_peak(monkeypatch):
  _fake_devices(monkeypatch, "TPU v5")  # what libtpu reports for a v5p
  peak, source, note = metrics.device_peak_flops()
  assert (peak, source) == (459e12, "datasheet") and "TPU v5p" in note
  t = metrics.Throughput(
    tokens_per_step=1000, flops_per_token=1e9, peak_flops=peak, peak_source=source, devices=4
  )
  row = t.row(step_time=0.01)  # 1e5 tok/s x 1e9 FLOP / (4 x 459e12)
  assert row["mfu"] == pytest.approx(1e14 / (4 * 459e12)) and row["mfu_peak"] == "datasheet"


def test_configured_peak_wins(monkeypatch):
  _fake_devices(monkeypatch, "TPU v5")
  assert metrics.device_peak_flops(123e12)[:2] == (123e12, "config")


def test_a_low_measured_peak_is_measured_again_not_clamped():
  calls = []
  t = metrics.Throughput(
    tokens_per_step=100,
    flops_per_token=1e6,
    peak_flops=5e7,
    peak_source="measured",
    devices=1,
    remeasure=lambda: calls.append(1) or 2e8,
  )
  row = t.row(step_time=1.0)  # 1e8 FLOP/s achieved > the 5e7 measured first
  assert calls == [1] and t.peak_flops == 2e8
  assert row["mfu"] == pytest.approx(0.5) and row["mfu_peak"] == "measured"
  # at most remeasures_left times: past that the row says what was measured (> 1)
  low = metrics.Throughput(
    100, 1e6, 5e7, "measured", 1, remeasure=lambda: calls.append(1) or 6e7, remeasures_left=2
  )
  assert [low.row(1.0)["mfu"] for _ in range(3)] == [pytest.approx(1e8 / 6e7)] * 3
  assert len(calls) == 3
  # a datasheet peak is never re-measured, and nothing is clamped
  d = metrics.Throughput(100, 1e6, 5e7, "datasheet", 1, remeasure=lambda: 1 / 0)
  assert d.row(1.0)["mfu"] == pytest.approx(2.0)


def test_measured_peak_is_the_best_call():
  peak = metrics.measure_matmul_peak(sizes=(64, 128), repeats=2, rounds=2)
  assert math.isfinite(peak) and peak > 0


def test_metrics_row_keeps_the_peak_source(tmp_path):
  w = metrics.MetricsWriter(str(tmp_path))
  w.write(3, {"mfu": 0.25, "mfu_peak": "measured"})
  w.close()
  row = json.loads((tmp_path / "metrics.jsonl").read_text())
  assert row == {"step": 3, "mfu": 0.25, "mfu_peak": "measured"}


def test_eval_json_writes_null_for_non_finite(tmp_path):
  path = runner.write_results(
    {"step": 0, "perplexity": {"a": {"loss": math.nan, "perplexity": math.inf}}}, str(tmp_path)
  )
  text = open(path).read()
  assert "NaN" not in text and "Infinity" not in text
  assert json.loads(text)["perplexity"]["a"] == {"loss": None, "perplexity": None}


# ----------------------------------------------------------------------------- accounting


def _gqa_cfg(**kw):
  values = dict(
    kind="transformer",
    vocab_size=96,
    d_model=64,
    num_layers=3,
    num_heads=8,
    num_kv_heads=2,
    intermediate_size=160,
  )
  values.update(kw)
  return ModelConfig.tiny(**values)


def test_gqa_train_flops_match_a_count_of_the_shapes():
  cfg = _gqa_cfg()
  d, L, i, v, hd = 64, 3, 160, 96, 64 // 8
  # by hand: q and o are d x d, k and v are d x (kv_heads x head_dim), gate+up 2I, down I
  by_hand = L * (2 * d * d + 2 * d * 2 * hd + 3 * d * i) + d * v
  # from the abstract model: every parameter but the embedding and the 1-d norm scales
  state = jax.tree_util.tree_flatten_with_path(
    model_lib.nnx.state(model_lib.abstract_model(cfg), model_lib.nnx.Param)
  )[0]
  from_shapes = sum(
    int(np.prod(x.shape))
    for p, x in state
    if "embedding" not in jax.tree_util.keystr(p)
    and x.ndim >= 2
    and not (x.ndim == 2 and "blocks" in jax.tree_util.keystr(p))
  )
  assert accounting.matmul_params(cfg) == by_hand == from_shapes
  seq = 128
  attention = 6 * L * seq * 8 * hd  # QK^T and AV, causal half, fwd + bwd
  assert accounting.train_flops_per_token(cfg, seq) == 6 * by_hand + attention
  assert accounting.forward_flops_per_token(cfg, seq) == 2 * by_hand + attention / 3
  # GQA narrows K/V: fewer FLOPs than the full-width model
  assert accounting.matmul_params(cfg) < accounting.matmul_params(_gqa_cfg(num_kv_heads=8))


def test_mmfree_flops_have_no_attention_term():
  cfg = ModelConfig.tiny(
    kind="mmfree", d_model=64, num_layers=2, vocab_size=96, intermediate_size=160
  )
  by_hand = 2 * (4 * 64 * 64 + 3 * 64 * 160) + 64 * 96
  assert accounting.train_flops_per_token(cfg, 4096) == 6 * by_hand


def test_parameter_and_decode_state_bytes():
  cfg = _gqa_cfg()
  model = model_lib.build_model(cfg, 0)
  params = model_lib.nnx.state(model, model_lib.nnx.Param)
  leaves = jax.tree.leaves(params)
  assert accounting.param_count(cfg) == model_lib.count_params(model)
  assert accounting.param_bytes(cfg) == sum(x.nbytes for x in leaves)
  assert accounting.param_bytes(cfg, np.int8, matmul_only=True) == accounting.matmul_params(cfg)
  state = model.init_state(2, 40)
  real = sum(x.nbytes for x in jax.tree.leaves(state) if x.ndim)
  itemsize = np.dtype(cfg.compute_dtype).itemsize
  assert accounting.kv_cache_bytes(cfg, 2, 40) == real == 2 * 3 * 2 * 40 * 2 * 8 * itemsize
  mm = ModelConfig.tiny(kind="mmfree", d_model=64, num_layers=2)
  assert accounting.kv_cache_bytes(mm, 2, 40) == 0
  assert accounting.decode_state_bytes(mm, 2, 10**6) == 2 * 2 * 64 * 4  # constant in length
