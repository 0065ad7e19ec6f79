"""Files we did not write (issue 28 items 4, 5, 11, 15): paths read from a manifest, an HF
index or a packed config stay inside their folder; garbage or deeply nested tokenizer and JSON
files, NaN weights and lm-eval tasks that need the network end in one line naming the file or
task and the fix; a workdir without a tokenizer exports ids-only."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mmfree_jax import eval as ev
from mmfree_jax import export
from mmfree_jax.checkpoint import loading
from mmfree_jax.config import ModelConfig
from mmfree_jax.data import load_tokenizer
from mmfree_jax.data import prepared as prepared_lib
from mmfree_jax.export import __main__ as export_cli
from mmfree_jax.export import reader
from mmfree_jax.hf import HFCheckpointError, checkpoint_io, tensors
from mmfree_jax.hf import __main__ as hf_cli
from tests.test_data_integrity import folder, read_everything  # noqa: F401  (fixture)
from tests.test_hardening_eval import _random_workdir

DEEP = "[" * 100_000 + "]" * 100_000  # past Python's recursion limit, and tokenizers'


def one_line(info):
  assert "\n" not in str(info.value), str(info.value)
  return str(info.value)


# ---------------------------------------------------------------- 4. paths stay in the folder


def edited_copy(folder, tmp_path, edit):  # noqa: F811
  bad = tmp_path / "copy"
  shutil.copytree(folder, bad)
  manifest = json.load(open(bad / "manifest.json"))
  edit(manifest, bad)
  (bad / "manifest.json").write_text(json.dumps(manifest))
  return bad


@pytest.mark.parametrize("name", ["../outside.array_record", "/etc/hostname", "link"])
def test_a_manifest_shard_path_cannot_leave_the_folder(folder, tmp_path, name):  # noqa: F811
  outside = tmp_path / "outside.array_record"
  shutil.copyfile(folder / "shard-00000.array_record", outside)  # a readable shard outside

  def edit(manifest, bad):
    if name == "link":
      os.symlink(outside, bad / "link")
    manifest["shards"][0]["path"] = name

  bad = edited_copy(folder, tmp_path, edit)  # tmp_path/copy: ../ is tmp_path, the outside file
  with pytest.raises(ValueError, match=r"shards\[0\]\.path names .*(leaves|not a relative)"):
    read_everything(bad, str(tmp_path))


def test_a_manifest_tokenizer_file_cannot_leave_the_folder(folder, tmp_path):  # noqa: F811
  def edit(manifest, bad):
    manifest["tokenizer"]["file"] = "../../tokenizer.json"

  bad = edited_copy(folder, tmp_path, edit)
  with pytest.raises(
    ValueError,
    match=r"tokenizer\.file names '\.\./\.\./tokenizer\.json', "
    "which leaves",
  ):
    prepared_lib.open_prepared(str(bad)).tokenizer_path()


def hf_folder(tmp_path, tokenizer="byte"):
  src = tmp_path / "src"
  _random_workdir(src, tokenizer=tokenizer)
  hf = tmp_path / "hf"
  checkpoint_io.export_checkpoint(str(src), str(hf))
  return hf


def test_an_hf_index_cannot_point_outside_its_folder(tmp_path):
  hf = hf_folder(tmp_path)
  os.replace(hf / tensors.SINGLE_FILE, tmp_path / "outside.safetensors")
  names = list(load_file(tmp_path / "outside.safetensors"))
  (hf / tensors.SAFETENSORS_INDEX).write_text(
    json.dumps({"weight_map": {n: "../outside.safetensors" for n in names}})
  )
  with pytest.raises(
    HFCheckpointError,
    match=r"weight_map names '\.\./outside\.safetensors', "
    "which leaves",
  ):
    checkpoint_io.import_checkpoint(str(hf), str(tmp_path / "back"))
  assert not os.path.exists(tmp_path / "back")


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("packed")
  _random_workdir(tmp / "w", tokenizer="byte")
  export.export_workdir(str(tmp / "w"), str(tmp / "p"))
  return tmp / "p"


@pytest.mark.parametrize("spec", ["hf:../../tokenizer.json", "spm:/etc/hostname"])
def test_a_packed_config_tokenizer_cannot_leave_the_folder(packed_dir, tmp_path, spec):
  bad = tmp_path / "p"
  shutil.copytree(packed_dir, bad)
  cfg = json.load(open(bad / "config.json"))
  cfg["data"]["tokenizer"] = spec
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(
    export.PackedDirError,
    match=r"data\.tokenizer names .*(leaves|not a "
    "relative path)",
  ):
    reader.load_config(str(bad))


# ------------------------------------------------------------------ 5. non-finite HF weights


def test_hf_import_refuses_nan_weights_unless_allowed(tmp_path, capsys):
  hf = hf_folder(tmp_path)
  weights = load_file(hf / tensors.SINGLE_FILE)
  weights["model.embeddings.weight"][3, :5] = np.nan
  save_file(weights, hf / tensors.SINGLE_FILE, metadata={"format": "pt"})
  argv = ["import", "--src", str(hf), "--workdir", str(tmp_path / "back")]
  assert hf_cli.main(argv) == 1
  err = capsys.readouterr().err.strip()
  assert "\n" not in err
  assert "model.embeddings.weight in model.safetensors holds 5 non-finite value(s)" in err
  assert "--allow_nonfinite" in err and not os.path.exists(tmp_path / "back")
  assert hf_cli.main(argv + ["--allow_nonfinite"]) == 0
  cfg = loading.load_workdir_config(str(tmp_path / "back"))
  params, _ = loading.load_params(str(tmp_path / "back"), ModelConfig.from_config(cfg.model))
  assert np.isnan(np.asarray(params["embedding"])).sum() == 5


# ------------------------------------------------------------- 11. garbage and deep files


@pytest.mark.parametrize(
  "kind, content",
  [
    ("hf", b"\x00\x01 not json"),
    ("hf", DEEP.encode()),
    ("hf", b'{"version": "1.0"}'),
    ("spm", b"\x00\x01garbage" * 10),
  ],
)
def test_garbage_tokenizer_files_are_one_line(tmp_path, kind, content):
  path = tmp_path / ("tokenizer.json" if kind == "hf" else "tokenizer.model")
  path.write_bytes(content)
  with pytest.raises(ValueError, match=f"{path}.* is not a") as info:
    load_tokenizer(f"{kind}:{path}", cache_dir=str(tmp_path))
  assert "no network needed" in one_line(info)


def test_deeply_nested_json_files_are_one_line(folder, tmp_path, packed_dir):  # noqa: F811
  bad = edited_copy(folder, tmp_path, lambda manifest, bad: None)
  (bad / "manifest.json").write_text(DEEP)
  with pytest.raises(ValueError, match="manifest.json .* nested too deeply") as info:
    prepared_lib.open_prepared(str(bad))
  one_line(info)
  hf = hf_folder(tmp_path)
  (hf / "config.json").write_text(DEEP)
  with pytest.raises(HFCheckpointError, match="config.json .* nested too deeply") as info:
    checkpoint_io.import_checkpoint(str(hf), str(tmp_path / "back"))
  one_line(info)
  os.remove(hf / tensors.SINGLE_FILE)
  (hf / tensors.SAFETENSORS_INDEX).write_text(DEEP)
  with pytest.raises(HFCheckpointError, match="index.json .* nested too deeply") as info:
    tensors.open_weights(str(hf))
  one_line(info)
  packed = tmp_path / "p"
  shutil.copytree(packed_dir, packed)
  (packed / "config.json").write_text(DEEP)
  with pytest.raises(export.PackedDirError, match="nested too deeply") as info:
    reader.load_config(str(packed))
  one_line(info)


def test_a_deeply_nested_corpus_line_names_its_file_and_line(tmp_path):
  from mmfree_jax.data import prepare as prep

  (tmp_path / "x.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + DEEP + "\n")
  with pytest.raises(ValueError, match=r"x\.jsonl:2 is not valid JSON \(nested too deeply"):
    prep.prepare(
      prep.PrepareOptions(
        inputs=str(tmp_path / "x.jsonl"),
        format="jsonl",
        tokenizer="byte",
        out=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"),
      )
    )


def test_a_deeply_nested_multiple_choice_line_names_its_file_and_line(tmp_path):
  path = tmp_path / "mc.jsonl"
  path.write_text(DEEP + "\n")
  with pytest.raises(ValueError, match=r"mc\.jsonl:1: invalid JSON \(nested too deeply") as info:
    ev.load_mc_jsonl(str(path))
  one_line(info)


@pytest.mark.slow
def test_lm_eval_tasks_that_need_the_network_name_the_task(tmp_path, monkeypatch):
  pytest.importorskip("lm_eval", reason="lm-eval is an optional install")
  from mmfree_jax.eval import lm_eval_adapter

  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # an empty cache
  _random_workdir(tmp_path / "w")
  with pytest.raises(
    ValueError,
    match="lm-eval task 'lambada_openai' cannot load its dataset "
    r".*HF_DATASETS_OFFLINE=1.*--lm_eval_include_path",
  ) as info:
    lm_eval_adapter.evaluate_tasks(str(tmp_path / "w"), ["lambada_openai"], limit=1)
  one_line(info)
  with pytest.raises(ValueError, match="lm-eval task 'no_such_task_xyz' is not a known task"):
    lm_eval_adapter.evaluate_tasks(str(tmp_path / "w"), ["no_such_task_xyz"], limit=1)


# ------------------------------------------------------ 15. export without a tokenizer


def test_export_of_a_workdir_without_a_tokenizer(tmp_path, capsys):
  hf = hf_folder(tmp_path)  # byte: no file form, so the HF folder holds no tokenizer
  back = tmp_path / "back"
  assert checkpoint_io.import_checkpoint(str(hf), str(back))["tokenizer"] == ""
  assert export_cli.main(["--workdir", str(back), "--dst", str(tmp_path / "ids")]) == 0
  assert "ids only" in capsys.readouterr().out
  assert reader.load_config(str(tmp_path / "ids")).data.tokenizer == ""
  model, cfg, _ = reader.load_packed(str(tmp_path / "ids"))
  assert cfg.data.tokenizer == "" and model is not None
  with pytest.raises(ValueError, match="records no tokenizer.*--tokenizer"):
    ev.evaluate_workdir(
      str(tmp_path / "ids"), ev.EvalOptions(prompts=["x"]), write=False, packed=True
    )
  assert (
    export_cli.main(
      ["--workdir", str(back), "--dst", str(tmp_path / "named"), "--tokenizer", "spm:mistral"]
    )
    == 0
  )
  named = reader.load_config(str(tmp_path / "named")).data.tokenizer
  assert named == "spm:" + str(tmp_path / "named" / "tokenizer.model")
  assert load_tokenizer(named, cache_dir=str(tmp_path)).vocab_size == 32000
