"""Packed and HF exports, HF imports and eval outputs on object storage: the GCS emulator and
the S3 server of tests/storage_emulators.py (real processes, nothing monkeypatched but a spy).

What a bucket export holds must be byte-for-byte what a local export holds, load back to the
same arrays (exact: the same bytes are read), and be published with its marker last (a packed
folder's `packed.json`, an HF folder's `config.json`), so a reader refuses a half-written one.
"""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from mmfree_jax import eval as ev
from mmfree_jax import export, paths
from mmfree_jax.checkpoint import loading
from mmfree_jax.config import ModelConfig
from mmfree_jax.convert import teacher
from mmfree_jax.eval.samples import SAMPLE_MC
from mmfree_jax.export import __main__ as export_cli
from mmfree_jax.export import writer
from mmfree_jax.hf import HFCheckpointError, checkpoint_io, llama, mapping
from tests.test_eval import ByteTok, _make_workdir
from tests.test_hf import random_workdir
from tests.test_llama import BASE as LLAMA_BASE
from tests.test_llama import _write as _write_llama


@pytest.fixture(params=["gs", "s3"])
def bucket(request):
  """`(emulator, fresh bucket prefix)` for each backend."""
  emulator = request.getfixturevalue("gcs_emulator" if request.param == "gs" else "s3_emulator")
  return emulator, emulator.root()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A local tiny MatMul-free workdir (random params at step 7, the mistral tokenizer)."""
  path = str(tmp_path_factory.mktemp("storage") / "wd")
  return path, random_workdir(path)


@pytest.fixture(autouse=True)
def no_local_scheme_folders(tmp_path, monkeypatch):
  """Runs each test in an empty cwd and fails it if a local `gs:`/`s3:` folder appears there
  (what a bucket path handed to `open`/`os.makedirs` makes)."""
  monkeypatch.chdir(tmp_path)
  yield
  assert not [n for n in os.listdir(tmp_path) if n in ("gs:", "s3:")]


def _files(folder: str) -> dict[str, bytes]:
  """`{name: bytes}` of every file directly in `folder` (any backend)."""
  return {name: paths.read_bytes(paths.join(folder, name)) for name in paths.listdir(folder)}


def _leaves(model) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(nnx.split(model)[1].to_pure_dict())]


def test_packed_export_on_a_bucket_equals_the_local_one(workdir, bucket, tmp_path):
  src, _ = workdir
  emulator, root = bucket
  local, remote = str(tmp_path / "packed"), paths.join(root, "packed")
  export.export_workdir(src, local)
  out = export.export_workdir(src, remote)
  assert out["dst"] == remote
  assert emulator.list_objects(remote) == [
    paths.join(remote, name)
    for name in ("config.json", "model.safetensors", "packed.json", "tokenizer.model")
  ]
  assert _files(remote) == _files(local)  # byte for byte, the manifest's source included
  model_local, cfg_local, manifest_local = export.load_packed(local)
  model_remote, cfg_remote, manifest_remote = export.load_packed(remote)
  assert manifest_remote == manifest_local and manifest_remote["step"] == 7
  for a, b in zip(_leaves(model_local), _leaves(model_remote), strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  assert cfg_remote.model.to_dict() == cfg_local.model.to_dict()
  assert cfg_remote.data.tokenizer == "spm:" + paths.join(remote, "tokenizer.model")


def test_bucket_exports_upload_their_marker_last(workdir, bucket, tmp_path, monkeypatch):
  """The last upload of a packed export is `packed.json` alone, of an HF export
  `config.json` alone (a spy on the real upload)."""
  src, _ = workdir
  _, root = bucket
  uploads: list[list[str]] = []
  upload_tree = paths.upload_tree

  def spy(local_dir, dest):
    uploads.append(sorted(os.listdir(local_dir)))
    upload_tree(local_dir, dest)

  monkeypatch.setattr(paths, "upload_tree", spy)
  export.export_workdir(src, paths.join(root, "packed"))
  assert uploads == [["config.json", "model.safetensors", "tokenizer.model"], ["packed.json"]]
  uploads.clear()
  checkpoint_io.export_checkpoint(src, paths.join(root, "hf"))
  assert uploads == [["model.safetensors", "tokenizer.model"], ["config.json"]]


def test_hf_export_to_a_bucket_imports_back_exactly(workdir, bucket, tmp_path):
  src, original = workdir
  emulator, root = bucket
  hf = paths.join(root, "hf")
  checkpoint_io.export_checkpoint(src, hf)
  assert [paths.basename(p) for p in emulator.list_objects(hf)] == [
    "config.json",
    "model.safetensors",
    "tokenizer.model",
  ]
  back = str(tmp_path / "back")
  out = checkpoint_io.import_checkpoint(hf, back)
  assert out["tokenizer"] == "spm:" + os.path.join(back, "tokenizer.model")
  cfg = loading.load_workdir_config(back)
  params, _ = loading.load_params(back, ModelConfig.from_config(cfg.model))
  imported = mapping.flatten(params)
  assert sorted(imported) == sorted(original)
  for name, value in original.items():
    np.testing.assert_array_equal(np.asarray(imported[name]), value, err_msg=name)
  with open(os.path.join(back, "tokenizer.model"), "rb") as f:
    assert f.read() == paths.read_bytes(paths.join(hf, "tokenizer.model"))


def test_sharded_hf_folder_in_a_bucket_imports(workdir, gcs_root, tmp_path):
  """An index and its shards in a bucket: only the listed shards are downloaded and read."""
  src, original = workdir
  local = str(tmp_path / "hf")
  checkpoint_io.export_checkpoint(src, local)
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel

  tensors_ = load_file(os.path.join(local, "model.safetensors"))
  names = sorted(tensors_)
  halves = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
  remote = paths.join(gcs_root, "sharded")
  for shard, members in halves.items():
    save_file({n: tensors_[n] for n in members}, str(tmp_path / shard), {"format": "pt"})
    paths.write_atomic(paths.join(remote, shard), (tmp_path / shard).read_bytes())
  index = {"weight_map": {n: s for s, members in halves.items() for n in members}}
  paths.write_atomic(paths.join(remote, "model.safetensors.index.json"), json.dumps(index))
  with open(os.path.join(local, "config.json"), "rb") as f:
    paths.write_atomic(paths.join(remote, "config.json"), f.read())
  back = str(tmp_path / "back")
  checkpoint_io.import_checkpoint(remote, back)
  params, _ = loading.load_params(
    back, ModelConfig.from_config(loading.load_workdir_config(back).model)
  )
  for name, value in original.items():
    np.testing.assert_array_equal(np.asarray(mapping.flatten(params)[name]), value)


def test_half_written_exports_are_refused_in_one_line(workdir, bucket, tmp_path):
  """A bucket folder whose marker was never uploaded (an interrupted export) is refused with a
  one-line message naming the missing file; nothing is read from it."""
  src, _ = workdir
  _, root = bucket
  local_packed, local_hf = str(tmp_path / "packed"), str(tmp_path / "hf")
  export.export_workdir(src, local_packed)
  checkpoint_io.export_checkpoint(src, local_hf)
  packed_dir, hf_dir = paths.join(root, "packed"), paths.join(root, "hf")
  for name in ("config.json", "model.safetensors"):  # all but packed.json
    paths.write_atomic(paths.join(packed_dir, name), _files(local_packed)[name])
  with pytest.raises(export.PackedDirError) as e:
    export.load_packed(packed_dir)
  assert "packed.json not found" in str(e.value) and "still being written" in str(e.value)
  assert "\n" not in str(e.value)
  paths.write_atomic(
    paths.join(hf_dir, "model.safetensors"), _files(local_hf)["model.safetensors"]
  )  # all but config.json
  with pytest.raises(HFCheckpointError) as e:
    checkpoint_io.import_checkpoint(hf_dir, str(tmp_path / "back"))
  assert "config.json not found" in str(e.value) and "still being written" in str(e.value)
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "back")


def test_failed_export_leaves_no_bucket_destination(workdir, bucket, monkeypatch, capsys):
  """A failure while the export is being made leaves nothing under the destination, and the
  same destination can then be used."""
  src, _ = workdir
  emulator, root = bucket
  dst = paths.join(root, "packed")
  real = writer.tensors.write_safetensors

  def failing(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(writer.tensors, "write_safetensors", failing)
  with pytest.raises(OSError, match="disk full"):
    export.export_workdir(src, dst)
  assert emulator.list_objects(dst) == []
  monkeypatch.setattr(writer.tensors, "write_safetensors", real)
  export.export_workdir(src, dst)
  with pytest.raises(FileExistsError, match="not empty"):
    export.export_workdir(src, dst)
  assert export_cli.main(["--workdir", src, "--dst", dst]) == 1
  assert capsys.readouterr().err == f"error: {dst} already exists and is not empty; pick a new " + (
    "directory or remove it first (nothing is overwritten)\n"
  )


def test_eval_of_a_bucket_export_reads_and_writes_the_bucket(bucket, tmp_path):
  """`eval.py --packed gs://…` in process: the packed folder, the perplexity and
  multiple-choice files in the bucket, the results file written there by one run and updated
  there by a second, with the numbers of the same evaluation done locally."""
  emulator, root = bucket
  _make_workdir(tmp_path / "wd")
  local_packed, remote_packed = str(tmp_path / "packed"), paths.join(root, "packed")
  export.export_workdir(str(tmp_path / "wd"), local_packed)
  export.export_workdir(str(tmp_path / "wd"), remote_packed)
  docs = "".join(json.dumps({"text": t}) + "\n" for t in ("In the beginning", "God said"))
  (tmp_path / "docs.jsonl").write_text(docs)
  remote_docs, remote_mc = paths.join(root, "docs.jsonl"), paths.join(root, "mc.jsonl")
  paths.write_atomic(remote_docs, docs)
  with open(SAMPLE_MC, "rb") as f:
    paths.write_atomic(remote_mc, f.read())
  common = dict(mc_limit=4, batch_size=4, chunk_len=8)
  run = lambda folder, **kw: ev.evaluate_workdir(
    folder, ev.EvalOptions(**kw, **common), tokenizer=ByteTok(), packed=True
  )
  local = ev.evaluate_workdir(
    local_packed,
    ev.EvalOptions(mc_files=[SAMPLE_MC], ppl_files=[str(tmp_path / "docs.jsonl")], **common),
    tokenizer=ByteTok(),
    packed=True,
    output_dir=str(tmp_path / "eval"),
  )
  first = run(remote_packed, ppl_files=[remote_docs])
  results = paths.join(remote_packed, "eval", "step_0.json")
  assert first["output"] == results
  assert emulator.list_objects(paths.join(remote_packed, "eval")) == [results]
  run(remote_packed, mc_files=[remote_mc])  # updates the bucket's file, keeps the perplexity
  stored = json.loads(paths.read_text(results))
  ppl, mc = stored["perplexity"][remote_docs], stored["multiple_choice"]["mc"]
  assert ppl["file"] == remote_docs and mc["file"] == remote_mc
  (ppl_local,) = local["perplexity"].values()
  assert (ppl["perplexity"], ppl["tokens"]) == (ppl_local["perplexity"], ppl_local["tokens"])
  mc_local = local["multiple_choice"]["sample_mc"]
  assert (mc["acc"], mc["acc_norm"], mc["n"]) == (mc_local["acc"], mc_local["acc_norm"], 4)


def test_eval_of_a_gs_workdir_reads_and_writes_the_bucket(gcs_emulator, gcs_root, tmp_path):
  """A workdir in the bucket (its checkpoint written there by orbax): eval reads it and writes
  its results there, with the numbers of the same workdir on disk."""
  wd, local_wd = paths.join(gcs_root, "wd"), str(tmp_path / "wd")
  _make_workdir(wd)
  _make_workdir(local_wd)
  options = ev.EvalOptions(mc_files=[SAMPLE_MC], mc_limit=2, batch_size=2, chunk_len=8)
  out = ev.evaluate_workdir(wd, options, tokenizer=ByteTok())
  assert out["output"] == paths.join(wd, "eval", "step_0.json") and out["workdir"] == wd
  local = ev.evaluate_workdir(local_wd, options, tokenizer=ByteTok(), write=False)
  stored = json.loads(paths.read_text(out["output"]))["multiple_choice"]["sample_mc"]
  want = local["multiple_choice"]["sample_mc"]
  assert (stored["acc"], stored["acc_norm"]) == (want["acc"], want["acc_norm"])


@pytest.mark.slow  # one orbax restore per stacked leaf, each a round trip to the emulator
def test_packed_export_of_a_gs_workdir_equals_the_local_one(gcs_emulator, gcs_root, tmp_path):
  wd, local_wd = paths.join(gcs_root, "wd"), str(tmp_path / "wd")
  _make_workdir(wd)
  _make_workdir(local_wd)
  export.export_workdir(wd, paths.join(gcs_root, "packed"))
  export.export_workdir(local_wd, str(tmp_path / "packed"))
  remote = _files(paths.join(gcs_root, "packed"))
  local = _files(str(tmp_path / "packed"))
  assert sorted(remote) == sorted(local)
  assert remote["model.safetensors"] == local["model.safetensors"]
  assert json.loads(remote["packed.json"])["source"] == wd


def test_hf_export_of_a_gs_workdir_imports_into_a_gs_workdir(gcs_emulator, gcs_root):
  """Every path in the bucket: workdir → HF folder → imported workdir, params exact."""
  wd = paths.join(gcs_root, "wd")
  original = random_workdir(wd)
  hf, back = paths.join(gcs_root, "hf"), paths.join(gcs_root, "back")
  checkpoint_io.export_checkpoint(wd, hf)
  out = checkpoint_io.import_checkpoint(hf, back)
  assert out["tokenizer"] == "spm:" + paths.join(back, "tokenizer.model")
  params, _ = loading.load_params(
    back, ModelConfig.from_config(loading.load_workdir_config(back).model)
  )
  imported = mapping.flatten(params)
  for name, value in original.items():
    np.testing.assert_array_equal(np.asarray(imported[name]), value, err_msg=name)


def test_llama_folder_in_a_bucket_as_import_source_and_teacher(gcs_root, tmp_path):
  """An HF Llama folder in the bucket imports, and serves as a distillation teacher, exactly as
  the same folder on disk."""
  local = str(tmp_path / "llama")
  _write_llama(local, LLAMA_BASE)
  remote = paths.join(gcs_root, "llama")
  paths.upload_tree(local, remote)
  student = ModelConfig.tiny()
  assert teacher.teacher_source(remote) == "llama"
  want_cfg = teacher.read_teacher_config(local, student)
  assert teacher.read_teacher_config(remote, student) == want_cfg
  want = mapping.flatten(teacher.load_teacher_params(local, want_cfg))
  got = mapping.flatten(teacher.load_teacher_params(remote, want_cfg))
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(value), err_msg=name)
  llama.import_llama(remote, str(tmp_path / "wd"))
  params, _ = loading.load_params(str(tmp_path / "wd"), want_cfg)
  for name, value in want.items():
    np.testing.assert_array_equal(np.asarray(mapping.flatten(params)[name]), np.asarray(value))


def test_import_into_an_s3_workdir_loads_back_bitwise(workdir, s3_emulator, s3_root, tmp_path):
  """An import into an s3:// workdir: orbax saves in a local staging folder that is mirrored
  to the bucket, commit marker last (checkpoint/staging.py); `load_model` there (a fresh
  download) gives the source's params bitwise, and nothing lands in a local `s3:` folder."""
  src, flat = workdir
  hf = str(tmp_path / "hf")
  checkpoint_io.export_checkpoint(src, hf)
  dst = paths.join(s3_root, "wd")
  checkpoint_io.import_checkpoint(hf, dst)
  names = s3_emulator.list_objects(dst)
  assert [n for n in names if n.endswith("/checkpoints/0/commit_success.txt")], names
  model, _, step = loading.load_model(dst)
  got = mapping.flatten(nnx.split(model)[1].to_pure_dict())
  assert step == 0 and sorted(got) == sorted(flat)
  for name, value in flat.items():
    np.testing.assert_array_equal(np.asarray(got[name]), value, err_msg=name)


def test_packed_export_stores_a_tokenizer_file_from_a_bucket(workdir, gcs_root, tmp_path):
  """`--tokenizer spm:gs://…`: the bucket's tokenizer file is copied into the export."""
  src, _ = workdir
  export.export_workdir(src, str(tmp_path / "a"))  # the workdir's own (mistral) tokenizer
  with open(tmp_path / "a" / "tokenizer.model", "rb") as f:
    data = f.read()
  remote_tok = paths.join(gcs_root, "tok.model")
  paths.write_atomic(remote_tok, data)
  export.export_workdir(src, str(tmp_path / "b"), tokenizer="spm:" + remote_tok)
  with open(tmp_path / "b" / "tokenizer.model", "rb") as f:
    assert f.read() == data
  assert json.loads((tmp_path / "b" / "config.json").read_text())["data"]["tokenizer"] == (
    "spm:tokenizer.model"
  )
