"""`python -m mmfree_jax.data.prepare` and prepared folders as training data.

Expected shard contents are re-derived here from the documents with plain Python (the `byte`
tokenizer makes ids obvious: utf-8 bytes, then EOS 256) and read back with the ArrayRecord
reader itself, never through `prepared.py`.
"""

import gzip
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from array_record.python import array_record_module

from mmfree_jax import data
from mmfree_jax.config import base_config
from mmfree_jax.data import prepare as prep
from mmfree_jax.data import prepare_encode
from mmfree_jax.data import prepared as prepared_lib
from mmfree_jax.data import shards as shards_lib

EOS = 256
BYTE = data.load_tokenizer("byte", cache_dir="/nonexistent")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def docs(n=60, tag="d"):
  return [f"{tag}{i:03d} " + "abcdefghij"[i % 10] * (3 + 7 * (i % 9)) + " é" for i in range(n)]


def stream_of(texts):
  out = []
  for t in texts:
    out += list(t.encode("utf-8")) + [EOS]
  return out


def expected_shards(texts, shard_tokens):
  """Documents grouped into shards: a shard closes at the document reaching shard_tokens."""
  shards, current, size = [], [], 0
  for t in texts:
    current.append(t)
    size += len(t.encode("utf-8")) + 1
    if size >= shard_tokens:
      shards.append(current)
      current, size = [], 0
  if current:
    shards.append(current)
  if len(shards) == 1 and len(texts) >= 2:  # one shard's worth is cut in two at 90%
    total = len(stream_of(texts))
    k = next(i for i in range(len(texts)) if len(stream_of(texts[: i + 1])) >= 0.9 * total)
    k = min(k, len(texts) - 2)
    shards = [texts[: k + 1], texts[k + 1 :]]
  return shards


def read_shard(path, dtype="<u2"):
  reader = array_record_module.ArrayRecordReader(str(path))
  records = [np.frombuffer(r, dtype) for r in reader.read_all()]
  reader.close()
  return records


def write_jsonl(path, texts, field="text", opener=open):
  with opener(path, "wt") as f:
    for t in texts:
      f.write(json.dumps({field: t, "n": 1}) + "\n")
  return str(path)


def write_zst(path, payload: bytes):
  import zstandard

  with open(path, "wb") as f:
    f.write(zstandard.ZstdCompressor().compress(payload))
  return str(path)


def run(tmp_path, inputs, fmt, out="out", **kw):
  kw.setdefault("tokenizer", "byte")
  kw.setdefault("shard_tokens", 300)
  kw.setdefault("record_tokens", 64)
  return prep.prepare(
    prep.PrepareOptions(
      inputs=inputs, format=fmt, out=str(tmp_path / out), cache_dir=str(tmp_path / "cache"), **kw
    )
  )


def check_output(out_dir, manifest, texts, shard_tokens=300, record_tokens=64):
  """Shards hold exactly the expected documents' tokens, cut into fixed-size records."""
  groups = expected_shards(texts, shard_tokens)
  assert [s["path"] for s in manifest["shards"]] == [
    shards_lib.shard_name(i) for i in range(len(groups))
  ]
  for shard, group in zip(manifest["shards"], groups):
    path = os.path.join(out_dir, shard["path"])
    records = read_shard(path)
    expected = stream_of(group)
    assert np.concatenate(records).tolist() == expected
    assert [len(r) for r in records[:-1]] == [record_tokens] * (len(records) - 1)
    assert 0 < len(records[-1]) <= record_tokens
    assert (shard["documents"], shard["tokens"], shard["records"]) == (
      len(group),
      len(expected),
      len(records),
    )
    assert shard["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert shard["bytes"] == os.path.getsize(path)
  assert manifest["num_documents"] == len(texts)
  assert manifest["num_tokens"] == len(stream_of(texts))
  assert manifest["tokenizer"]["fingerprint"] == BYTE.fingerprint
  assert manifest["dtype"] == "<u2"
  on_disk = json.load(open(os.path.join(out_dir, "manifest.json")))
  assert on_disk == manifest
  assert not [n for n in os.listdir(out_dir) if n.endswith(".tmp")]


# ---------------------------------------------------------------------------- formats


def test_jsonl_plain_gz_zst_in_sorted_order(tmp_path):
  a, b, c = docs(20, "a"), docs(25, "b"), docs(15, "c")
  write_jsonl(tmp_path / "1.jsonl", a[:10] + [""] + a[10:])  # an empty text is no document
  with open(tmp_path / "1.jsonl", "a") as f:
    f.write("\n")  # a blank line neither
  write_jsonl(tmp_path / "2.jsonl.gz", b, opener=gzip.open)
  write_zst(tmp_path / "3.jsonl.zst", "".join(json.dumps({"text": t}) + "\n" for t in c).encode())
  manifest = run(tmp_path, f"{tmp_path}/*.jsonl*", "jsonl")
  check_output(tmp_path / "out", manifest, a + b + c)
  assert manifest["inputs"]["files"] == [
    str(tmp_path / n) for n in ("1.jsonl", "2.jsonl.gz", "3.jsonl.zst")
  ]


def test_parquet_row_groups_and_other_field(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  texts = docs(70)
  table = pa.table({"id": list(range(70)), "body": texts[:30] + [None] + texts[30:69]})
  pq.write_table(table, tmp_path / "x.parquet", row_group_size=16)  # 5 row groups
  assert pq.ParquetFile(tmp_path / "x.parquet").num_row_groups == 5
  manifest = run(tmp_path, str(tmp_path / "x.parquet"), "parquet", text_field="body")
  check_output(tmp_path / "out", manifest, texts[:69])


def test_text_paragraphs_plain_and_zst(tmp_path):
  (tmp_path / "a.txt").write_text("first line\nsecond line\n\n  \n\nthird\n")
  write_zst(tmp_path / "b.txt.zst", "\n\nlast one\nwith é\n".encode())
  manifest = run(tmp_path, f"{tmp_path}/a.txt,{tmp_path}/b.txt.zst", "text", compression="none")
  check_output(tmp_path / "out", manifest, ["first line\nsecond line", "third", "last one\nwith é"])
  assert manifest["writer_options"] == "group_size:1,uncompressed"


def test_hf_save_to_disk_dataset_and_dict(tmp_path):
  datasets = pytest.importorskip("datasets")
  texts = docs(40)
  datasets.Dataset.from_dict({"text": texts, "k": list(range(40))}).save_to_disk(
    str(tmp_path / "ds")
  )
  manifest = run(tmp_path, str(tmp_path / "ds"), "hf_disk")
  check_output(tmp_path / "out", manifest, texts)
  dd = datasets.DatasetDict(
    {
      "train": datasets.Dataset.from_dict({"text": texts[:7]}),
      "test": datasets.Dataset.from_dict({"text": texts[7:9]}),
    }
  )
  dd.save_to_disk(str(tmp_path / "dd"))
  manifest = run(tmp_path, str(tmp_path / "dd"), "hf_disk", out="out_dd", hf_split="test")
  check_output(tmp_path / "out_dd", manifest, texts[7:9])


def test_spm_tokenizer_is_stored_and_large_vocab_is_int32(tmp_path):
  import sentencepiece as spm

  model = tmp_path / "sp.model"
  with open(model, "wb") as f:
    spm.SentencePieceTrainer.train(
      sentence_iterator=iter(docs() * 5),
      model_writer=f,
      vocab_size=60,
      bos_id=1,
      eos_id=2,
      unk_id=0,
      pad_id=-1,
    )
  texts = docs(30)
  write_jsonl(tmp_path / "x.jsonl", texts)
  manifest = run(
    tmp_path, str(tmp_path / "x.jsonl"), "jsonl", tokenizer=f"spm:{model}", shard_tokens=10**6
  )
  tok = data.load_tokenizer(f"spm:{model}", cache_dir=str(tmp_path))
  assert manifest["tokenizer"] == {
    "spec": f"spm:{model}",
    "fingerprint": tok.fingerprint,
    "vocab_size": 60,
    "eos_id": 2,
    "bos_id": 1,
    "pad_id": 2,
    "file": "tokenizer.model",
  }
  assert open(tmp_path / "out" / "tokenizer.model", "rb").read() == open(model, "rb").read()
  records = [r for s in manifest["shards"] for r in read_shard(tmp_path / "out" / s["path"])]
  assert len(manifest["shards"]) == 2  # a corpus of one shard's worth is cut in two
  assert np.concatenate(records).tolist() == [i for t in texts for i in tok.encode_document(t)]
  assert shards_lib.token_dtype(65536) == np.dtype("<u2")
  assert shards_lib.token_dtype(65537) == "<i4"


# ---------------------------------------------------------------------------- determinism


def test_num_proc_does_not_change_the_output(tmp_path):
  texts = docs(300)
  write_jsonl(tmp_path / "x.jsonl", texts)
  one = run(tmp_path, str(tmp_path / "x.jsonl"), "jsonl", out="one", shard_tokens=2000)
  two = run(tmp_path, str(tmp_path / "x.jsonl"), "jsonl", out="two", shard_tokens=2000, num_proc=2)
  assert len(one["shards"]) >= 4
  assert one == two  # counts, checksums, splits
  for shard in one["shards"]:
    assert (
      open(tmp_path / "one" / shard["path"], "rb").read()
      == open(tmp_path / "two" / shard["path"], "rb").read()
    )


@pytest.mark.subprocess
def test_interrupted_prepare_resumes_without_redoing_shards(tmp_path, monkeypatch):
  texts = docs(200)
  write_jsonl(tmp_path / "a.jsonl", texts[:120])
  write_jsonl(tmp_path / "b.jsonl", texts[120:])
  inputs = f"{tmp_path}/*.jsonl"
  full = run(tmp_path, inputs, "jsonl", out="full", val_shards=2)
  commits = []
  real_commit = shards_lib.ShardWriter.commit

  def crash_on_fourth(self, *a, **kw):
    if self.index == 3:
      raise KeyboardInterrupt  # as if killed while closing shard 3
    commits.append(self.index)
    return real_commit(self, *a, **kw)

  monkeypatch.setattr(shards_lib.ShardWriter, "commit", crash_on_fourth)
  with pytest.raises(KeyboardInterrupt):
    run(tmp_path, inputs, "jsonl", out="part", val_shards=2)
  out = tmp_path / "part"
  assert commits == [0, 1, 2]
  assert not os.path.exists(out / "manifest.json")
  assert not [n for n in os.listdir(out) if n.endswith(".tmp")]  # the open shard is removed
  with pytest.raises(ValueError, match="did not finish; rerun the same prepare"):
    prepared_lib.open_prepared(str(out))
  kept = {i: os.stat(out / shards_lib.shard_name(i)).st_mtime_ns for i in range(3)}
  # A committed shard that no longer verifies is redone, with everything after it.
  sidecar = (out / shards_lib.sidecar_name(2)).read_text()
  (out / shards_lib.sidecar_name(2)).write_text(sidecar.replace('"sha256": "', '"sha256": "0'))
  started = []
  real_init = shards_lib.ShardWriter.__init__

  def record_start(self, out_dir, index, *a, **kw):
    started.append(index)
    real_init(self, out_dir, index, *a, **kw)

  monkeypatch.setattr(shards_lib.ShardWriter, "commit", real_commit)
  monkeypatch.setattr(shards_lib.ShardWriter, "__init__", record_start)
  resumed = run(tmp_path, inputs, "jsonl", out="part", val_shards=2)
  assert started == list(range(2, len(full["shards"])))  # shards 0 and 1 not redone
  assert {i: os.stat(out / shards_lib.shard_name(i)).st_mtime_ns for i in range(2)} == {
    i: kept[i] for i in range(2)
  }
  assert resumed == full
  # Rerunning a finished prepare reads no input; another split only rewrites the manifest.
  started.clear()
  again = run(tmp_path, inputs, "jsonl", out="part", val_shards=1)
  assert started == [] and again["shards"] == full["shards"]
  assert len(again["splits"]["validation"]) == 1


def test_validation_shards_are_spread_and_recorded(tmp_path):
  assert prep.validation_shards(10, 2, 0.0) == [2, 7]
  assert prep.validation_shards(10, 0, 0.3) == [1, 5, 8]
  assert prep.validation_shards(10, 0, 0.0) == []
  assert prep.validation_shards(10, None, 0.0) == [5]  # the default: one, mid-corpus
  assert prep.validation_shards(2, None, 0.0) == [1]
  assert prep.validation_shards(1, None, 0.0) == []  # one document: nothing to hold out
  assert prep.validation_shards(10, None, 0.3) == [1, 5, 8]
  assert prep.validation_shards(3, 0, 0.01) == [1]
  with pytest.raises(ValueError, match="too few to hold out 3"):
    prep.validation_shards(3, 3, 0.0)


@pytest.mark.subprocess
def test_cli(tmp_path, capsys):
  texts = docs(50)
  write_jsonl(tmp_path / "x.jsonl", texts)
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "mmfree_jax.data.prepare",
      "--inputs",
      str(tmp_path / "x.jsonl"),
      "--format",
      "jsonl",
      "--tokenizer",
      "byte",
      "--out",
      str(tmp_path / "out"),
      "--shard_tokens",
      "5e2",
      "--record_tokens",
      "64",
      "--val_shards",
      "1",
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  manifest = json.load(open(tmp_path / "out" / "manifest.json"))
  check_output(tmp_path / "out", manifest, texts, shard_tokens=500)
  assert "validation" in proc.stdout
  assert (
    prep.main(
      [
        "--inputs",
        str(tmp_path / "*.parquet"),
        "--format",
        "parquet",
        "--tokenizer",
        "byte",
        "--out",
        str(tmp_path / "o2"),
      ]
    )
    == 1
  )
  assert "error: --inputs glob" in capsys.readouterr().err


# ---------------------------------------------------------------------------- bad input


def test_bad_inputs_fail_before_any_tokenizing(tmp_path, monkeypatch):
  import pyarrow as pa
  import pyarrow.parquet as pq

  monkeypatch.setattr(prepare_encode, "encode_chunk", lambda *a: pytest.fail("tokenized bad input"))
  with pytest.raises(ValueError, match=r"glob '.*\*\.jsonl' matches no files"):
    run(tmp_path, f"{tmp_path}/*.jsonl", "jsonl")
  pq.write_table(pa.table({"content": ["x"]}), tmp_path / "p.parquet")
  with pytest.raises(
    ValueError,
    match=r"p\.parquet' has no column 'text' \(columns: "
    r"\['content'\]\); set --text_field",
  ):
    run(tmp_path, str(tmp_path / "p.parquet"), "parquet")
  pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
  with pytest.raises(ValueError, match="not a string"):
    run(tmp_path, str(tmp_path / "n.parquet"), "parquet")
  (tmp_path / "junk.jsonl.zst").write_bytes(b"this is not zstd at all")
  with pytest.raises(ValueError, match=r"junk\.jsonl\.zst' is not valid zstd"):
    run(tmp_path, str(tmp_path / "junk.jsonl.zst"), "jsonl")
  (tmp_path / "junk.txt.gz").write_bytes(b"plain")
  with pytest.raises(ValueError, match="is not gzip"):
    run(tmp_path, str(tmp_path / "junk.txt.gz"), "text")
  write_jsonl(tmp_path / "f.jsonl", ["a"], field="body")
  with pytest.raises(ValueError, match=r"f\.jsonl:1 has no field 'text'.*--text_field"):
    run(tmp_path, str(tmp_path / "f.jsonl"), "jsonl")
  with pytest.raises(ValueError, match="not a `datasets` save_to_disk folder"):
    run(tmp_path, str(tmp_path), "hf_disk")
  with pytest.raises(ValueError, match="--shard_tokens=10 must be >= --record_tokens=64"):
    run(tmp_path, str(tmp_path / "f.jsonl"), "jsonl", shard_tokens=10)
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("mine")
  write_jsonl(tmp_path / "ok.jsonl", ["fine"])
  with pytest.raises(ValueError, match="not empty and holds no plan.json"):
    run(tmp_path, str(tmp_path / "ok.jsonl"), "jsonl", out="other")


def test_truncated_zst_mid_stream_keeps_committed_shards_only(tmp_path):
  import zstandard

  texts = docs(200)
  write_jsonl(tmp_path / "a.jsonl", texts[:100])
  frames = [
    zstandard.ZstdCompressor().compress(
      "".join(json.dumps({"text": t}) + "\n" for t in part).encode()
    )
    for part in (texts[100:150], texts[150:])
  ]
  # The first frame is whole (the up-front check passes), the second is cut in half.
  (tmp_path / "b.jsonl.zst").write_bytes(frames[0] + frames[1][: len(frames[1]) // 2])
  with pytest.raises(ValueError, match=r"b\.jsonl\.zst' is corrupt or truncated.*rerun"):
    run(tmp_path, f"{tmp_path}/*.jsonl*", "jsonl")
  out = tmp_path / "out"
  assert not os.path.exists(out / "manifest.json")
  assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
  for i in range(len([n for n in os.listdir(out) if n.endswith(".array_record")])):
    meta = json.load(open(out / shards_lib.sidecar_name(i)))  # every shard file is committed
    assert (
      meta["sha256"]
      == hashlib.sha256(open(out / shards_lib.shard_name(i), "rb").read()).hexdigest()
    )


def test_other_settings_in_the_same_out_are_refused(tmp_path):
  write_jsonl(tmp_path / "x.jsonl", docs(20))
  run(tmp_path, str(tmp_path / "x.jsonl"), "jsonl")
  with pytest.raises(ValueError, match=r"other settings \(differing: \['shard_tokens'\]\)"):
    run(tmp_path, str(tmp_path / "x.jsonl"), "jsonl", shard_tokens=400)


# ---------------------------------------------------------------------------- as training data


def array_record_cfg(paths, mixture="", seq_len=15, **kw):
  cfg = base_config().data
  cfg.update(
    source="array_record", paths=paths, mixture=mixture, tokenizer="byte", seq_len=seq_len, seed=0
  )
  cfg.update(kw)
  return cfg


@pytest.mark.parametrize("seq_len", [15, 200])  # inside one record / across several
def test_prepared_windows_are_the_packed_windows_of_the_split_streams(tmp_path, seq_len):
  from mmfree_jax.data.corpus import Runs

  texts = docs(150)
  write_jsonl(tmp_path / "x.jsonl", texts)
  manifest = run(tmp_path, str(tmp_path / "x.jsonl"), "jsonl", val_shards=2)
  groups = expected_shards(texts, 300)
  assert len(groups) == len(manifest["shards"]) >= 6
  for split in ("train", "validation"):
    split_docs = [t for i in manifest["splits"][split] for t in groups[i]]
    expected = stream_of(split_docs)
    np.save(tmp_path / f"{split}.npy", np.asarray(expected, np.int32))
    reference = data.PackedWindows(
      [str(tmp_path / f"{split}.npy")],
      Runs(*(np.array([v]) for v in (0, 0, len(expected))), np.array([False])),
      seq_len=seq_len,
      eos_id=EOS,
      pad_id=BYTE.pad_id,
    )
    prepared = prepared_lib.PreparedWindows(
      prepared_lib.open_prepared(str(tmp_path / "out")),
      split,
      seq_len=seq_len,
      eos_id=EOS,
      pad_id=BYTE.pad_id,
    )
    assert prepared.stream_slice(0, prepared.num_tokens).tolist() == expected
    assert len(prepared) == len(reference) == len(expected) // (seq_len + 1)
    for i in range(len(prepared)):
      for key in ("tokens", "segment_ids"):
        np.testing.assert_array_equal(prepared[i][key], reference[i][key])


def test_mixture_follows_its_weights(tmp_path):
  for tag in "ab":
    # > 1000 windows each: grain's index_shuffle costs ~1 ms per index on 100 windows.
    write_jsonl(tmp_path / f"{tag}.jsonl", [tag * (5 + i % 13) for i in range(800)])
    run(tmp_path, str(tmp_path / f"{tag}.jsonl"), "jsonl", out=tag, shard_tokens=4000)
  cfg = array_record_cfg(f"{tmp_path}/a,{tmp_path}/b", mixture="0.7,0.3", seq_len=7)
  ds = prepared_lib.train_dataset(cfg, BYTE, local_batch=100, process_index=0, process_count=1)
  windows = np.concatenate([ds[s]["tokens"] for s in range(100)])  # 10k windows
  is_a = (windows == ord("a")).any(axis=1)
  is_b = (windows == ord("b")).any(axis=1)
  assert not (is_a & is_b).any() and (is_a | is_b).all()
  assert abs(is_a.mean() - 0.7) < 0.02, is_a.mean()
  # Each component runs through all its windows once per epoch, reshuffled every epoch.
  (a_windows, _), (b_windows, _) = prepared_lib.split_windows(cfg, BYTE, "train")
  n = len(a_windows)
  rows = [tuple(w) for w in windows[is_a]]
  every = sorted(tuple(a_windows[i]["tokens"]) for i in range(n))
  assert sorted(rows[:n]) == every == sorted(rows[n : 2 * n]) and rows[:n] != rows[n : 2 * n]
  # Empty mixture: weights are the folders' train tokens.
  assert prepared_lib.mixture_weights(
    "", prepared_lib.open_sources(array_record_cfg(f"{tmp_path}/a,{tmp_path}/b"))[0]
  ) == [a_windows.num_tokens, b_windows.num_tokens]


@pytest.mark.parametrize(
  "mixture,match",
  [
    ("0,0", "sum to a positive number"),
    ("-1,2", "sum to a positive number"),
    ("1,nan", "finite"),
    ("0.5", "2 folders"),
    ("a,b", "comma-separated numbers"),
  ],
)
def test_bad_mixture_weights(tmp_path, mixture, match):
  write_jsonl(tmp_path / "x.jsonl", docs(10))
  run(tmp_path, str(tmp_path / "x.jsonl"), "jsonl")
  with pytest.raises(ValueError, match=match):
    prepared_lib.open_sources(array_record_cfg(f"{tmp_path}/out,{tmp_path}/out", mixture))


def test_manifest_tokenizer_must_match_the_config(tmp_path):
  write_jsonl(tmp_path / "x.jsonl", docs(10))
  run(tmp_path, str(tmp_path / "x.jsonl"), "jsonl")
  cfg = array_record_cfg(str(tmp_path / "out"))
  prepared, _ = prepared_lib.open_sources(cfg)
  assert prepared_lib.tokenizer_for(cfg, prepared, cache_dir=str(tmp_path)).spec == "byte"
  texts = docs(60)
  tok_json = tmp_path / "tok.json"
  from mmfree_jax.data.tokenizer import train_bpe

  train_bpe(texts, 300).save(str(tok_json))
  cfg.tokenizer = f"hf:{tok_json}"
  with pytest.raises(ValueError, match=r"tokenized with 'byte'.*data\.tokenizer=byte"):
    prepared_lib.tokenizer_for(cfg, prepared, cache_dir=str(tmp_path))
  cfg.tokenizer = "bpe:300"
  with pytest.raises(ValueError, match=r"set --config\.data\.tokenizer=byte"):
    prepared_lib.tokenizer_for(cfg, prepared, cache_dir=str(tmp_path))
  # bpe: trained by prepare is found again from the folder's copy, no corpus needed.
  manifest = run(tmp_path, str(tmp_path / "x.jsonl"), "jsonl", out="bpe", tokenizer="bpe:300")
  assert manifest["tokenizer"]["file"] == "tokenizer.json"
  cfg = array_record_cfg(str(tmp_path / "bpe"), tokenizer="bpe:300")
  tok = prepared_lib.tokenizer_for(
    cfg, prepared_lib.open_sources(cfg)[0], cache_dir=str(tmp_path / "elsewhere")
  )
  assert tok.fingerprint == manifest["tokenizer"]["fingerprint"]
  with pytest.raises(ValueError, match="same one"):
    mixed = array_record_cfg(f"{tmp_path}/bpe,{tmp_path}/out", tokenizer="bpe:300")
    prepared_lib.tokenizer_for(mixed, prepared_lib.open_sources(mixed)[0], cache_dir=str(tmp_path))


def test_incomplete_or_damaged_folders_are_refused(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    prepared_lib.open_prepared(str(tmp_path / "nope"))
  write_jsonl(tmp_path / "x.jsonl", docs(30))
  manifest = run(tmp_path, str(tmp_path / "x.jsonl"), "jsonl")
  with open(tmp_path / "out" / manifest["shards"][1]["path"], "ab") as f:
    f.write(b"x")
  with pytest.raises(ValueError, match="another size than its manifest"):
    prepared_lib.open_prepared(str(tmp_path / "out"))


# ---------------------------------------------------------------------------- pipeline, training


def two_folders(tmp_path):
  """Two prepared folders (multi-shard, one validation shard each), KJV-like and other text."""
  write_jsonl(tmp_path / "a.jsonl", docs(300, "a"))
  write_jsonl(tmp_path / "b.jsonl", [t.upper() for t in docs(200, "b")])
  for tag in "ab":
    run(tmp_path, str(tmp_path / f"{tag}.jsonl"), "jsonl", out=tag, shard_tokens=1500, val_shards=1)
  return f"{tmp_path}/a,{tmp_path}/b"


def test_pipeline_batches_processes_workers_and_validation(tmp_path):
  cfg = array_record_cfg(two_folders(tmp_path), mixture="0.6,0.4", seq_len=31)
  cache = str(tmp_path / "cache")
  tok = data.tokenizer_from_config(cfg, cache_dir=cache)
  assert tok.fingerprint == BYTE.fingerprint
  it = data.train_iterator(cfg, tok, global_batch=8, cache_dir=cache)
  single = [next(it) for _ in range(6)]
  for b in single:
    assert b["tokens"].shape == b["segment_ids"].shape == (8, 32)
  halves = [
    data.train_iterator(cfg, tok, global_batch=8, process_index=p, process_count=2, cache_dir=cache)
    for p in range(2)
  ]
  for s in range(6):
    rows = [next(h) for h in halves]
    for key in ("tokens", "segment_ids"):
      np.testing.assert_array_equal(np.concatenate([r[key] for r in rows]), single[s][key])
  cfg.worker_count = 1  # PreparedWindows travel to a grain worker process
  workers = data.train_iterator(cfg, tok, global_batch=8, cache_dir=cache)
  try:
    for s in range(3):
      np.testing.assert_array_equal(next(workers)["tokens"], single[s]["tokens"])
  finally:
    workers.close()
  # Validation: every row is a stretch of a held-out shard's tokens, from both folders.
  val = data.validation_batches(cfg, tok, batch_size=4, num_batches=3, cache_dir=cache)
  held_out = {}
  for tag in "ab":
    manifest = json.load(open(tmp_path / tag / "manifest.json"))
    (i,) = manifest["splits"]["validation"]
    stream = np.concatenate(read_shard(tmp_path / tag / manifest["shards"][i]["path"]))
    held_out[tag] = "".join(map(chr, stream))
  sources = []
  for b in val:
    assert b["tokens"].shape == (4, 32)
    for row in b["tokens"]:
      text = "".join(map(chr, row))
      sources.append([tag for tag, stream in held_out.items() if text in stream])
  assert all(len(s) == 1 for s in sources)
  assert {s[0] for s in sources} == {"a", "b"}


@pytest.mark.slow
def test_prepare_train_resume_is_exact_on_a_mixture(tmp_path):
  from mmfree_jax.train.trainer import train
  from tests.train_configs import small_config

  overrides = {
    "data.source": "array_record",
    "data.paths": two_folders(tmp_path),
    "data.mixture": "0.6,0.4",
    "train.steps": 6,
    "train.global_batch": 8,
    "train.checkpoint_every": 5,
    "train.eval_every": 6,
    "train.eval_batches": 1,
  }
  full = train(small_config(**overrides), str(tmp_path / "full"), progress=False)
  first = train(
    small_config(**overrides), str(tmp_path / "split"), progress=False, stop_after_steps=4
  )
  second = train(small_config(**overrides), str(tmp_path / "split"), progress=False)
  assert first.interrupted and int(second.state.step) == 6
  assert [r["loss"] for r in first.history + second.history] == [r["loss"] for r in full.history]
  import jax

  jax.tree.map(
    lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
    jax.device_get(second.state.params),
    jax.device_get(full.state.params),
  )
  assert full.eval_history and np.isfinite(full.eval_history[-1]["loss"])
  # eval.py --ppl_split=val scores the same held-out windows as training's validation.
  from mmfree_jax.eval.runner import EvalOptions, evaluate_workdir

  results = evaluate_workdir(
    str(tmp_path / "full"), EvalOptions(ppl_split="val", val_batches=1, batch_size=8)
  )
  val = results["perplexity"]["val"]
  assert val["tokens"] == full.eval_history[-1]["tokens"]
  np.testing.assert_allclose(val["loss"], full.eval_history[-1]["loss"], rtol=1e-5)
  # A config whose tokenizer is not the folders' fails before any compute.
  with pytest.raises(ValueError, match="tokenized with 'byte'"):
    train(
      small_config(**overrides, **{"data.tokenizer": "bpe:300"}),
      str(tmp_path / "other"),
      progress=False,
    )
