"""experiments/convert.py's bookkeeping (no training: the study itself is the committed run):
which rows count, the gap closed, the noise margin, and the plot."""

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def study():
  spec = importlib.util.spec_from_file_location(
      "convert_experiment", os.path.join(REPO, "experiments", "convert.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _row(variant, seed, val, lr=1e-3, **extra):
  return {"variant": variant, "seed": seed, "val_loss": val, "peak_lr": lr,
          "curve": [(100, val + 1.0, 0), (200, val + 0.5, 2)], **extra}


def test_summary_counts_chosen_rows_and_measures_the_gap(study, tmp_path):
  runs = [_row("teacher", 0, 3.0),
          _row("converted", 0, 9.0, lr=1e-3, sweep=True),  # a sweep point that lost
          _row("converted", 0, 3.4, lr=3e-3, sweep=True, chosen=True),
          _row("converted", 1, 3.6, lr=3e-3, chosen=True),
          _row("scratch_frac", 0, 5.0, chosen=True), _row("scratch_frac", 1, 5.2, chosen=True),
          _row("scratch_full", 0, 3.5)]
  s = study.summarize(runs)
  assert s["val_loss"]["converted"]["n"] == 2
  assert s["val_loss"]["converted"]["mean"] == pytest.approx(3.5)
  assert s["gap_closed"] == pytest.approx((5.1 - 3.5) / (5.1 - 3.0))
  assert s["converted_minus_scratch_frac"] == pytest.approx(3.5 - 5.1)
  assert s["seed_noise_std"] == pytest.approx(0.1414, abs=1e-3)
  assert s["target_gap_closed_0.8"] is False and s["target_beats_scratch_frac_beyond_noise"]
  assert s["chosen_lr"]["converted"] == 3e-3
  results = {"runs": runs, "summary": s,
             "settings": {"teacher_tokens": 1000, "tokenizer": "bpe:4096", "d_model": 8,
                          "num_layers": 1, "fraction": 0.1}}
  path = tmp_path / "convert.png"
  study.plot(results, str(path))
  assert path.stat().st_size > 10_000


def test_bad_flags_are_refused(study):
  with pytest.raises(SystemExit):
    study.parse_args(["--skip", "teacher"])
  with pytest.raises(SystemExit):
    study.parse_args(["--fraction", "0"])
