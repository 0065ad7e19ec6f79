"""When (and how) tiktoken encodes a byte-level BPE `tokenizers` tokenizer with the same ids.

A tokenizer is encoded with tiktoken only when it is provably equivalent (`tiktoken_ranks`:
ByteLevel GPT-2 regex, no normalizer, a plain BPE whose merge order follows the token ids,
every vocabulary token reachable the way tiktoken reaches it).
"""

from __future__ import annotations

import functools
import json

# The GPT-2 split regex of the `tokenizers` ByteLevel pre-tokenizer (use_regex=True), verbatim.
BYTELEVEL_PATTERN = (
  r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
  r"|\s+"
)


class NotConvertible(ValueError):
  """A `tokenizers` tokenizer whose ids tiktoken would not reproduce exactly (says why)."""


@functools.lru_cache(maxsize=1)
def bytelevel_alphabet() -> dict[str, int]:
  """GPT-2's byte-level alphabet: the printable character standing for each byte, -> byte."""
  printable = [
    *range(ord("!"), ord("~") + 1),
    *range(ord("¡"), ord("¬") + 1),
    *range(ord("®"), ord("ÿ") + 1),
  ]
  chars, n = {}, 0
  for b in range(256):
    if b in printable:
      chars[chr(b)] = b
    else:
      chars[chr(256 + n)] = b
      n += 1
  return chars


@functools.lru_cache(maxsize=1)
def _to_latin1() -> dict[int, str]:
  # str.translate table: alphabet character -> the latin-1 character of its byte; any other
  # character below 256 -> U+FFFF, so that only byte-level strings encode as latin-1.
  table = {c: "\uffff" for c in range(256)}
  table.update({ord(c): chr(b) for c, b in bytelevel_alphabet().items()})
  return table


def bytelevel_bytes(text: str) -> bytes | None:
  """The bytes a byte-level token string stands for; None if it is not byte-level."""
  try:
    return text.translate(_to_latin1()).encode("latin-1")
  except UnicodeEncodeError:
    return None


_POST_PROCESSORS = ("ByteLevel", "TemplateProcessing", "RobertaProcessing", "BertProcessing")


def _check_structure(cfg: dict) -> None:
  """Raises NotConvertible unless the pipeline is GPT-2's: ByteLevel regex split, plain BPE."""

  def need(ok, why):
    if not ok:
      raise NotConvertible(why)

  need(
    cfg.get("normalizer") is None,
    f"it has a normalizer ({(cfg.get('normalizer') or {}).get('type')})",
  )
  pre = cfg.get("pre_tokenizer") or {}
  if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
    pre = pre["pretokenizers"][0]
  need(
    pre.get("type") == "ByteLevel"
    and pre.get("use_regex", True)
    and not pre.get("add_prefix_space", False),
    f"its pre-tokenizer is not ByteLevel(use_regex=True, add_prefix_space=False): {pre}",
  )
  post = cfg.get("post_processor") or {"type": "Sequence", "processors": []}
  posts = post.get("processors", []) if post.get("type") == "Sequence" else [post]
  need(
    all(p.get("type") in _POST_PROCESSORS for p in posts),
    f"unknown post-processor {post.get('type')}",
  )
  need(
    cfg.get("truncation") is None and cfg.get("padding") is None, "it truncates or pads encodings"
  )
  model = cfg.get("model") or {}
  need(model.get("type") == "BPE", f"its model is {model.get('type')}, not BPE")
  for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
    need(not model.get(key), f"its BPE sets {key}={model.get(key)!r}")
  for key in ("byte_fallback", "ignore_merges"):
    need(not model.get(key), f"its BPE sets {key}")
  # Added tokens are skipped by encode only when special (encode_special_tokens); a
  # non-special one is still cut out of the text, which tiktoken would not do.
  plain = [t["content"] for t in cfg.get("added_tokens", []) if not t.get("special")]
  need(not plain, f"it has non-special added tokens {plain[:3]} (matched inside text)")


def tiktoken_ranks(tok) -> dict[bytes, int]:
  """tiktoken's `mergeable_ranks` for a byte-level BPE `tokenizers.Tokenizer` (rank = id).

  Exact (same ids as `tok.encode` on every text, given the same regex splits) when, as
  checked here, the merges' result ids increase with merge priority (tiktoken ranks pairs by
  the id of their concatenation). Only R, the tokens that BPE of their own bytes gives back
  whole (`tok.model.tokenize`), enter the ranks: a token formed anywhere is formed by the same
  merges as alone (merges inside its span compete only with each other), so nothing outside R
  is ever formed, and tiktoken's shortcut (a piece found in the ranks is returned whole) agrees.
  Merging any adjacent pair whose concatenation is in R is also what `tokenizers` does: if x
  and y are ever adjacent with x + y = t in R, BPE of t alone passes through [x, y] (same
  merges) and ends at [t], so (x, y) is t's merge (unique: the ids increase strictly).
  Trained BPEs (ours, GPT-2) pass. Raises NotConvertible naming the first violation.
  """
  cfg = json.loads(tok.to_str())
  _check_structure(cfg)
  model = cfg["model"]
  vocab: dict[str, int] = model["vocab"]
  alphabet = bytelevel_alphabet()
  missing = [c for c in alphabet if c not in vocab]
  if missing:
    raise NotConvertible(f"its vocabulary lacks {len(missing)} of the 256 byte symbols")
  reachable: dict[str, tuple[bytes, int]] = {}
  for text, token_id in vocab.items():
    raw = bytelevel_bytes(text)
    if raw is not None:
      got = tok.model.tokenize(text)
      if len(got) == 1 and got[0].id == token_id:
        reachable[text] = raw, token_id
  last = -1
  for merge in model["merges"]:
    left, right = merge.split(" ") if isinstance(merge, str) else merge
    if left + right not in reachable:
      continue  # never applied: its result is never formed
    token_id = reachable[left + right][1]
    if token_id <= last:
      raise NotConvertible(
        f"merge {left!r} + {right!r} -> id {token_id} comes after a merge "
        f"giving id {last}: merge priority does not follow the ids"
      )
    last = token_id
  return dict(reachable.values())


def tiktoken_core(tok, name: str):
  """A `tiktoken.Encoding` equal to `tok`'s encoder (see tiktoken_ranks), or NotConvertible."""
  try:
    import tiktoken  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError:
    raise NotConvertible("tiktoken is not installed (`pip install tiktoken`)") from None
  ranks = tiktoken_ranks(tok)
  encoding = tiktoken.Encoding(
    f"mmfree-{name}", pat_str=BYTELEVEL_PATTERN, mergeable_ranks=ranks, special_tokens={}
  )
  # The core itself: Encoding.encode_ordinary turns lone surrogates into U+FFFD, where
  # tokenizers refuses the text; _encode_batch hands those texts to tokenizers.
  core = getattr(encoding, "_core_bpe", None)
  if core is None:
    raise NotConvertible(f"tiktoken {tiktoken.__version__} has no Encoding._core_bpe")
  return core
