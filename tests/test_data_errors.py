"""Every bad data input fails with a ValueError naming the culprit and the fix."""

import json

import numpy as np
import pytest

from mmfree_jax import data
from mmfree_jax.config import base_config

BYTE = data.load_tokenizer("byte", cache_dir="/nonexistent")


def data_cfg(**overrides):
  cfg = base_config().data
  cfg.update(tokenizer="byte", seq_len=8, val_fraction=0.0)
  cfg.update(overrides)
  return cfg


def batches(cfg, cache_dir, global_batch=2, process_count=1):
  """Builds the tokenizer and pulls one training batch, as training does."""
  tok = data.tokenizer_from_config(cfg, cache_dir=cache_dir)
  it = data.train_iterator(
    cfg, tok, global_batch=global_batch, process_count=process_count, cache_dir=cache_dir
  )
  return next(it)


def test_valid_corpus_works(tmp_path):
  # The control for the cases below: the same helper succeeds on good input.
  (tmp_path / "ok.txt").write_text("hello there\n\nsecond paragraph\n")
  b = batches(data_cfg(source="text", paths=str(tmp_path / "ok.txt")), str(tmp_path))
  assert b["tokens"].shape == (2, 9)


def test_missing_file(tmp_path):
  with pytest.raises(ValueError, match=r"'/nonexistent/corpus\.txt' does not exist.*data\.paths"):
    batches(data_cfg(source="text", paths="/nonexistent/corpus.txt"), str(tmp_path))


def test_missing_file_among_several(tmp_path):
  (tmp_path / "a.txt").write_text("fine")
  with pytest.raises(ValueError, match=r"b\.txt' does not exist"):
    batches(data_cfg(source="text", paths=f"{tmp_path}/a.txt,{tmp_path}/b.txt"), str(tmp_path))


def test_glob_without_matches(tmp_path):
  with pytest.raises(ValueError, match=r"glob '.*\*\.jsonl' matches no files"):
    batches(data_cfg(source="jsonl", paths=f"{tmp_path}/*.jsonl"), str(tmp_path))


def test_empty_file(tmp_path):
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ValueError, match=r"empty\.txt' is empty.*data\.paths"):
    batches(data_cfg(source="text", paths=str(tmp_path / "empty.txt")), str(tmp_path))


def test_blank_text_file_has_no_documents(tmp_path):
  (tmp_path / "blank.txt").write_text("\n  \n\t\n")
  with pytest.raises(ValueError, match=r"blank\.txt' holds no documents"):
    batches(data_cfg(source="text", paths=str(tmp_path / "blank.txt")), str(tmp_path))


def test_empty_paths_for_file_source(tmp_path):
  with pytest.raises(ValueError, match="data.paths is empty"):
    batches(data_cfg(source="jsonl", paths=""), str(tmp_path))


def test_paths_with_builtin_source(tmp_path):
  with pytest.raises(ValueError, match="builtin_kjv ignores it"):
    batches(data_cfg(source="builtin_kjv", paths="x.txt"), str(tmp_path))


def test_unknown_source(tmp_path):
  with pytest.raises(ValueError, match=r"unknown data\.source 'parquet'.*builtin_kjv"):
    batches(data_cfg(source="parquet"), str(tmp_path))


def test_jsonl_missing_field_names_file_and_line(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text(json.dumps({"text": "fine"}) + "\n\n" + json.dumps({"body": "oops"}) + "\n")
  with pytest.raises(
    ValueError,
    match=r"d\.jsonl:3 has no field 'text' \(has \['body'\]\).*"
    r"data\.text_field",
  ):
    batches(data_cfg(source="jsonl", paths=str(path)), str(tmp_path))


def test_jsonl_bad_json_and_non_string(tmp_path):
  (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
  with pytest.raises(ValueError, match=r"bad\.jsonl:2 is not valid JSON"):
    batches(data_cfg(source="jsonl", paths=str(tmp_path / "bad.jsonl")), str(tmp_path))
  (tmp_path / "num.jsonl").write_text('{"text": 5}\n')
  with pytest.raises(ValueError, match=r"num\.jsonl:1: field 'text' is a int"):
    batches(data_cfg(source="jsonl", paths=str(tmp_path / "num.jsonl")), str(tmp_path))


def test_non_utf8_text(tmp_path):
  (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
  with pytest.raises(ValueError, match=r"latin\.txt' is not UTF-8"):
    batches(data_cfg(source="text", paths=str(tmp_path / "latin.txt")), str(tmp_path))


def test_unknown_tokenizer_spec(tmp_path):
  with pytest.raises(
    ValueError,
    match=r"unknown data\.tokenizer spec 'gpt2'.*byte.*bpe:.*hf:"
    r".*spm:",
  ):
    data.load_tokenizer("gpt2", cache_dir=str(tmp_path))
  with pytest.raises(ValueError, match="vocab size must be an int"):
    data.load_tokenizer("bpe:big", corpus_texts=lambda: ["x"], cache_dir=str(tmp_path))
  with pytest.raises(ValueError, match="vocab_size >= 258"):
    data.load_tokenizer("bpe:100", corpus_texts=lambda: ["x"], cache_dir=str(tmp_path))


def test_tokenizer_file_missing(tmp_path):
  with pytest.raises(ValueError, match=r"'/no/tok\.json'.*does not exist.*data\.tokenizer"):
    data.load_tokenizer("hf:/no/tok.json", cache_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r"mistral7b.*does not exist"):
    data.load_tokenizer("spm:mistral7b", cache_dir=str(tmp_path))


def test_bpe_needs_text(tmp_path):
  np.save(tmp_path / "t.npy", np.arange(5, dtype=np.int32))
  with pytest.raises(ValueError, match="bpe:300.*no corpus text.*hf:"):
    batches(
      data_cfg(source="tokens", paths=str(tmp_path / "t.npy"), tokenizer="bpe:300"), str(tmp_path)
    )


def test_bad_token_files(tmp_path):
  np.save(tmp_path / "f.npy", np.ones((2, 3), np.int32))
  with pytest.raises(ValueError, match=r"f\.npy' holds int32 \(2, 3\).*1-D integer"):
    batches(data_cfg(source="tokens", paths=str(tmp_path / "f.npy")), str(tmp_path))
  np.save(tmp_path / "neg.npy", np.array([3, -1, 256], np.int32))
  with pytest.raises(ValueError, match=r"neg\.npy' has ids in \[-1, 256\]"):
    batches(data_cfg(source="tokens", paths=str(tmp_path / "neg.npy")), str(tmp_path))


def test_batch_not_divisible_by_processes(tmp_path):
  (tmp_path / "ok.txt").write_text("hello")
  with pytest.raises(
    ValueError,
    match="global batch 3 is not a positive multiple of the 2 processes.*train.global_batch",
  ):
    batches(
      data_cfg(source="text", paths=str(tmp_path / "ok.txt")),
      str(tmp_path),
      global_batch=3,
      process_count=2,
    )


def test_too_few_documents_for_validation(tmp_path):
  (tmp_path / "one.txt").write_text("a single paragraph")
  with pytest.raises(ValueError, match="1 document.*val_fraction=0"):
    batches(
      data_cfg(source="text", paths=str(tmp_path / "one.txt"), val_fraction=0.1), str(tmp_path)
    )
  with pytest.raises(ValueError, match=r"val_fraction=1.0 must be in \[0, 1\)"):
    batches(
      data_cfg(source="text", paths=str(tmp_path / "one.txt"), val_fraction=1.0), str(tmp_path)
    )


def test_validation_without_split(tmp_path):
  (tmp_path / "ok.txt").write_text("hello")
  cfg = data_cfg(source="text", paths=str(tmp_path / "ok.txt"))
  with pytest.raises(ValueError, match="val_fraction=0 leaves no validation.*eval_batches=0"):
    data.validation_batches(cfg, BYTE, batch_size=2, num_batches=1, cache_dir=str(tmp_path))


def test_bad_seq_len_and_seed(tmp_path):
  (tmp_path / "ok.txt").write_text("hello")
  with pytest.raises(ValueError, match="seq_len=0 must be >= 1"):
    batches(data_cfg(source="text", paths=str(tmp_path / "ok.txt"), seq_len=0), str(tmp_path))
  with pytest.raises(ValueError, match="data.seed=-1"):
    batches(data_cfg(source="text", paths=str(tmp_path / "ok.txt"), seed=-1), str(tmp_path))


def test_vocab_too_small_for_tokenizer():
  with pytest.raises(ValueError, match="tokenizer vocab must fit.*--config.model.vocab_size"):
    data.check_vocab(BYTE, 100)
