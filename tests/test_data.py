"""The data pipeline: tokenizers, sources, caching, packing, split, grain iterators.

Expected streams and segment ids are re-derived here with plain Python loops over the
documents' bytes (the `byte` tokenizer makes the ids obvious), never with the library code.
Bad-input errors live in test_data_errors.py.
"""

import json
import os

import grain
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmfree_jax import data
from mmfree_jax.config import base_config
from mmfree_jax.data import corpus as corpus_lib
from mmfree_jax.data import split as split_lib
from mmfree_jax.data import tokenizer as tok_lib

EOS = 256  # the byte tokenizer's eos id
BYTE = data.load_tokenizer("byte", cache_dir="/nonexistent")


def data_cfg(**overrides):
  cfg = base_config().data
  cfg.update(tokenizer="byte", seq_len=15, val_fraction=0.0, seed=0)
  cfg.update(overrides)
  return cfg


def write_jsonl(path, texts, field="text"):
  with open(path, "w") as f:
    for t in texts:
      f.write(json.dumps({field: t, "id": 0}) + "\n")
  return str(path)


def doc_texts(n=40):
  return [f"doc {i:02d}: " + "abcdefghij"[i % 10] * (5 + 3 * (i % 7)) for i in range(n)]


def stream_of(texts):
  """Byte-tokenizer stream of documents: utf-8 bytes, then EOS, per document."""
  out = []
  for t in texts:
    out += list(t.encode("utf-8")) + [EOS]
  return out


def loop_segment_ids(tokens, num_valid, eos=EOS):
  """Independent segment ids: start at 1, +1 after each EOS, 0 on padding."""
  out, seg = [], 1
  for t, tok in enumerate(tokens):
    out.append(seg if t < num_valid else 0)
    if tok == eos:
      seg += 1
  return out


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.fixture(scope="module")
def kjv_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("kjv_cache"))


@pytest.fixture(scope="module")
def kjv_bpe(kjv_cache):
  cfg = data_cfg(source="builtin_kjv", tokenizer="bpe:512")
  return data.tokenizer_from_config(cfg, cache_dir=kjv_cache)


@pytest.fixture
def small_corpus(tmp_path):
  texts = doc_texts()
  return write_jsonl(tmp_path / "docs.jsonl", texts), texts


# ---------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_ids_and_specials():
  assert (BYTE.vocab_size, BYTE.eos_id, BYTE.pad_id, BYTE.bos_id) == (258, 256, 257, None)
  assert BYTE.encode("hé") == [104, 195, 169]
  assert BYTE.encode_document("hé") == [104, 195, 169, EOS]
  assert BYTE.decode([104, 195, 169, EOS, 105]) == "hé<|endoftext|>i"
  assert BYTE.decode([104, 300, 105]) == "hi"  # ids past the tokenizer's vocab are skipped
  assert BYTE.encode("<|endoftext|>") == list(b"<|endoftext|>")  # text never becomes EOS


def test_bpe_on_kjv_trains_caches_and_round_trips(kjv_bpe, kjv_cache, monkeypatch):
  assert kjv_bpe.vocab_size == 512 and kjv_bpe.bos_id is None
  assert kjv_bpe.decode([kjv_bpe.eos_id]) == "<|endoftext|>"
  cached = [p for p in os.listdir(os.path.join(kjv_cache, "tokenizers")) if p.endswith(".json")]
  assert len(cached) == 1
  # The second load reads the cache: training again would fail here.
  monkeypatch.setattr(tok_lib, "train_bpe", lambda *a: pytest.fail("retrained the BPE"))
  again = data.tokenizer_from_config(
    data_cfg(source="builtin_kjv", tokenizer="bpe:512"), cache_dir=kjv_cache
  )
  assert again.fingerprint == kjv_bpe.fingerprint
  text = "In the beginning God created the heaven and the earth.\nAnd the earth was"
  ids = kjv_bpe.encode(text)
  assert len(ids) < len(text) / 2  # it learned English merges
  assert kjv_bpe.decode(ids) == text
  # hf: loads the same JSON file and gives the same ids.
  hf = data.load_tokenizer(
    "hf:" + os.path.join(kjv_cache, "tokenizers", cached[0]), cache_dir=kjv_cache
  )
  assert hf.encode(text) == ids and hf.eos_id == kjv_bpe.eos_id


def test_bpe_texts_digest_keys_cache(tmp_path):
  texts = ["one two three", "four five six"] * 20
  tok = data.load_tokenizer("bpe:300", corpus_texts=lambda: texts, cache_dir=str(tmp_path))
  other = data.load_tokenizer(
    "bpe:300", corpus_texts=lambda: texts + ["zzz qqq"], cache_dir=str(tmp_path)
  )
  assert len(os.listdir(tmp_path / "tokenizers")) == 2  # a different corpus, another cache
  assert tok.decode(tok.encode("four two")) == "four two"
  assert other.vocab_size <= 300


@settings(max_examples=40, deadline=None)
@given(text=st.text(max_size=200))
def test_bpe_round_trips_any_unicode(kjv_bpe, text):
  ids = kjv_bpe.encode(text)
  assert all(0 <= i < kjv_bpe.vocab_size for i in ids)
  assert kjv_bpe.decode(ids) == text


def test_sentencepiece_tokenizer(tmp_path):
  import sentencepiece as spm

  model = tmp_path / "sp.model"
  with open(model, "wb") as f:
    spm.SentencePieceTrainer.train(
      sentence_iterator=iter(doc_texts() * 5),
      model_writer=f,
      vocab_size=40,
      bos_id=1,
      eos_id=2,
      unk_id=0,
      pad_id=-1,
    )
  tok = data.load_tokenizer(f"spm:{model}", cache_dir=str(tmp_path))
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (40, 1, 2, 2)
  ids = tok.encode("doc 12: ccc")
  assert tok.encode_document("doc 12: ccc") == [1] + ids + [2]
  assert tok.decode(ids) == "doc 12: ccc"


def test_check_vocab():
  data.check_vocab(BYTE, 258)
  with pytest.raises(ValueError, match="--config.model.vocab_size=258"):
    data.check_vocab(BYTE, 257)


# ---------------------------------------------------------------------------- sources


def test_kjv_is_one_document_per_chapter():
  source = data.source_from_config(data_cfg(source="builtin_kjv"))
  docs = list(source.documents())
  assert len(docs) == 1189  # chapters of the KJV
  assert docs[0].startswith("In the beginning God created the heaven and the earth.\n")
  assert docs[0].count("\n") == 30  # Genesis 1 has 31 verses


def test_text_source_splits_paragraphs(tmp_path):
  (tmp_path / "a.txt").write_text("first line\nsecond line\n\n  \n\nthird\n")
  (tmp_path / "b.txt").write_text("\n\nlast one")
  cfg = data_cfg(source="text", paths=f"{tmp_path}/a.txt, {tmp_path}/b*.txt")
  assert list(data.source_from_config(cfg).documents()) == [
    "first line\nsecond line",
    "third",
    "last one",
  ]


def test_jsonl_source_reads_field(tmp_path):
  path = write_jsonl(tmp_path / "x.jsonl", ["α", "", "β γ"], field="body")
  docs = list(
    data.source_from_config(data_cfg(source="jsonl", paths=path, text_field="body")).documents()
  )
  assert docs == ["α", "β γ"]  # empty strings are skipped


# ---------------------------------------------------------------------------- corpus, packing


def test_tokenize_once_then_memory_map(small_corpus, tmp_path, monkeypatch):
  path, texts = small_corpus
  cfg = data_cfg(source="jsonl", paths=path)
  source = data.source_from_config(cfg)
  corpus = corpus_lib.load_corpus(source, BYTE, str(tmp_path / "c"))
  tokens = np.load(corpus.shard_paths[0], mmap_mode="r")
  assert isinstance(tokens, np.memmap) and tokens.dtype == np.int32
  assert tokens.tolist() == stream_of(texts)
  assert corpus.num_documents == len(texts)
  monkeypatch.setattr(
    corpus_lib, "tokenize_to_cache", lambda *a: pytest.fail("tokenized a cached corpus again")
  )
  corpus_lib.load_corpus(data.source_from_config(cfg), BYTE, str(tmp_path / "c"))
  # An edited file has a new identity and is tokenized again.
  monkeypatch.undo()
  write_jsonl(path, texts[:5])
  again = corpus_lib.load_corpus(data.source_from_config(cfg), BYTE, str(tmp_path / "c"))
  assert np.load(again.shard_paths[0]).tolist() == stream_of(texts[:5])


def test_segment_ids_for_matches_loop():
  rng = np.random.default_rng(0)
  for _ in range(20):
    tokens = rng.choice([EOS, 1, 2, 3], size=17, p=[0.3, 0.3, 0.2, 0.2])
    valid = int(rng.integers(1, 18))
    assert data.segment_ids_for(tokens, EOS, valid).tolist() == loop_segment_ids(tokens, valid)


@pytest.mark.parametrize("val_fraction", [0.0, 0.2])
def test_windows_reassemble_the_split_streams(small_corpus, tmp_path, val_fraction):
  path, texts = small_corpus
  cfg = data_cfg(source="jsonl", paths=path, val_fraction=val_fraction, seq_len=15)
  train, val = data.split_windows(cfg, BYTE, cache_dir=str(tmp_path))
  seen = []
  for windows in [w for w in (train, val) if w is not None]:
    full = windows.stream_slice(0, windows.num_tokens).tolist()
    # The split's stream is whole documents, in corpus order.
    docs = BYTE.decode(full).split("<|endoftext|>")
    assert docs[-1] == ""
    docs = docs[:-1]
    assert docs == [t for t in texts if t in docs]
    assert full == stream_of(docs)
    seen.append(docs)
    assert len(windows) == len(full) // 16
    for i in range(len(windows)):
      w = windows[i]
      assert w["tokens"].dtype == np.int32 and w["segment_ids"].dtype == np.int32
      assert w["tokens"].shape == w["segment_ids"].shape == (16,)
      assert w["tokens"].tolist() == full[16 * i : 16 * (i + 1)]
      assert w["segment_ids"].tolist() == loop_segment_ids(w["tokens"], 16)
  if val_fraction:
    train_docs, val_docs = seen
    assert not set(train_docs) & set(val_docs)
    assert sorted(train_docs + val_docs) == sorted(texts)
    assert len(val_docs) == round(0.2 * len(texts))
  else:
    assert val is None and seen[0] == texts


def test_short_corpus_is_one_padded_window(tmp_path):
  path = write_jsonl(tmp_path / "s.jsonl", ["ab", "c"])
  train, _ = data.split_windows(
    data_cfg(source="jsonl", paths=path, seq_len=9), BYTE, cache_dir=str(tmp_path)
  )
  assert len(train) == 1
  w = train[0]
  assert w["tokens"].tolist() == [97, 98, EOS, 99, EOS] + [BYTE.pad_id] * 5
  assert w["segment_ids"].tolist() == [1, 1, 1, 2, 2, 0, 0, 0, 0, 0]


def test_token_files_source(tmp_path):
  np.save(tmp_path / "a.npy", np.array([5, 6, EOS, 7, EOS], np.uint16))
  np.save(tmp_path / "b.npy", np.array([8, 9, EOS, 10, 11], np.int64))  # no final EOS
  np.save(tmp_path / "c.npy", np.array([12, EOS], np.int32))
  cfg = data_cfg(source="tokens", paths=f"{tmp_path}/*.npy", seq_len=3)
  train, _ = data.split_windows(cfg, BYTE, cache_dir=str(tmp_path / "cache"))
  expected = [5, 6, EOS, 7, EOS, 8, 9, EOS, 10, 11, EOS, 12, EOS]  # a virtual EOS ends b.npy
  assert train.stream_slice(0, train.num_tokens).tolist() == expected
  assert [train[i]["tokens"].tolist() for i in range(len(train))] == [
    expected[0:4],
    expected[4:8],
    expected[8:12],
  ]
  assert train[2]["segment_ids"].tolist() == [1, 1, 1, 2]
  with pytest.raises(ValueError, match=r"b\.npy.*\[8, 300\].*data\.tokenizer"):
    np.save(tmp_path / "b.npy", np.array([8, 300, EOS], np.int64))
    data.split_windows(cfg, BYTE, cache_dir=str(tmp_path / "cache"))


# ---------------------------------------------------------------------------- split


def test_split_is_deterministic_and_nonempty():
  a = split_lib.split_documents(100, 0.1, seed=3)
  b = split_lib.split_documents(100, 0.1, seed=3)
  c = split_lib.split_documents(100, 0.1, seed=4)
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[1], c[1])
  assert len(a[1]) == 10 and not set(a[0]) & set(a[1]) and len(a[0]) + len(a[1]) == 100
  assert len(split_lib.split_documents(100, 0.001, seed=0)[1]) == 1  # at least one
  assert len(split_lib.split_documents(2, 0.9, seed=0)[0]) == 1  # at least one to train
  assert len(split_lib.split_documents(5, 0.0, seed=0)[1]) == 0


# ---------------------------------------------------------------------------- iterators


def all_windows(cfg, cache_dir):
  train, _ = data.split_windows(cfg, BYTE, cache_dir=cache_dir)
  return [tuple(train[i]["tokens"].tolist()) for i in range(len(train))]


def test_train_batches_shape_determinism_and_epochs(small_corpus, tmp_path):
  path, texts = small_corpus
  cfg = data_cfg(source="jsonl", paths=path)
  cache = str(tmp_path / "c")
  windows = all_windows(cfg, cache)
  n = len(windows)
  assert n == len(stream_of(texts)) // 16
  steps = -(-2 * n // 8)  # two epochs (the stream of samples runs on across epochs)
  batches = take(data.train_iterator(cfg, BYTE, global_batch=8, cache_dir=cache), steps)
  for b in batches:
    assert b["tokens"].shape == b["segment_ids"].shape == (8, 16)
    assert b["tokens"].dtype == b["segment_ids"].dtype == np.int32
  rows = [tuple(r) for b in batches for r in b["tokens"].tolist()]
  epoch0, epoch1 = rows[:n], rows[n : 2 * n]
  assert sorted(epoch0) == sorted(windows) == sorted(epoch1)  # each epoch: every window once
  assert epoch0 != epoch1 and epoch0 != windows  # shuffled, and reshuffled per epoch
  same = take(data.train_iterator(cfg, BYTE, global_batch=8, cache_dir=cache), steps)
  assert_batches_equal(batches, same)
  cfg.seed = 1
  other = take(data.train_iterator(cfg, BYTE, global_batch=8, cache_dir=cache), 2)
  assert not np.array_equal(other[0]["tokens"], batches[0]["tokens"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_rows_concatenate_to_the_global_batch(small_corpus, tmp_path, process_count):
  path, _ = small_corpus
  cfg = data_cfg(source="jsonl", paths=path, val_fraction=0.1)
  cache = str(tmp_path / "c")
  steps = 15  # crosses an epoch boundary (about 50 train windows, 8 per step)
  single = take(data.train_iterator(cfg, BYTE, global_batch=8, cache_dir=cache), steps)
  local = [
    take(
      data.train_iterator(
        cfg, BYTE, global_batch=8, process_index=p, process_count=process_count, cache_dir=cache
      ),
      steps,
    )
    for p in range(process_count)
  ]
  for s in range(steps):
    for key in ("tokens", "segment_ids"):
      assert local[0][s][key].shape == (8 // process_count, 16)
      np.testing.assert_array_equal(
        np.concatenate([local[p][s][key] for p in range(process_count)]), single[s][key]
      )
  val_single = data.validation_batches(cfg, BYTE, batch_size=8, num_batches=3, cache_dir=cache)
  val_local = [
    data.validation_batches(
      cfg,
      BYTE,
      batch_size=8,
      num_batches=3,
      process_index=p,
      process_count=process_count,
      cache_dir=cache,
    )
    for p in range(process_count)
  ]
  for b in range(3):
    np.testing.assert_array_equal(
      np.concatenate([val_local[p][b]["tokens"] for p in range(process_count)]),
      val_single[b]["tokens"],
    )


def test_validation_batches_are_validation_windows(small_corpus, tmp_path):
  path, _ = small_corpus
  cfg = data_cfg(source="jsonl", paths=path, val_fraction=0.2)
  cache = str(tmp_path / "c")
  _, val = data.split_windows(cfg, BYTE, cache_dir=cache)
  batches = data.validation_batches(cfg, BYTE, batch_size=4, num_batches=5, cache_dir=cache)
  assert len(batches) == 5 and batches[0]["tokens"].shape == (4, 16)
  rows = [r for b in batches for r in b["tokens"].tolist()]
  assert rows == [val[i % len(val)]["tokens"].tolist() for i in range(20)]  # wraps around
  again = data.validation_batches(cfg, BYTE, batch_size=4, num_batches=5, cache_dir=cache)
  assert_batches_equal(batches, again)
  train_rows = set(all_windows(cfg, cache))
  assert not train_rows & {tuple(r) for r in rows}


def test_iterator_state_resumes(small_corpus, tmp_path):
  path, _ = small_corpus
  cfg = data_cfg(source="jsonl", paths=path)
  cache = str(tmp_path / "c")
  it = data.train_iterator(cfg, BYTE, global_batch=4, cache_dir=cache)
  take(it, 5)
  state = it.get_state()
  expected = take(it, 4)
  fresh = data.train_iterator(cfg, BYTE, global_batch=4, cache_dir=cache)
  assert not np.array_equal(next(fresh)["tokens"], expected[0]["tokens"])
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 4), expected)


def test_iterator_checkpoints_with_orbax(small_corpus, tmp_path):
  import orbax.checkpoint as ocp

  path, _ = small_corpus
  cfg = data_cfg(source="jsonl", paths=path)
  cache = str(tmp_path / "c")
  it = data.train_iterator(cfg, BYTE, global_batch=4, cache_dir=cache)
  take(it, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as mngr:
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = take(it, 3)
    restored = data.train_iterator(cfg, BYTE, global_batch=4, cache_dir=cache)
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert_batches_equal(take(restored, 3), expected)


def test_worker_processes_give_the_same_batches(small_corpus, tmp_path):
  path, _ = small_corpus
  cfg = data_cfg(source="jsonl", paths=path)
  cache = str(tmp_path / "c")
  expected = take(data.train_iterator(cfg, BYTE, global_batch=4, cache_dir=cache), 6)
  cfg.worker_count = 1  # one worker process: the same code path as many, half the start-up
  it = data.train_iterator(cfg, BYTE, global_batch=4, cache_dir=cache)
  try:
    assert_batches_equal(take(it, 3), expected[:3])
    state = it.get_state()
    take(it, 2)
    it.set_state(state)
    assert_batches_equal(take(it, 3), expected[3:])
  finally:
    it.close()


def test_kjv_bpe_batches(kjv_bpe, kjv_cache):
  cfg = data_cfg(source="builtin_kjv", tokenizer="bpe:512", seq_len=64, val_fraction=0.02)
  batch = next(data.train_iterator(cfg, kjv_bpe, global_batch=4, cache_dir=kjv_cache))
  assert batch["tokens"].shape == (4, 65)
  assert batch["tokens"].max() < 512 and batch["tokens"].min() >= 0
  (val,) = data.validation_batches(cfg, kjv_bpe, batch_size=4, num_batches=1, cache_dir=kjv_cache)
  text = kjv_bpe.decode(val["tokens"][0])
  assert len(text) > 100 and "\n" in text  # verses of a chapter are separated by newlines
  for tokens, segments in zip(batch["tokens"], batch["segment_ids"]):
    assert segments.tolist() == loop_segment_ids(tokens.tolist(), 65, kjv_bpe.eos_id)


# ---------------------------------------------------------------------------- property


texts_strategy = st.lists(
  st.one_of(
    st.text(max_size=40),
    st.text(alphabet="\n \t", max_size=5),
    st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=8), st.integers(50, 400)),
  ),  # very long documents
  min_size=1,
  max_size=8,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
  texts=texts_strategy,
  seq_len=st.integers(1, 40),
  global_batch=st.sampled_from([1, 2, 4]),
  val_fraction=st.sampled_from([0.0, 0.3]),
  use_bpe=st.booleans(),
)
def test_batches_always_well_formed(
  tmp_path_factory, kjv_bpe, texts, seq_len, global_batch, val_fraction, use_bpe
):
  tmp = tmp_path_factory.mktemp("prop")
  tok = kjv_bpe if use_bpe else BYTE
  cfg = data_cfg(
    source="jsonl",
    paths=write_jsonl(tmp / "p.jsonl", texts),
    seq_len=seq_len,
    val_fraction=val_fraction,
  )
  num_docs = sum(1 for t in texts if t)
  if num_docs == 0 or (val_fraction and num_docs < 2):
    with pytest.raises(ValueError, match="no documents|too few"):
      data.train_iterator(cfg, tok, global_batch=global_batch, cache_dir=str(tmp))
    return
  batches = take(data.train_iterator(cfg, tok, global_batch=global_batch, cache_dir=str(tmp)), 3)
  if val_fraction:
    batches += data.validation_batches(
      cfg, tok, batch_size=global_batch, num_batches=2, cache_dir=str(tmp)
    )
  for b in batches:
    assert b["tokens"].shape == b["segment_ids"].shape == (global_batch, seq_len + 1)
    assert b["tokens"].dtype == b["segment_ids"].dtype == np.int32
    assert b["tokens"].min() >= 0 and b["tokens"].max() < tok.vocab_size
    valid = b["segment_ids"] > 0
    assert valid[:, 0].all()  # padding only at the end of a window
    assert (np.diff(b["segment_ids"], axis=1)[valid[:, 1:]] >= 0).all()
    assert (b["tokens"][~valid] == tok.pad_id).all()
