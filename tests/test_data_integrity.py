"""Prepared folders that were damaged, edited or left with strangers' files (issue 28 item 3).

Each test damages a folder `prepare` wrote (a flipped bit, a manifest field that lies, a stray
file) and checks the one-line error that names the shard or field and the fix, or that the
damage is survived. Expected shard contents come from the documents with plain Python (the
`byte` tokenizer: utf-8 bytes, EOS 256) and the ArrayRecord reader, never from `prepared.py`.
"""

import json
import os
import shutil
from concurrent import futures

import numpy as np
import pytest
from array_record.python import array_record_module

from mmfree_jax import data
from mmfree_jax.config import base_config
from mmfree_jax.data import prepare as prep
from mmfree_jax.data import prepared as prepared_lib
from mmfree_jax.data import shards as shards_lib

EOS = 256


def docs(n, tag="d"):
  return [f"{tag}{i:03d} " + "abcdefghij"[i % 10] * (3 + 7 * (i % 9)) for i in range(n)]


def write_jsonl(path, texts):
  with open(path, "w") as f:
    for t in texts:
      f.write(json.dumps({"text": t}) + "\n")
  return str(path)


def run(tmp_path, inputs, out="out", **kw):
  kw.setdefault("tokenizer", "byte")
  return prep.prepare(
    prep.PrepareOptions(
      inputs=inputs,
      format="jsonl",
      out=str(tmp_path / out),
      cache_dir=str(tmp_path / "cache"),
      **kw,
    )
  )


def stored_tokens(path):
  reader = array_record_module.ArrayRecordReader(str(path))
  records = reader.read_all()
  reader.close()
  return np.frombuffer(b"".join(records), "<u2").tolist()


def stream_of(texts):
  out = []
  for t in texts:
    out += list(t.encode("utf-8")) + [EOS]
  return out


def cfg_for(folder, **kw):
  cfg = base_config().data
  cfg.update(source="array_record", paths=str(folder), tokenizer="byte", seq_len=15, seed=0)
  cfg.update(kw)
  return cfg


def read_everything(folder, cache):
  """Opens the folder as training does and reads every window of both splits."""
  cfg = cfg_for(folder)
  tok = data.tokenizer_from_config(cfg, cache_dir=cache)
  count = 0
  for split in ("train", "validation"):
    for windows, _ in prepared_lib.split_windows(cfg, tok, split):
      count += sum(1 for i in range(len(windows)) if windows[i]["tokens"].size)
  return count


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
  monkeypatch.setattr(shards_lib, "_VERIFIED", set())  # verdicts of other tests' folders


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """A prepared folder of 4 shards (records of 64 tokens), shard 2 held out."""
  tmp = tmp_path_factory.mktemp("prepared")
  write_jsonl(tmp / "x.jsonl", docs(120))
  run(tmp, str(tmp / "x.jsonl"), shard_tokens=1200, record_tokens=64, val_shards=1)
  return tmp / "out"


def copy_of(folder, tmp_path):
  shutil.copytree(folder, tmp_path / "copy")
  return tmp_path / "copy"


def test_each_shard_is_hashed_once_per_process(folder, tmp_path, monkeypatch):
  calls = []
  real = shards_lib.sha256_file
  monkeypatch.setattr(shards_lib, "sha256_file", lambda p: calls.append(p) or real(p))
  manifest = json.load(open(folder / "manifest.json"))
  assert read_everything(folder, str(tmp_path)) > len(manifest["shards"])
  assert read_everything(folder, str(tmp_path)) > 0
  assert sorted(os.path.basename(p) for p in calls) == sorted(s["path"] for s in manifest["shards"])


def test_threads_reading_at_once_hash_each_shard_once(folder, tmp_path, monkeypatch):
  calls = []
  real = shards_lib.sha256_file
  monkeypatch.setattr(shards_lib, "sha256_file", lambda p: calls.append(p) or real(p))
  cfg = cfg_for(folder)
  tok = data.tokenizer_from_config(cfg, cache_dir=str(tmp_path))
  ((windows, _),) = prepared_lib.split_windows(cfg, tok, "train")
  with futures.ThreadPoolExecutor(8) as pool:
    rows = list(pool.map(lambda i: windows[i * len(windows) // 64]["tokens"], range(64)))
  assert len(rows) == 64
  manifest = json.load(open(folder / "manifest.json"))
  assert sorted(calls) == sorted(
    str(folder / manifest["shards"][i]["path"]) for i in manifest["splits"]["train"]
  )


def test_a_flipped_bit_names_the_shard_and_the_fix(folder, tmp_path):
  bad = copy_of(folder, tmp_path)
  path = bad / shards_lib.shard_name(1)
  raw = bytearray(path.read_bytes())
  raw[len(raw) // 2] ^= 0x10  # same size: only the checksum can tell
  path.write_bytes(bytes(raw))
  with pytest.raises(
    ValueError,
    match=r"shard-00001\.array_record does not match the size "
    r"and sha256 .* rerun its prepare command",
  ):
    read_everything(bad, str(tmp_path))


def test_a_read_error_after_verification_names_the_shard(folder, tmp_path):
  cfg = cfg_for(folder)
  tok = data.tokenizer_from_config(cfg, cache_dir=str(tmp_path))
  ((windows, _),) = prepared_lib.split_windows(cfg, tok, "train")
  assert windows[0]["tokens"].size  # verifies shard 0

  class Broken:  # what riegeli raises for a file damaged after it verified
    def __getitem__(self, index):
      raise RuntimeError("Corrupted Riegeli/records file: block header hash mismatch\nmore")

  windows.source = Broken()
  with pytest.raises(
    ValueError,
    match=r"shard .*shard-00000\.array_record cannot be read "
    r"\(Corrupted Riegeli.*mismatch\); copy the folder again",
  ) as info:
    windows[0]
  assert "\n" not in str(info.value)


def lie_records(m):
  m["shards"][0]["records"] += 1


def lie_tokens(m):  # within the same record count: only reading the file can tell
  m["shards"][0]["tokens"] -= 1


def lie_dtype_int32(m):
  m["dtype"] = "<i4"


def lie_dtype_float(m):
  m["dtype"] = "<f4"


def lie_split_twice(m):
  m["splits"]["validation"].append(m["splits"]["train"][0])


def lie_split_range(m):
  m["splits"]["validation"] = [99]


def lie_tokenizer_fields(m):
  del m["tokenizer"]["fingerprint"]


def lie_eos_out_of_range(m):
  m["tokenizer"]["eos_id"] = 999


def lie_eos_in_range(m):
  m["tokenizer"]["eos_id"] = 3


def lie_shards_not_list(m):
  m["shards"] = {"0": m["shards"][0]}


@pytest.mark.parametrize(
  "lie, match",
  [
    (lie_records, r"shards\[0\]\.records is \d+, but \d+ tokens in records of 64 make \d+"),
    (lie_tokens, r"shard-00000.* holds \d+ records .* the manifest does not describe the file"),
    (lie_dtype_int32, r"shard-00000.* holds \d+ records .* <i4 tokens"),
    (lie_dtype_float, r"dtype is '<f4', not one of"),
    (lie_split_twice, r"splits does not put each shard 0\.\.3 in exactly one"),
    (lie_split_range, r"splits does not put each shard"),
    (lie_tokenizer_fields, r"tokenizer lacks its spec or fingerprint"),
    (lie_eos_out_of_range, r"tokenizer\.eos_id is 999, not an id below vocab_size 258"),
    (lie_eos_in_range, r"records tokenizer ids .*'eos_id': 3.* the manifest was edited"),
    (lie_shards_not_list, r"shards is not a non-empty list"),
  ],
)
def test_manifest_fields_that_lie_are_named(folder, tmp_path, lie, match):
  bad = copy_of(folder, tmp_path)
  manifest = json.load(open(bad / "manifest.json"))
  lie(manifest)
  (bad / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(ValueError, match=match) as info:
    read_everything(bad, str(tmp_path))
  assert "\n" not in str(info.value) and "rerun" in str(info.value)


def test_stray_files_survive_a_resumed_prepare(tmp_path):
  write_jsonl(tmp_path / "x.jsonl", docs(60))
  full = run(tmp_path, str(tmp_path / "x.jsonl"), shard_tokens=300, record_tokens=64)
  out = tmp_path / "out"
  last = len(full["shards"]) - 1
  os.remove(out / shards_lib.sidecar_name(last))  # as if killed before the last commit
  for stray in ("shard-notes.txt", "shard-0001.json", "README.md"):
    (out / stray).write_text("mine")
  again = run(tmp_path, str(tmp_path / "x.jsonl"), shard_tokens=300, record_tokens=64)
  assert again == full
  assert all(
    (out / s).read_text() == "mine" for s in ("shard-notes.txt", "shard-0001.json", "README.md")
  )


def test_prepare_defaults_hold_out_a_shard_that_validation_reads(tmp_path):
  texts = docs(40)
  write_jsonl(tmp_path / "x.jsonl", texts)
  opts = prep.parse_args(
    [
      "--inputs",
      str(tmp_path / "x.jsonl"),
      "--format",
      "jsonl",
      "--tokenizer",
      "byte",
      "--out",
      str(tmp_path / "out"),
    ]
  )
  opts.cache_dir = str(tmp_path / "cache")
  manifest = prep.prepare(opts)  # every other flag at its default: the corpus fits one shard
  assert manifest["splits"] == {"train": [0], "validation": [1]}
  # Cut at the first document whose end reaches 90% of the tokens.
  total = len(stream_of(texts))
  k = next(i for i in range(len(texts)) if len(stream_of(texts[: i + 1])) >= 0.9 * total)
  out = tmp_path / "out"
  assert stored_tokens(out / shards_lib.shard_name(0)) == stream_of(texts[: k + 1])
  assert stored_tokens(out / shards_lib.shard_name(1)) == stream_of(texts[k + 1 :])
  assert [s["documents"] for s in manifest["shards"]] == [k + 1, len(texts) - k - 1]
  # train's defaults (eval_batches > 0) find validation windows in it.
  train_cfg = base_config().train
  assert train_cfg.eval_batches > 0
  cfg = cfg_for(out)
  tok = data.tokenizer_from_config(cfg, cache_dir=str(tmp_path))
  batches = data.validation_batches(
    cfg, tok, batch_size=2, num_batches=train_cfg.eval_batches, cache_dir=str(tmp_path)
  )
  held_out = stream_of(texts[k + 1 :])
  row = batches[0]["tokens"][0].tolist()
  assert row == held_out[: len(row)]


def test_a_split_single_shard_resumes_to_the_same_bytes(tmp_path, monkeypatch):
  write_jsonl(tmp_path / "x.jsonl", docs(40))
  full = run(tmp_path, str(tmp_path / "x.jsonl"), out="full")
  real_commit = shards_lib.ShardWriter.commit

  def crash_on_second(self, *a, **kw):
    if self.index == 1:
      raise KeyboardInterrupt
    return real_commit(self, *a, **kw)

  monkeypatch.setattr(shards_lib.ShardWriter, "commit", crash_on_second)
  with pytest.raises(KeyboardInterrupt):
    run(tmp_path, str(tmp_path / "x.jsonl"), out="part")
  monkeypatch.setattr(shards_lib.ShardWriter, "commit", real_commit)
  assert run(tmp_path, str(tmp_path / "x.jsonl"), out="part") == full
  for i in range(2):
    name = shards_lib.shard_name(i)
    assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()


def test_one_document_holds_nothing_out_by_default(tmp_path, caplog):
  write_jsonl(tmp_path / "x.jsonl", ["just one document"])
  manifest = run(tmp_path, str(tmp_path / "x.jsonl"))
  assert manifest["splits"] == {"train": [0], "validation": []}
  assert "eval_batches=0" in caplog.text
