"""Data inputs and outputs in a bucket: the GCS emulator and the S3 server (real processes,
tests/storage_emulators.py) against the same files on a local disk.

Each test writes one input both locally and into the bucket and checks that reading the bucket
gives exactly what reading the disk gives (documents, units, tokenizer ids and fingerprints,
`prepare`'s shards and the token batches trained on), and that nothing lands in a local `gs:`
or `s3:` folder instead.
"""

import glob
import gzip
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmfree_jax import data, paths
from mmfree_jax.config import base_config
from mmfree_jax.data import cache as data_cache
from mmfree_jax.data import formats, sources, untrusted
from mmfree_jax.data import prepare as prep
from mmfree_jax.data import prepared as prepared_lib
from mmfree_jax.data import tokenizer as tok_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = [f"doc {i}: " + "lorem ipsum dolor " * (1 + i % 5) + "é" for i in range(40)]


@pytest.fixture(params=["gs", "s3"])
def bucket(request):
  """A fresh `gs://` or `s3://` prefix in its emulator."""
  return request.getfixturevalue(f"{'gcs' if request.param == 'gs' else 's3'}_root")


@pytest.fixture(autouse=True)
def no_local_bucket_folder(tmp_path, monkeypatch):
  """Runs each test in an empty cwd and fails if a local `gs:`/`s3:` folder appears there."""
  monkeypatch.chdir(tmp_path)
  yield
  assert not [n for n in os.listdir(tmp_path) if n in ("gs:", "s3:")]


def put(path: str, data: bytes) -> None:
  """Writes `data` to `path` (local or bucket) through the path layer."""
  paths.makedirs(paths.dirname(path))
  paths.write_atomic(path, data)


def jsonl_bytes(texts) -> bytes:
  import json  # pylint: disable=import-outside-toplevel

  return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def parquet_bytes(texts, row_group_size=7) -> bytes:
  sink = pa.BufferOutputStream()
  pq.write_table(
    pa.table({"text": texts, "n": list(range(len(texts)))}), sink, row_group_size=row_group_size
  )
  return sink.getvalue().to_pybytes()


def data_cfg(source: str, file_paths: str):
  cfg = base_config().data
  cfg.source, cfg.paths = source, file_paths
  return cfg


@pytest.mark.parametrize(
  "source,name,payload",
  [
    ("text", "corpus.txt", "\n\n".join(TEXTS).encode()),
    ("text", "corpus.txt.gz", gzip.compress("\n\n".join(TEXTS).encode())),
    ("jsonl", "corpus.jsonl.gz", gzip.compress(jsonl_bytes(TEXTS))),
  ],
)
def test_a_text_source_in_a_bucket_reads_as_the_local_file(bucket, tmp_path, source, name, payload):
  local, remote = str(tmp_path / "in" / name), paths.join(bucket, "in", name)
  put(local, payload)
  put(remote, payload)
  local_src = sources.source_from_config(data_cfg(source, local))
  remote_src = sources.source_from_config(data_cfg(source, paths.join(bucket, "in", "*")))
  assert remote_src.paths == (remote,)
  assert list(remote_src.documents()) == list(local_src.documents()) == TEXTS
  assert remote_src.fingerprint != local_src.fingerprint  # another file: another cache key


def test_parquet_and_zstd_inputs_in_a_bucket_read_as_local(bucket, tmp_path):
  zstandard = pytest.importorskip("zstandard")
  files = {
    "a.parquet": parquet_bytes(TEXTS),
    "b.jsonl.zst": zstandard.ZstdCompressor().compress(jsonl_bytes(TEXTS)),
  }
  for name, payload in files.items():
    put(str(tmp_path / name), payload)
    put(paths.join(bucket, name), payload)
  for name, fmt in (("a.parquet", "parquet"), ("b.jsonl.zst", "jsonl")):
    local, remote = str(tmp_path / name), paths.join(bucket, name)
    assert formats.resolve_inputs(remote, fmt) == [remote]
    formats.check_inputs([remote], fmt, "text")
    for start in (0, 9):  # from the top, and a resume inside the second row group
      want = list(formats.read_units(local, fmt, "text", start))
      assert list(formats.read_units(remote, fmt, "text", start)) == want
      assert [t for _, t in want] == TEXTS[start:]
  with pytest.raises(ValueError, match="has no column 'body'.*--text_field"):
    formats.check_inputs([paths.join(bucket, "a.parquet")], "parquet", "body")


def test_missing_bucket_inputs_are_one_line_errors(bucket):
  with pytest.raises(ValueError, match=r"data\.paths file '.*nope\.txt' does not exist"):
    sources.source_from_config(data_cfg("text", paths.join(bucket, "nope.txt")))
  with pytest.raises(ValueError, match=r"glob .* matches no files"):
    sources.source_from_config(data_cfg("text", paths.join(bucket, "*.txt")))
  with pytest.raises(ValueError, match=r"--inputs file .* does not exist; fix --inputs"):
    formats.resolve_inputs(paths.join(bucket, "nope.jsonl"), "jsonl")


def test_tokenizer_files_in_a_bucket_load_as_local(bucket, tmp_path):
  bpe = tok_lib.HFTokenizer(tok_lib.train_bpe(TEXTS, 300), "bpe:300")
  bpe.save(str(tmp_path))
  bpe.save(paths.join(bucket, "hf"))  # save writes to a bucket too
  local = tok_lib.load_tokenizer(f"hf:{tmp_path}/tokenizer.json", cache_dir="/nonexistent")
  for spec in (f"hf:{bucket}/hf/tokenizer.json", f"hf:{bucket}/hf"):  # the file, its folder
    remote = tok_lib.load_tokenizer(spec, cache_dir="/nonexistent")
    assert remote.fingerprint == local.fingerprint == bpe.fingerprint
    assert remote.encode_documents(TEXTS) == local.encode_documents(TEXTS)
  spm_file = tok_lib.mistral_tokenizer_path()
  put(paths.join(bucket, "spm", "tokenizer.model"), paths.read_bytes(spm_file))
  mistral = tok_lib.load_tokenizer("spm:mistral", cache_dir="/nonexistent")
  remote = tok_lib.load_tokenizer(f"spm:{bucket}/spm", cache_dir="/nonexistent")
  assert remote.fingerprint == mistral.fingerprint
  assert remote.encode_documents(TEXTS) == mistral.encode_documents(TEXTS)
  with pytest.raises(ValueError, match=r"tokenizer file '.*missing\.json'.*does not exist"):
    tok_lib.load_tokenizer(f"hf:{bucket}/missing.json", cache_dir="/nonexistent")
  put(paths.join(bucket, "bad.json"), b"{not json")
  with pytest.raises(ValueError, match=r"bad\.json .* is not a tokenizers JSON file"):
    tok_lib.load_tokenizer(f"hf:{bucket}/bad.json", cache_dir="/nonexistent")


def test_confined_join_on_a_bucket_keeps_names_under_the_prefix(bucket):
  ok = untrusted.confined_join(bucket, "a/./b/../shard.bin", what="w", fix="f")
  assert ok == paths.join(bucket, "a", "shard.bin")
  for name in ("../x", "a/../../x", "/abs", "gs://other/x", "..", ""):
    with pytest.raises(ValueError, match="w names"):
      untrusted.confined_join(bucket, name, what="w", fix="f")
  put(paths.join(bucket, "m.json"), b"[1, {")
  with pytest.raises(ValueError, match=r"m\.json \(what\) is not valid JSON: .*; fix"):
    untrusted.load_json(paths.join(bucket, "m.json"), what="what", fix="fix")


# ---------------------------------------------------------------------------- prepare, reader


def prepare_into(inputs: str, tokenizer: str, out: str, cache: str) -> dict:
  return prep.prepare(
    prep.PrepareOptions(
      inputs=inputs,
      format="jsonl",
      tokenizer=tokenizer,
      out=out,
      shard_tokens=1500,
      record_tokens=64,
      val_shards=1,
      cache_dir=cache,
    )
  )


def batches(out: str, tokenizer: str, cache: str, steps: int = 5):
  """(training batches, validation batches) streamed from the prepared folder `out`."""
  cfg = base_config().data
  cfg.update(source="array_record", paths=out, tokenizer=tokenizer, seq_len=47, seed=0)
  tok = data.tokenizer_from_config(cfg, cache_dir=cache)
  it = data.train_iterator(cfg, tok, global_batch=4, cache_dir=cache)
  train = [next(it) for _ in range(steps)]
  val = data.validation_batches(cfg, tok, batch_size=4, num_batches=2, cache_dir=cache)
  return train, val


def test_prepare_into_a_bucket_streams_the_local_batches(bucket, tmp_path, request):
  emulator = request.getfixturevalue("gcs_emulator" if bucket.startswith("gs") else "s3_emulator")
  texts = [t * 3 for t in TEXTS] * 3
  hf = tok_lib.HFTokenizer(tok_lib.train_bpe(texts, 300), "bpe:300")
  payload = gzip.compress(jsonl_bytes(texts))
  put(str(tmp_path / "in.jsonl.gz"), payload)
  put(paths.join(bucket, "in", "c.jsonl.gz"), payload)
  local_tok, remote_tok = hf.save(str(tmp_path)), hf.save(paths.join(bucket, "tok"))
  local = prepare_into(
    str(tmp_path / "in.jsonl.gz"), f"hf:{local_tok}", str(tmp_path / "out"), str(tmp_path / "c1")
  )
  out = paths.join(bucket, "out")
  remote = prepare_into(
    paths.join(bucket, "in", "*.gz"), f"hf:{remote_tok}", out, str(tmp_path / "c2")
  )
  assert len(remote["shards"]) >= 3 and remote["shards"] == local["shards"]  # byte-identical
  assert remote["splits"] == local["splits"]
  assert remote["tokenizer"] == {**local["tokenizer"], "spec": f"hf:{remote_tok}"}
  names = [paths.basename(p) for p in emulator.list_objects(out)]
  shard_files = [s["path"] for s in remote["shards"]]
  assert set(names) == {"manifest.json", "plan.json", "tokenizer.json", *shard_files} | {
    f.replace(".array_record", ".json") for f in shard_files
  }
  cache = str(tmp_path / "reader-cache")
  want = batches(str(tmp_path / "out"), f"hf:{local_tok}", str(tmp_path / "c3"))
  got = batches(out, f"hf:{out}/tokenizer.json", cache)  # the copy prepare stored there
  for w, g in zip(want[0] + want[1], got[0] + got[1]):
    for key in ("tokens", "segment_ids"):
      np.testing.assert_array_equal(g[key], w[key])
  copies = sorted(os.path.basename(p) for p in glob.glob(f"{cache}/remote/*/*"))
  assert copies and set(copies) <= set(shard_files)  # the shards read, cached by sha256


def test_an_unpublished_bucket_folder_is_refused_and_a_rerun_completes_it(bucket, tmp_path):
  paths.write_atomic(paths.join(bucket, "in.jsonl"), jsonl_bytes(TEXTS * 10))
  out, cache = paths.join(bucket, "out"), str(tmp_path / "cache")
  # bpe: trained on the bucket's text, stored in the bucket folder, reused by the rerun.
  first = prepare_into(paths.join(bucket, "in.jsonl"), "bpe:300", out, cache)
  assert len(first["shards"]) >= 3 and first["tokenizer"]["file"] == "tokenizer.json"
  # A prepare killed after committing shard 0: the later shards, their sidecars and the
  # manifest (the marker, written last) are missing.
  for name in paths.listdir(out):
    if name == "manifest.json" or name.startswith(("shard-00001", "shard-00002")):
      paths.remove(paths.join(out, name))
  for name in glob.glob(f"{cache}/tokenizers/*"):  # the rerun reads the folder's copy
    os.remove(name)
  with pytest.raises(ValueError) as err:
    prepared_lib.open_prepared(out)
  msg = str(err.value)
  assert "\n" not in msg and "has no manifest.json" in msg
  assert "rerun the same prepare command to complete it" in msg
  again = prepare_into(paths.join(bucket, "in.jsonl"), "bpe:300", out, cache)
  assert again == first and prepared_lib.open_prepared(out).manifest == first
  assert not glob.glob(f"{cache}/tokenizers/*")  # not retrained
  cfg = base_config().data
  cfg.update(source="array_record", paths=out, tokenizer="bpe:300", seq_len=47)
  tok = data.tokenizer_from_config(cfg, cache_dir=str(tmp_path / "other-cache"))
  assert tok.fingerprint == first["tokenizer"]["fingerprint"]
  with pytest.raises(ValueError, match=r"'.*/elsewhere' does not exist; run `python -m"):
    prepared_lib.open_prepared(paths.join(bucket, "elsewhere"))


def test_a_damaged_shard_in_a_bucket_or_its_copy_is_refused(bucket, tmp_path):
  paths.write_atomic(paths.join(bucket, "in.jsonl"), jsonl_bytes(TEXTS * 4))
  out, cache = paths.join(bucket, "out"), str(tmp_path / "cache")
  manifest = prepare_into(paths.join(bucket, "in.jsonl"), "byte", out, cache)
  shard = paths.join(out, manifest["shards"][0]["path"])

  def first_window():
    prepared = prepared_lib.open_prepared(out)
    return prepared_lib.PreparedWindows(
      prepared, "train", seq_len=47, eos_id=256, pad_id=257, cache_dir=cache
    )[0]

  def flip(raw: bytes) -> bytes:  # same size: only the checksum can tell
    raw = bytearray(raw)
    raw[len(raw) // 2] ^= 0xFF
    return bytes(raw)

  first_window()  # downloads shard 0 into the cache
  (copy,) = glob.glob(f"{cache}/remote/*/*")
  with open(copy, "rb") as f:
    good = f.read()
  before = os.stat(copy).st_mtime_ns
  with open(copy, "wb") as f:
    f.write(flip(good))
  os.utime(copy, ns=(before, before + 10**9))  # a new mtime even on a coarse clock
  with pytest.raises(ValueError, match=rf"shard {shard} \(its local copy .*\) does not match"):
    first_window()
  os.remove(copy)
  paths.write_atomic(shard, flip(paths.read_bytes(shard)))
  with pytest.raises(ValueError, match=r"shard-00000\.array_record does not have the sha256"):
    first_window()
  assert not glob.glob(f"{cache}/remote/*/*")  # nothing damaged is kept


def windows_of(cfg, cache: str):
  """Every (train, validation) window of a text or tokens source, as arrays."""
  tok = data.tokenizer_from_config(cfg, cache_dir=cache)
  splits = data.split_windows(cfg, tok, cache_dir=cache)
  return [[w[i]["tokens"] for i in range(len(w))] for w in splits]


@pytest.mark.parametrize("source", ["text", "tokens"])
def test_text_and_token_sources_in_a_bucket_train_on_the_local_windows(bucket, tmp_path, source):
  if source == "text":
    name, payload = "c.txt", "\n\n".join(TEXTS).encode()
  else:
    ids = np.concatenate([list(t.encode()) + [256] for t in TEXTS]).astype(np.int32)
    np.save(tmp_path / "ids.npy", ids)
    name, payload = "ids.npy", (tmp_path / "ids.npy").read_bytes()
  put(str(tmp_path / "in" / name), payload)
  put(paths.join(bucket, name), payload)
  cfg = data_cfg(source, str(tmp_path / "in" / name))
  cfg.update(tokenizer="byte", seq_len=31, val_fraction=0.2)
  want = windows_of(cfg, str(tmp_path / "c1"))
  cfg.paths = paths.join(bucket, name)
  cache = str(tmp_path / "c2")
  got = windows_of(cfg, cache)
  assert len(want[0]) > 4 and len(want[1]) > 0
  for w, g in zip(want[0] + want[1], got[0] + got[1]):
    np.testing.assert_array_equal(g, w)
  copied = glob.glob(f"{cache}/remote/*/*")
  assert [os.path.basename(p) for p in copied] == ([name] if source == "tokens" else [])


def test_hf_disk_dataset_in_a_bucket_reads_as_local(bucket, tmp_path):
  datasets = pytest.importorskip("datasets")
  datasets.DatasetDict(
    {
      "train": datasets.Dataset.from_dict({"text": TEXTS}),
      "test": datasets.Dataset.from_dict({"text": TEXTS[:3]}),
    }
  ).save_to_disk(str(tmp_path / "ds"))
  paths.upload_tree(str(tmp_path / "ds"), paths.join(bucket, "ds"))
  remote = paths.join(bucket, "ds")
  assert formats.resolve_inputs(paths.join(bucket, "d*"), "hf_disk") == [remote]
  formats.check_inputs([remote], "hf_disk", "text", "test")
  for split in ("train", "test"):
    want = list(formats.read_units(str(tmp_path / "ds"), "hf_disk", "text", hf_split=split))
    assert list(formats.read_units(remote, "hf_disk", "text", hf_split=split)) == want
  local_id = formats.input_identity(str(tmp_path / "ds"))
  assert [f for f, *_ in formats.input_identity(remote)] == [f for f, *_ in local_id]


@pytest.mark.subprocess
def test_prepare_cli_with_two_workers_on_a_bucket_needs_only_the_standard_variables(
  gcs_root, gcs_emulator, tmp_path
):
  """The CLI in a fresh process, told only the emulator's standard variables, tokenizing in
  two spawned workers that load the tokenizer from the bucket: the in-process shards."""
  texts = [t * 3 for t in TEXTS] * 3
  hf = tok_lib.HFTokenizer(tok_lib.train_bpe(texts, 300), "bpe:300")
  spec = f"hf:{hf.save(paths.join(gcs_root, 'tok'))}"
  put(paths.join(gcs_root, "in.jsonl"), jsonl_bytes(texts))
  want = prepare_into(paths.join(gcs_root, "in.jsonl"), spec, paths.join(gcs_root, "a"), "/none")
  env = {k: v for k, v in os.environ.items() if not k.startswith(("STORAGE_", "TENSORSTORE_"))}
  env.update(gcs_emulator.env, PYTHONPATH=REPO, MMFREE_CACHE=str(tmp_path / "cache"))
  out = paths.join(gcs_root, "b")
  flags = "--format jsonl --shard_tokens 1500 --record_tokens 64 --val_shards 1 --num_proc 2"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "mmfree_jax.data.prepare",
      "--inputs",
      paths.join(gcs_root, "in.jsonl"),
      "--tokenizer",
      spec,
      "--out",
      out,
      *flags.split(),
    ],
    env=env,
    cwd=str(tmp_path),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stderr.splitlines()[-1].startswith("tokenized "), proc.stderr  # no fsspec lines
  assert "Cache" not in proc.stderr
  got = untrusted.load_json(paths.join(out, "manifest.json"), what="m", fix="f")
  assert got["shards"] == want["shards"] and len(got["shards"]) >= 3


def test_a_bucket_cache_dir_is_refused_in_one_line(monkeypatch):
  monkeypatch.setenv("MMFREE_CACHE", "gs://bucket/cache")
  with pytest.raises(ValueError, match=r"^MMFREE_CACHE=gs://bucket/cache is a bucket.*local"):
    data_cache.default_cache_dir()


def test_a_bad_token_file_in_a_bucket_is_named_in_the_error(bucket, tmp_path):
  np.save(tmp_path / "ids.npy", np.array([5, 300, 256], np.int32))
  put(paths.join(bucket, "ids.npy"), (tmp_path / "ids.npy").read_bytes())
  cfg = data_cfg("tokens", paths.join(bucket, "ids.npy"))
  cfg.update(tokenizer="byte", seq_len=31)
  remote = paths.join(bucket, "ids.npy")
  with pytest.raises(ValueError, match=rf"^token file '{remote}' has ids in \[5, 300\]"):
    windows_of(cfg, str(tmp_path / "cache"))


def test_prepare_cli_reports_a_missing_bucket_in_one_line(s3_root, capsys):
  put(paths.join(s3_root, "in.jsonl"), jsonl_bytes(TEXTS))
  argv = ["--inputs", paths.join(s3_root, "in.jsonl"), "--format", "jsonl", "--tokenizer", "byte"]
  assert prep.main([*argv, "--out", "s3://no-such-bucket/out"]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: reading --inputs or writing --out s3://no-such-bucket/out")
  assert err.count("\n") == 1 and "bucket does not exist" in err and "credentials" in err
