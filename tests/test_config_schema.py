"""One schema (issue 25 item 4): each key declared once, with default, help and validator, from
which base_config, ModelConfig, DistillSettings, the help and docs §5 derive; validation in one
pass listing every problem; issue 28 item 9's validators."""

import dataclasses
import math
import os
import re
import shutil
import subprocess
import sys

import pytest

from mmfree_jax import config as config_lib
from mmfree_jax.config import ConfigError, DistillSettings, ModelConfig, docs, schema
from mmfree_jax.config import __main__ as config_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**overrides):
  cfg = config_lib.base_config()
  for key, value in overrides.items():
    section, name = key.split(".")
    cfg[section][name] = value
  return cfg


# ----------------------------------------------------------------------- declared once


def test_base_config_is_the_schema():
  cfg = config_lib.base_config()
  assert sorted(cfg) == sorted(schema.SCHEMA)
  for section, fields in schema.SCHEMA.items():
    assert sorted(cfg[section]) == sorted(fields)
    for key, field in fields.items():
      value = cfg[section][key]
      value = value.to_dict() if hasattr(value, "to_dict") else value
      assert value == field.default, (section, key)
      assert field.help and field.check.text, (section, key)
  assert config_lib.config_help() == {
    f"{s}.{k}": f.help for s, fields in schema.SCHEMA.items() for k, f in fields.items()
  }


@pytest.mark.parametrize("cls,section", [(ModelConfig, "model"), (DistillSettings, "distill")])
def test_frozen_configs_take_their_fields_and_defaults_from_the_schema(cls, section):
  fields = dataclasses.fields(cls)
  assert [f.name for f in fields] == list(schema.SCHEMA[section])
  assert {f.name: f.default for f in fields} == {
    k: f.default for k, f in schema.SCHEMA[section].items()
  }
  instance = cls.from_config({})
  assert hash(instance) == hash(cls.from_config({}))  # hashable: a static jit argument
  with pytest.raises(dataclasses.FrozenInstanceError):
    instance.alpha = 0  # frozen


def test_registry_names_match_the_modules_that_dispatch_on_them():
  from mmfree_jax.convert import calibrate, student  # pylint: disable=import-outside-toplevel
  from mmfree_jax.data import sources  # pylint: disable=import-outside-toplevel
  from mmfree_jax.parallel import mesh  # pylint: disable=import-outside-toplevel
  from mmfree_jax.train import distill, optim  # pylint: disable=import-outside-toplevel

  assert schema.SCHEDULES is optim.SCHEDULES
  assert distill.DistillSettings is DistillSettings
  assert schema.MESH_AXES == mesh.MESH_AXES
  assert schema.DATA_SOURCES == sources.SOURCES
  assert schema.CALIBRATIONS == tuple(calibrate.CALIBRATIONS)
  assert schema.SCHEMA["distill"]["mapping"].default == student.DEFAULT_MAPPING
  assert schema.REMAT_NAMES == tuple(config_lib.REMAT_POLICIES)


def test_help_is_not_parsed_from_source():
  assert not hasattr(config_lib, "_schema_comments") and not hasattr(schema, "_schema_comments")


# ------------------------------------------------------------------------------ docs §5


def test_docs_schema_section_is_current():
  assert docs.doc_is_current(), "docs §5 is stale: run python -m mmfree_jax.config --docs"
  with open(docs.DOC_PATH, encoding="utf-8") as f:
    text = f.read()
  for key in (
    "num_kv_heads",
    "rope_theta",
    "attention_impl",
    "mixture",
    "tracker",
    "teacher_step",
    "activation_batch",
  ):
    assert f"`{key}`" in text or key in text, key
  assert "#### `distill`" in text


def test_stale_doc_is_detected_and_rewritten(tmp_path, monkeypatch, capsys):
  path = str(tmp_path / "architecture.md")
  shutil.copy(docs.DOC_PATH, path)
  assert config_main.main(["--check", "--path", path]) == 0
  monkeypatch.setitem(
    schema.SCHEMA["train"], "steps", dataclasses.replace(schema.SCHEMA["train"]["steps"], default=7)
  )
  assert config_main.main(["--check", "--path", path]) == 1
  assert "stale" in capsys.readouterr().err
  assert config_main.main(["--docs", "--path", path]) == 0
  assert config_main.main(["--check", "--path", path]) == 0
  with open(path, encoding="utf-8") as f:
    assert "| `steps` | `7` |" in f.read()


# -------------------------------------------------------------------- one pass, all errors


def test_every_problem_is_reported_in_one_error():
  cfg = _cfg(
    **{
      "model.d_model": -1,
      "model.scan_type": "fast",
      "data.source": "parquet",
      "train.steps": 0,
      "optim.b2": 1.0,
      "distill.alpha": 2.0,
    }
  )
  with pytest.raises(ConfigError) as e:
    config_lib.validate(cfg)
  problems = e.value.problems
  assert len(problems) == 6, problems
  text = str(e.value)
  assert text.startswith("6 config errors:")
  for key, value in (
    ("model.d_model", "-1"),
    ("model.scan_type", "'fast'"),
    ("data.source", "'parquet'"),
    ("train.steps", "0"),
    ("optim.b2", "1.0"),
    ("distill.alpha", "2.0"),
  ):
    line = next(p for p in problems if p.startswith(key + " "))
    assert f"got {value}" in line and f"--config.{key}" in line, line
  config_lib.validate(config_lib.base_config())  # the defaults pass


def test_cross_key_rules_join_the_same_pass():
  cfg = _cfg(
    **{
      "model.scan_type": "chunked",
      "model.chunk_size": 48,
      "data.mixture": "1,1",
      "train.tracker": "comet",
    }
  )
  with pytest.raises(ConfigError) as e:
    config_lib.validate(cfg)
  text = str(e.value)
  assert "seq_len=256 is not divisible by model.chunk_size=48" in text
  assert "data.mixture weights prepared folders" in text
  assert "train.tracker must be one of" in text and len(e.value.problems) == 3


@pytest.mark.subprocess
def test_train_py_prints_all_errors_as_one_error_message(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      "train.py",
      f"--workdir={tmp_path}",
      "--config.optim.lr=1e300",
      "--config.optim.eps=0",
      "--config.model.rms_norm_eps=-1",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode != 0
  err = proc.stderr.strip().splitlines()
  start = next(i for i, line in enumerate(err) if line.startswith("train.py: error:"))
  assert err[start] == "train.py: error: 3 config errors:", err
  assert "Traceback" not in proc.stderr
  block = "\n".join(err[start:])
  for key in ("model.rms_norm_eps", "optim.lr", "optim.eps"):
    assert f"--config.{key}" in block
  assert not os.path.exists(tmp_path / "checkpoints")


# ------------------------------------------------------------ issue 28 item 9 validators


@pytest.mark.parametrize(
  "key,value",
  [
    ("optim.lr", 1e300),
    ("optim.lr", math.inf),
    ("optim.lr", math.nan),
    ("optim.lr", 2.0),
    ("optim.b1", 1.0),
    ("optim.b1", -0.1),
    ("optim.b2", 1.0),
    ("optim.b2", math.nan),
    ("optim.eps", 0.0),
    ("optim.eps", -1e-8),
    ("optim.weight_decay", -0.01),
    ("optim.clip_norm", -1.0),
    ("optim.z_loss", -1e-4),
    ("model.rms_norm_eps", 0.0),
    ("model.rms_norm_eps", -1.0),
    ("train.sample_tokens", -1),
    ("train.peak_flops_per_device", -1.0),
    ("distill.temperature", math.nan),
  ],
)
def test_issue28_bad_values_are_refused(key, value):
  with pytest.raises(
    ConfigError,
    match=f"^{key} must be .*; got {re.escape(repr(value))} "
    rf"\(set --config.{key}\)$",
  ):
    config_lib.validate(_cfg(**{key: value}))


@pytest.mark.parametrize(
  "key,value",
  [
    ("optim.lr", 0.0),
    ("optim.lr", 1.0),
    ("optim.b1", 0.0),
    ("optim.b2", 0.999),
    ("optim.clip_norm", 0.0),
    ("optim.z_loss", 0.0),
    ("train.sample_tokens", 0),
    ("train.peak_flops_per_device", 0.0),
    ("optim.weight_decay", 0.0),
  ],
)
def test_issue28_edge_values_are_accepted(key, value):
  config_lib.validate(_cfg(**{key: value}))


def test_sampling_temperature_nan_is_refused():
  from mmfree_jax import generate  # pylint: disable=import-outside-toplevel

  for bad in (math.nan, math.inf, -1.0):
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
      generate.SamplingConfig(temperature=bad).validate()
  generate.SamplingConfig(temperature=0.7).validate()


def test_negative_mc_limit_is_refused(tmp_path):
  from mmfree_jax.eval import runner  # pylint: disable=import-outside-toplevel

  path = tmp_path / "mc.jsonl"
  path.write_text('{"context": "a", "choices": ["b", "c"], "label": 0}\n')
  with pytest.raises(ValueError, match="mc_limit=-1 must be >= 0"):
    runner._check_options(runner.EvalOptions(mc_files=[str(path)], mc_limit=-1))
  assert len(runner._check_options(runner.EvalOptions(mc_files=[str(path)]))[str(path)]) == 1


@pytest.mark.subprocess
def test_import_is_light():
  code = (
    "import sys, mmfree_jax.config as c; c.base_config(); "
    "print(sorted(m for m in sys.modules if m.startswith(('mmfree_jax.ops', "
    "'mmfree_jax.kernels', 'jax.experimental.pallas'))))"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env={**os.environ, "PYTHONPATH": ROOT},
    timeout=120,
    check=True,
  )
  assert proc.stdout.strip() == "[]", proc.stdout
