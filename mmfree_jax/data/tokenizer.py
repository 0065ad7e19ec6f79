"""Tokenizers behind one small interface: byte, byte-level BPE (trained and cached), HF, spm.

Spec strings (`data.tokenizer`):
  `byte`            256 byte ids, then `<|endoftext|>` (eos, 256) and `<|pad|>` (pad, 257).
  `bpe:<vocab>`     byte-level BPE trained with `tokenizers` on the corpus, cached as JSON.
  `hf:<path>`       a `tokenizers` JSON file (`tokenizer.json`, or a folder holding one).
  `spm:<path>`      a sentencepiece model (`tokenizer.model`, or a folder holding one).

`encode` never adds special tokens and never turns text into them (a literal
`<|endoftext|>` in a document is encoded as ordinary text), so an EOS id in a token stream
always marks a real document end. `encode_document` adds them: `[bos] + encode(text) + [eos]`
(bos only where the tokenizer has one: sentencepiece, some HF files).

Encode backends of byte-level BPE (`bpe:` and GPT-2-style `hf:` files). `tokenizers` is the
reference; `tiktoken` encodes the same ids several times faster single-threaded (what
`prepare` runs per process). A tokenizer is encoded with tiktoken only when it is provably
equivalent (`tiktoken_ranks`: ByteLevel GPT-2 regex, no normalizer, a plain BPE whose merge
order follows the token ids, every vocabulary token reachable the way tiktoken reaches it);
anything else stays on `tokenizers`, and so does decoding. `MMFREE_TOKENIZER_BACKEND=tokenizers`
forces the reference (`tiktoken` demands the fast path). The fingerprint names the vocabulary,
never the backend: both give identical ids (tests/test_tokenizer_fast.py).
"""

from __future__ import annotations

from concurrent import futures
import functools
import hashlib
import importlib.resources
import json
import logging
import os
from typing import Callable, Iterable, Sequence

log = logging.getLogger(__name__)

SPEC_FORMS = ("byte", "bpe:<vocab_size>", "hf:<path/to/tokenizer.json>", "spm:<path/to/model>",
              "spm:mistral")
# The tokenizer of the released MMfreeLM checkpoints (Mistral-7B-v0.1, 32000 pieces), from the
# copy inside the mistral_common package.
MISTRAL_ALIAS = "spm:mistral"


def mistral_tokenizer_path() -> str:
  """Path of the Mistral-7B-v0.1 sentencepiece model shipped by mistral_common.

  Raises FileNotFoundError naming the fix when mistral_common is not installed.
  """
  try:
    path = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
  except ModuleNotFoundError:
    raise FileNotFoundError(
        "the Mistral tokenizer comes from the mistral_common package, which is not installed: "
        "`pip install --no-deps mistral_common` (only its data file is used), or pass a "
        "tokenizer.model path with spm:<path>") from None
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing from the installed mistral_common; reinstall "
                            "it (`pip install --no-deps --force-reinstall mistral_common`)")
  return str(path)
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
BPE_FORMAT = "bytelevel-bpe-v1"  # bump when the trainer setup changes (invalidates caches)
BPE_TRAIN_MAX_CHARS = 200_000_000  # BPE learns from at most this much text (the corpus head)
_HF_EOS = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>")
_HF_BOS = ("<s>", "<|begin_of_text|>", "<bos>")
_HF_PAD = (PAD_TOKEN, "<pad>")
BACKEND_ENV = "MMFREE_TOKENIZER_BACKEND"
# auto: tiktoken where exact, else tokenizers; tiktoken: fail unless exact; tokenizers: always.
BACKENDS = ("auto", "tiktoken", "tokenizers")
# The GPT-2 split regex of the `tokenizers` ByteLevel pre-tokenizer (use_regex=True), verbatim.
BYTELEVEL_PATTERN = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
                     r"|\s+")


class Tokenizer:
  """Text <-> int ids. Subclasses implement `_encode_batch` (new lists, which the caller may
  modify), `_decode` and set the fields.

  Attributes:
    spec: the spec string it was made from.
    vocab_size: number of ids; every id it produces is in `[0, vocab_size)`.
    eos_id: id ending every document in a token stream.
    bos_id: id starting every document, or None (byte, byte-level BPE).
    pad_id: id used for padding (masked out of the loss by segment id 0).
    fingerprint: a string identifying the exact vocabulary (keys token caches).
    backend: the library encoding text ("python", "tiktoken", "tokenizers",
      "sentencepiece"); never part of the fingerprint (every backend gives the same ids).
  """

  spec: str
  vocab_size: int
  eos_id: int
  bos_id: int | None
  pad_id: int
  fingerprint: str
  backend: str = "python"

  def encode(self, text: str) -> list[int]:
    """Ids of text, without special tokens."""
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._encode_batch(list(texts))

  def encode_document(self, text: str) -> list[int]:
    """`[bos] + encode(text) + [eos]`: how a document enters a token stream."""
    return self._wrap(self.encode(text))

  def encode_documents(self, texts: Sequence[str]) -> list[list[int]]:
    return [self._wrap(ids) for ids in self.encode_batch(texts)]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of ids; special tokens are rendered as their text, ids outside
    `[0, vocab_size)` (a model vocab padded past the tokenizer's) are skipped."""
    return self._decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

  # The file a Hugging Face folder holds this tokenizer in (None: it has no file form).
  file_name: str | None = None

  def save(self, folder: str) -> str | None:
    """Writes the tokenizer as `folder/<file_name>` (HF layout); returns the path, or None
    when it has no file form (the byte tokenizer)."""
    return None

  def _wrap(self, ids: list[int]) -> list[int]:
    # In place (ids is always a fresh list from _encode_batch): list concatenation would copy
    # every document twice, ~10% of prepare's time per token on the tiktoken backend.
    if self.bos_id is not None:
      ids.insert(0, self.bos_id)
    ids.append(self.eos_id)
    return ids

  def _encode_batch(self, texts: list[str]) -> list[list[int]]:
    raise NotImplementedError

  def _decode(self, ids: list[int]) -> str:
    raise NotImplementedError

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(spec={self.spec!r}, vocab_size={self.vocab_size}, "
            f"eos_id={self.eos_id}, bos_id={self.bos_id}, pad_id={self.pad_id})")


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as ids 0..255; eos 256, pad 257; vocab 258. No training, for tests."""

  def __init__(self):
    self.spec = "byte"
    self.eos_id, self.pad_id, self.bos_id = 256, 257, None
    self.vocab_size = 258
    self.fingerprint = "byte-v1"
    self._specials = {256: EOS_TOKEN, 257: PAD_TOKEN}

  def _encode_batch(self, texts):
    return [list(t.encode("utf-8")) for t in texts]

  def _decode(self, ids):
    pieces, run = [], bytearray()
    for i in ids:
      if i < 256:
        run.append(i)
      else:
        pieces += [run.decode("utf-8", errors="replace"), self._specials[i]]
        run = bytearray()
    return "".join(pieces) + run.decode("utf-8", errors="replace")


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
      raise ValueError(f"tokenizer {spec!r} has none of the end-of-text tokens {_HF_EOS}; "
                       "add one to its added_tokens or use another tokenizer")
    bos = _first_id(tok, _HF_BOS)
    self.bos_id = bos if bos != self.eos_id else None
    pad = _first_id(tok, _HF_PAD)
    self.pad_id = self.eos_id if pad is None else pad
    self.fingerprint = "hf-" + hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]
    self._requested = backend or os.environ.get(BACKEND_ENV) or "auto"
    if self._requested not in BACKENDS:
      raise ValueError(f"tokenizer backend {self._requested!r} (from {BACKEND_ENV} or the "
                       f"backend argument) is not one of {BACKENDS}")
    self._core = None  # the tiktoken encoder, built on first use (decode-only users skip it)
    self._resolved = self._requested == "tokenizers"
    self._reason = f"{BACKEND_ENV}=tokenizers" if self._resolved else None
    if self._requested == "tiktoken":
      self._resolve()  # fails now, naming why, rather than at the first encode

  file_name = "tokenizer.json"

  @property
  def backend(self) -> str:
    """"tiktoken" or "tokenizers": what `encode` runs."""
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
        raise ValueError(f"tokenizer {self.spec!r} cannot be encoded with tiktoken exactly: "
                         f"{e}; unset {BACKEND_ENV} (or set it to auto) to use tokenizers"
                         ) from None
      log.info("tokenizer %s encodes with `tokenizers`: %s", self.spec, e)

  def __getstate__(self):  # tiktoken's core does not pickle; a copy rebuilds it on first use
    state = dict(self.__dict__)
    if state["_requested"] != "tokenizers":
      state.update(_core=None, _resolved=False, _reason=None)
    return state

  def save(self, folder: str) -> str:
    path = os.path.join(folder, self.file_name)
    self._tok.save(path)
    return path

  def _encode_batch(self, texts):
    self._resolve()
    if self._core is None:
      return self._hf_encode(texts)
    # As many threads as tokenizers' encode_batch would use (RAYON_NUM_THREADS, else every
    # allowed core); tiktoken releases the GIL. A pool per call: nothing to carry over a fork.
    threads = min(len(texts), int(os.environ.get("RAYON_NUM_THREADS") or 0)
                  or len(os.sched_getaffinity(0)))
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


class NotConvertible(ValueError):
  """A `tokenizers` tokenizer whose ids tiktoken would not reproduce exactly (says why)."""


@functools.lru_cache(maxsize=1)
def bytelevel_alphabet() -> dict[str, int]:
  """GPT-2's byte-level alphabet: the printable character standing for each byte, -> byte."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
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
  need(cfg.get("normalizer") is None,
       f"it has a normalizer ({(cfg.get('normalizer') or {}).get('type')})")
  pre = cfg.get("pre_tokenizer") or {}
  if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
    pre = pre["pretokenizers"][0]
  need(pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
       and not pre.get("add_prefix_space", False),
       f"its pre-tokenizer is not ByteLevel(use_regex=True, add_prefix_space=False): {pre}")
  post = cfg.get("post_processor") or {"type": "Sequence", "processors": []}
  posts = post.get("processors", []) if post.get("type") == "Sequence" else [post]
  need(all(p.get("type") in _POST_PROCESSORS for p in posts),
       f"unknown post-processor {post.get('type')}")
  need(cfg.get("truncation") is None and cfg.get("padding") is None,
       "it truncates or pads encodings")
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
      raise NotConvertible(f"merge {left!r} + {right!r} -> id {token_id} comes after a merge "
                           f"giving id {last}: merge priority does not follow the ids")
    last = token_id
  return dict(reachable.values())


def tiktoken_core(tok, name: str):
  """A `tiktoken.Encoding` equal to `tok`'s encoder (see tiktoken_ranks), or NotConvertible."""
  try:
    import tiktoken  # pylint: disable=g-import-not-at-top
  except ModuleNotFoundError:
    raise NotConvertible("tiktoken is not installed (`pip install tiktoken`)") from None
  ranks = tiktoken_ranks(tok)
  encoding = tiktoken.Encoding(f"mmfree-{name}", pat_str=BYTELEVEL_PATTERN,
                               mergeable_ranks=ranks, special_tokens={})
  # The core itself: Encoding.encode_ordinary turns lone surrogates into U+FFFD, where
  # tokenizers refuses the text; _encode_batch hands those texts to tokenizers.
  core = getattr(encoding, "_core_bpe", None)
  if core is None:
    raise NotConvertible(f"tiktoken {tiktoken.__version__} has no Encoding._core_bpe")
  return core


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model with its own bos/eos (pad = its pad id, else eos)."""

  def __init__(self, path: str, spec: str):
    # Only spm: specs need it; importing it here keeps grain workers' start-up light.
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self._sp = spm.SentencePieceProcessor(model_file=path)
    self.spec = spec
    self.vocab_size = self._sp.get_piece_size()
    if self._sp.eos_id() < 0:
      raise ValueError(f"sentencepiece model {path} has no eos id; retrain it with "
                       "--eos_id set, or use another tokenizer")
    self.eos_id = self._sp.eos_id()
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
    proto = self._sp.serialized_model_proto()
    self.fingerprint = "spm-" + hashlib.sha256(proto).hexdigest()[:16]

  file_name = "tokenizer.model"
  backend = "sentencepiece"

  def save(self, folder: str) -> str:
    path = os.path.join(folder, self.file_name)
    with open(path, "wb") as f:
      f.write(self._sp.serialized_model_proto())
    return path

  def _encode_batch(self, texts):
    return self._sp.encode(texts, out_type=int)

  def _decode(self, ids):
    return self._sp.decode(ids)


def document_start(tokenizer: Tokenizer) -> list[int]:
  """`[bos]` where the tokenizer has one, else `[]`: how training documents begin
  (`Tokenizer.encode_document` is `[bos] + encode(text) + [eos]`)."""
  return [tokenizer.bos_id] if tokenizer.bos_id is not None else []


def prefix_token(tokenizer: Tokenizer) -> int:
  """The token a document is predicted from: BOS if the tokenizer has one, else EOS (which
  precedes every document of a packed training stream)."""
  token = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
  if token is None:
    raise ValueError(f"tokenizer {tokenizer!r} has neither a BOS nor an EOS id; the first "
                     "token of a document needs one to be predicted from")
  return token


def _first_id(tok, candidates) -> int | None:
  for token in candidates:
    token_id = tok.token_to_id(token)
    if token_id is not None:
      return token_id
  return None


def _resolve_file(path: str, default_name: str, kind: str, spec: str) -> str:
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    path = os.path.join(path, default_name)
  if not os.path.isfile(path):
    raise ValueError(f"{kind} file {path!r} (from data.tokenizer={spec!r}) does not exist; "
                     f"set --config.data.tokenizer to an existing file (or a folder holding "
                     f"{default_name})")
  return path


def tokenizer_file(spec: str) -> str | None:
  """The file an `hf:`/`spm:` spec loads (a folder resolved to the file in it); None for
  `byte` and `bpe:` (whose file is trained: `bpe_cache_path`)."""
  kind, _, arg = spec.partition(":")
  if spec == MISTRAL_ALIAS:
    return mistral_tokenizer_path()
  if kind == "hf" and arg:
    return _resolve_file(arg, "tokenizer.json", "tokenizer", spec)
  if kind == "spm" and arg:
    return _resolve_file(arg, "tokenizer.model", "sentencepiece model", spec)
  return None


def bpe_cache_path(cache_dir: str, vocab_size: int, corpus_id: str) -> str:
  """Where the BPE of vocab_size trained on the corpus identified by corpus_id is cached."""
  key = hashlib.sha256(json.dumps(
      [BPE_FORMAT, BPE_TRAIN_MAX_CHARS, vocab_size, corpus_id]).encode()).hexdigest()[:16]
  return os.path.join(cache_dir, "tokenizers", f"bpe{vocab_size}-{key}.json")


def _texts_digest(corpus_texts: Callable[[], Iterable[str]]) -> str:
  digest = hashlib.sha256()
  for text in corpus_texts():
    digest.update(text.encode("utf-8", errors="surrogatepass"))
    digest.update(b"\x00")
  return "texts-" + digest.hexdigest()


def _capped(texts: Iterable[str], max_chars: int) -> Iterable[str]:
  total = 0
  for text in texts:
    yield text
    total += len(text)
    if total >= max_chars:
      return


def train_bpe(texts: Iterable[str], vocab_size: int):
  """A byte-level BPE `tokenizers.Tokenizer` with `<|endoftext|>` (id 0) and `<|pad|>` (1)."""
  # `tokenizers` (Rust, ~0.2 s to import) only for bpe:/hf: specs, not in grain workers.
  from tokenizers import Tokenizer as HFTok  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = HFTok(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(_capped(texts, BPE_TRAIN_MAX_CHARS), trainer=trainer)
  return tok


def _load_bpe(vocab_size: int, spec: str, corpus_texts, corpus_id, cache_dir) -> Tokenizer:
  from tokenizers import Tokenizer as HFTok  # pylint: disable=g-import-not-at-top
  min_vocab = 256 + 2
  if vocab_size < min_vocab:
    raise ValueError(f"data.tokenizer={spec!r}: a byte-level BPE needs vocab_size >= "
                     f"{min_vocab} (256 bytes + eos + pad)")
  if corpus_texts is None:
    raise ValueError(f"data.tokenizer={spec!r} trains on the corpus, but no corpus text is "
                     "available (data.source=tokens?); use the tokenizer that produced the "
                     "ids: --config.data.tokenizer=hf:<tokenizer.json> or spm:<model>")
  path = bpe_cache_path(cache_dir, vocab_size, corpus_id or _texts_digest(corpus_texts))
  if os.path.exists(path):
    return HFTokenizer(HFTok.from_file(path), spec)
  log.info("training a byte-level BPE with %d ids (once; cached at %s)", vocab_size, path)
  tok = train_bpe(corpus_texts(), vocab_size)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"
  tok.save(tmp)
  os.replace(tmp, path)  # atomic: concurrent processes may race, each writes the same thing
  return HFTokenizer(tok, spec)


def load_tokenizer(spec: str, *, corpus_texts: Callable[[], Iterable[str]] | None = None,
                   cache_dir: str, corpus_id: str | None = None) -> Tokenizer:
  """Makes the tokenizer a spec string names (forms in the module docstring).

  Args:
    spec: `byte`, `bpe:<vocab_size>`, `hf:<path>` or `spm:<path>`.
    corpus_texts: a callable returning a fresh iterable of documents; needed by `bpe:` only.
    cache_dir: folder for trained tokenizers (`<cache_dir>/tokenizers/`).
    corpus_id: a string identifying the corpus (e.g. its files' paths, sizes, mtimes); keys
      the BPE cache. None = a hash of all the texts (reads the corpus once more).
  """
  if not isinstance(spec, str):
    raise ValueError(f"data.tokenizer must be a string, one of {SPEC_FORMS}; got {spec!r}")
  kind, _, arg = spec.partition(":")
  if spec == "byte":
    return ByteTokenizer()
  if kind == "bpe" and arg:
    try:
      vocab_size = int(arg)
    except ValueError:
      raise ValueError(f"data.tokenizer={spec!r}: the vocab size must be an int, e.g. "
                       "bpe:4096") from None
    return _load_bpe(vocab_size, spec, corpus_texts, corpus_id, cache_dir)
  if kind == "hf" and arg:
    from tokenizers import Tokenizer as HFTok  # pylint: disable=g-import-not-at-top
    return HFTokenizer(HFTok.from_file(_resolve_file(arg, "tokenizer.json", "tokenizer", spec)),
                       spec)
  if spec == MISTRAL_ALIAS:
    return SentencePieceTokenizer(mistral_tokenizer_path(), spec)
  if kind == "spm" and arg:
    return SentencePieceTokenizer(
        _resolve_file(arg, "tokenizer.model", "sentencepiece model", spec), spec)
  raise ValueError(f"unknown data.tokenizer spec {spec!r}; valid forms: {', '.join(SPEC_FORMS)}")


def check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
  """Raises unless every id the tokenizer produces fits a model with vocab_size rows."""
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(
        f"tokenizer {tokenizer.spec!r} has {tokenizer.vocab_size} ids but model.vocab_size="
        f"{vocab_size}: the tokenizer vocab must fit the model's; set "
        f"--config.model.vocab_size={tokenizer.vocab_size} (or more) or pick a smaller tokenizer")

