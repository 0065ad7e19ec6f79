"""`hf:<tokenizer.json>`: a `tokenizers` tokenizer, encoded with tiktoken where exact.

Encode backends of byte-level BPE (`bpe:` and GPT-2-style `hf:` files). `tokenizers` is the
reference; `tiktoken` encodes the same ids several times faster single-threaded (what
`prepare` runs per process). A tokenizer is encoded with tiktoken only when it is provably
equivalent (`fast_bpe.tiktoken_ranks`); anything else stays on `tokenizers`, and so does
decoding. `MMFREE_TOKENIZER_BACKEND=tokenizers` forces the reference (`tiktoken` demands the
fast path). The fingerprint names the vocabulary, never the backend: both give identical ids
(tests/test_tokenizer_fast.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent import futures

from mmfree_jax import paths
from mmfree_jax.data.tokenizer.base import EOS_TOKEN, PAD_TOKEN, Tokenizer
from mmfree_jax.data.tokenizer.fast_bpe import NotConvertible, tiktoken_core

log = logging.getLogger(__name__)

_HF_EOS = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>")
_HF_BOS = ("<s>", "<|begin_of_text|>", "<bos>")
_HF_PAD = (PAD_TOKEN, "<pad>")
BACKEND_ENV = "MMFREE_TOKENIZER_BACKEND"
# auto: tiktoken where exact, else tokenizers; tiktoken: fail unless exact; tokenizers: always.
BACKENDS = ("auto", "tiktoken", "tokenizers")


class HFTokenizer(Tokenizer):
  """A `tokenizers.Tokenizer` (byte-level BPE we trained, or a user's tokenizer.json).

  Encodes with tiktoken where that gives the same ids (module docstring); `backend` says
  which one runs ("tiktoken" or "tokenizers"), `backend_reason` why tiktoken does not.
  """

  def __init__(self, tok, spec: str, backend: str | None = None):
    self._tok = tok
    # Text spelling a special token stays ordinary text: EOS only comes from encode_document.
    tok.encode_special_tokens = True
    self.spec = spec
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
    self.eos_id = _first_id(tok, _HF_EOS)
    if self.eos_id is None:
      raise ValueError(
        f"tokenizer {spec!r} has none of the end-of-text tokens {_HF_EOS}; "
        "add one to its added_tokens or use another tokenizer"
      )
    bos = _first_id(tok, _HF_BOS)
    self.bos_id = bos if bos != self.eos_id else None
    pad = _first_id(tok, _HF_PAD)
    self.pad_id = self.eos_id if pad is None else pad
    self.fingerprint = "hf-" + hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]
    self._requested = backend or os.environ.get(BACKEND_ENV) or "auto"
    if self._requested not in BACKENDS:
      raise ValueError(
        f"tokenizer backend {self._requested!r} (from {BACKEND_ENV} or the "
        f"backend argument) is not one of {BACKENDS}"
      )
    self._core = None  # the tiktoken encoder, built on first use (decode-only users skip it)
    self._resolved = self._requested == "tokenizers"
    self._reason = f"{BACKEND_ENV}=tokenizers" if self._resolved else None
    if self._requested == "tiktoken":
      self._resolve()  # fails now, naming why, rather than at the first encode

  file_name = "tokenizer.json"

  @property
  def backend(self) -> str:
    """ "tiktoken" or "tokenizers": what `encode` runs."""
    self._resolve()
    return "tokenizers" if self._core is None else "tiktoken"

  @property
  def backend_reason(self) -> str | None:
    """Why encode runs on `tokenizers` (None when it runs on tiktoken)."""
    self._resolve()
    return self._reason

  def _resolve(self) -> None:
    if self._resolved:
      return
    self._resolved = True
    try:
      self._core = tiktoken_core(self._tok, self.fingerprint)
    except NotConvertible as e:
      self._reason = str(e)
      if self._requested == "tiktoken":
        raise ValueError(
          f"tokenizer {self.spec!r} cannot be encoded with tiktoken exactly: "
          f"{e}; unset {BACKEND_ENV} (or set it to auto) to use tokenizers"
        ) from None
      log.info("tokenizer %s encodes with `tokenizers`: %s", self.spec, e)

  def __getstate__(self):  # tiktoken's core does not pickle; a copy rebuilds it on first use
    state = dict(self.__dict__)
    if state["_requested"] != "tokenizers":
      state.update(_core=None, _resolved=False, _reason=None)
    return state

  def save(self, folder: str) -> str:
    """Writes `folder/tokenizer.json` (local or in a bucket, atomically); returns its path."""
    path = paths.join(folder, self.file_name)
    paths.write_atomic(path, self._tok.to_str(pretty=True))
    return path

  def _encode_batch(self, texts):
    self._resolve()
    if self._core is None:
      return self._hf_encode(texts)
    # As many threads as tokenizers' encode_batch would use (RAYON_NUM_THREADS, else every
    # allowed core); tiktoken releases the GIL. A pool per call: nothing to carry over a fork.
    threads = min(
      len(texts), int(os.environ.get("RAYON_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))
    )
    if threads <= 1:
      return [self._encode_one(text) for text in texts]
    with futures.ThreadPoolExecutor(threads) as pool:
      return list(pool.map(self._encode_one, texts))

  def _encode_one(self, text: str) -> list[int]:
    try:
      return self._core.encode_ordinary(text)
    except UnicodeEncodeError:  # lone surrogates: tokenizers' own error, not tiktoken's U+FFFD
      return self._hf_encode([text])[0]

  def _hf_encode(self, texts):
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def _decode(self, ids):
    return self._tok.decode(ids, skip_special_tokens=False)


def _first_id(tok, candidates) -> int | None:
  for token in candidates:
    token_id = tok.token_to_id(token)
    if token_id is not None:
      return token_id
  return None


def load_hf_file(path: str, spec: str) -> HFTokenizer:
  """The `HFTokenizer` of a `tokenizers` JSON file (local, `gs://` or `s3://`); a file
  `tokenizers` cannot read (not JSON, truncated, nested past its recursion limit, another
  schema) is a one-line ValueError naming it."""
  from tokenizers import Tokenizer as HFTok  # pylint: disable=g-import-not-at-top

  data = paths.read_bytes(path)
  try:
    tok = HFTok.from_buffer(data)
  except Exception as e:  # tokenizers raises a bare Exception for every parse error
    reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    raise ValueError(
      f"{path} (from data.tokenizer={spec!r}) is not a tokenizers JSON file ({reason}); "
      "copy a good tokenizer.json from the model's folder (no network needed), or pick a "
      "spec with no file to read (byte, spm:mistral)"
    ) from None
  return HFTokenizer(tok, spec)
