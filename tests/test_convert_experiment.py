"""experiments/convert.py's bookkeeping (no training: the study itself is the committed run):
which rows count, the gap closed, the noise margin, and the plot."""

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def study():
  spec = importlib.util.spec_from_file_location(
    "convert_experiment", os.path.join(REPO, "experiments", "convert.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _row(variant, seed, val, lr=1e-3, **extra):
  return {
    "variant": variant,
    "seed": seed,
    "val_loss": val,
    "peak_lr": lr,
    "curve": [(100, val + 1.0, 0), (200, val + 0.5, 2)],
    **extra,
  }


def test_summary_counts_chosen_rows_and_measures_the_gap(study, tmp_path):
  runs = [
    _row("teacher", 0, 3.0),
    _row("converted", 0, 9.0, lr=1e-3, sweep=True),  # a sweep point that lost
    _row("converted", 0, 3.4, lr=3e-3, sweep=True, chosen=True),
    _row("converted", 1, 3.6, lr=3e-3, chosen=True),
    _row("scratch_frac", 0, 5.0, chosen=True),
    _row("scratch_frac", 1, 5.2, chosen=True),
    _row("scratch_full", 0, 3.5, chosen=True),
  ]
  s = study.summarize(runs)
  assert s["val_loss"]["converted"]["n"] == 2
  assert s["val_loss"]["converted"]["mean"] == pytest.approx(3.5)
  assert s["gap_closed"] == pytest.approx((5.1 - 3.5) / (5.1 - 3.0))
  assert s["converted_minus_scratch_frac"] == pytest.approx(3.5 - 5.1)
  assert s["seed_noise_std"] == pytest.approx(0.1414, abs=1e-3)
  assert s["target_gap_closed_0.8"] is False and s["target_beats_scratch_frac_beyond_noise"]
  assert s["chosen_lr"]["converted"] == 3e-3
  results = {
    "runs": runs,
    "summary": s,
    "settings": {
      "teacher_tokens": 1000,
      "tokenizer": "bpe:4096",
      "d_model": 8,
      "num_layers": 1,
      "fraction": 0.1,
    },
  }
  path = tmp_path / "convert.png"
  study.plot(results, str(path))
  assert path.stat().st_size > 10_000


def test_mark_chosen_picks_over_merged_parts_by_setting(study):
  """Coordinate-wise tuning in several invocations: the best tuning-seed row over all parts
  picks the setting; other seeds count only if they ran that setting."""
  hp = lambda lr, alpha: {"peak_lr": lr, "alpha": alpha, "temperature": 1.0}
  runs = [
    _row("teacher", 0, 3.0),
    _row("converted", 0, 4.2, lr=3e-3, hp=hp(3e-3, 0.5), sweep=True, chosen=True),
    _row("converted", 0, 4.4, lr=1e-2, hp=hp(1e-2, 0.5), sweep=True),
    _row("converted", 0, 4.1, lr=3e-3, hp=hp(3e-3, 1.0), chosen=True),  # later part
    _row("converted", 1, 4.3, lr=3e-3, hp=hp(3e-3, 0.5), chosen=True),  # stale
    _row("converted", 1, 4.0, lr=3e-3, hp=hp(3e-3, 1.0), chosen=True),
    _row("scratch_frac", 0, 5.0, hp={"peak_lr": 1e-2}),
    _row("scratch_frac", 2, 5.2, hp={"peak_lr": 1e-2}),
  ]
  study.mark_chosen(runs)
  conv = [r for r in runs if r["variant"] == "converted"]
  assert [r["chosen"] for r in conv] == [False, False, True, False, True]
  assert [r.get("sweep") for r in conv] == [True, True, True, None, None]
  assert [r["chosen"] for r in runs[-2:]] == [True, True] and runs[-2]["sweep"] is False
  s = study.summarize(runs)
  assert s["val_loss"]["converted"]["values"] == [4.1, 4.0]
  assert s["chosen_hp"]["converted"] == hp(3e-3, 1.0)
  assert s["tuning_runs"]["converted"] == 3


def test_student_grid_is_the_product_of_the_list_flags(study):
  args = study.parse_args(
    [
      "--lr_student",
      "3e-3,1e-2",
      "--alpha",
      "0.5,1",
      "--quant_ramp_fraction",
      "0.5",
      "--stage1_fraction",
      "0.25",
    ]
  )
  assert len(args.student_grid) == 4
  assert {(g["lr_student"], g["alpha"]) for g in args.student_grid} == {
    (3e-3, 0.5),
    (3e-3, 1.0),
    (1e-2, 0.5),
    (1e-2, 1.0),
  }
  assert all(g["quant_ramp_fraction"] == 0.5 and g["temperature"] == 1.0 for g in args.student_grid)
  cfg = study.make_config(
    args,
    "mmfree",
    40,
    3e-3,
    0,
    4096,
    teacher="/t",
    hp={k: v for k, v in args.student_grid[0].items() if k != "lr_student"},
  )
  assert cfg.distill.quant_ramp_steps == 20 and cfg.distill.stage1_steps == 10
  assert cfg.model.bitlinear_impl == "autodiff"  # the ramp needs it
  plain = study.make_config(args, "mmfree", 40, 3e-3, 0, 4096)
  assert plain.model.bitlinear_impl == "auto" and not plain.distill.teacher


def test_bad_flags_are_refused(study):
  with pytest.raises(SystemExit):
    study.parse_args(["--skip", "teacher"])
  with pytest.raises(SystemExit):
    study.parse_args(["--fraction", "0"])
  with pytest.raises(SystemExit):
    study.parse_args(["--alpha", "0.5,x"])
  with pytest.raises(SystemExit):
    study.parse_args(["--alpha", "1.5"])
  with pytest.raises(SystemExit):
    study.parse_args(["--lr_scratch", ","])
  with pytest.raises(SystemExit):
    study.parse_args(["--calibrate", "none,some"])
  with pytest.raises(SystemExit):
    study.parse_args(["--mapping", "vkk"])


def test_init_flags_are_string_hyperparameters(study):
  """--calibrate/--mapping take part in the grid; rows from before them (no such hp) are the
  plain copy with the default mapping, so they compare equal to 'none'/'vkq' rows."""
  args = study.parse_args(["--calibrate", "none,all", "--mapping", "vkq,kqv"])
  assert {(g["calibrate"], g["mapping"]) for g in args.student_grid} == {
    ("none", "vkq"),
    ("none", "kqv"),
    ("all", "vkq"),
    ("all", "kqv"),
  }
  hp = {"peak_lr": 3e-3, "alpha": 1.0}
  old = _row("converted", 0, 4.0, hp=dict(hp))
  plain = _row("converted", 0, 4.1, hp={**hp, "calibrate": "none", "mapping": "vkq"})
  calibrated = _row("converted", 0, 3.9, hp={**hp, "calibrate": "all", "mapping": "vkq"})
  assert study._hp(old) == study._hp(plain) != study._hp(calibrated)
  other_seed = _row("converted", 1, 4.2, hp=dict(hp))
  runs = [_row("teacher", 0, 3.0), old, plain, calibrated, other_seed]
  study.mark_chosen(runs)
  assert [r["chosen"] for r in runs[1:]] == [False, False, True, False]
