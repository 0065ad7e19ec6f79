"""Prepared shards (`prepare.py`) as training data: `data.source=array_record`.

`data.paths` names one or more prepared folders (comma-separated, globs allowed);
`data.mixture` optionally weights them (comma-separated, one weight per folder, e.g. `0.7,0.3`;
empty = proportional to each folder's training tokens). A folder's token stream for a split is
its split's shards concatenated in shard order; windows of `seq_len + 1` are cut from it
exactly as `sequence_packing.PackedWindows` cuts any stream (same segment ids, same padding),
reading the records through `grain.sources.ArrayRecordDataSource`.

Training stream: each folder's train windows are shuffled (reshuffled every epoch) and
repeated, and the folders are interleaved by `grain.MapDataset.mix`, a deterministic
interleave whose running proportions follow the weights at every prefix; then the same
`batch(local)[p::P]` as `pipeline.train_dataset`, so the global batch is process-count
independent and the grain iterator state (one index) restores the position exactly.
Validation: the folders' held-out shards (in order, no shuffle), mixed by the same weights
(folders without validation shards left out).

Folders in a bucket (`gs://…`, `s3://…`): the manifest and tokenizer are read through
`mmfree_jax.paths`; the ArrayRecord reader only opens local files, so each shard is streamed
once into the local cache, keyed by the sha256 its manifest records (`cache.cached_copy`), at
its first read (lazily: a run touches only the shards it reads) and checked against that
sha256 as it downloads. A content-keyed cache rather than a temporary copy per process: grain
workers, evaluation and every later run on the machine share one copy, and a re-prepared shard
(another sha256) can never be read from a stale copy. A folder without its manifest (the
publish marker `prepare` writes last) is refused, on a bucket as on disk.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from mmfree_jax import config as config_lib
from mmfree_jax import paths
from mmfree_jax.data import cache as cache_lib
from mmfree_jax.data import shards as shards_lib
from mmfree_jax.data import sources, untrusted
from mmfree_jax.data import split as split_lib
from mmfree_jax.data.corpus import Runs
from mmfree_jax.data.sequence_packing import PackedWindows
from mmfree_jax.data.tokenizer import Tokenizer, load_tokenizer

SOURCE = "array_record"  # the data.source value
FORMAT_VERSION = shards_lib.FORMAT_VERSION
MANIFEST = shards_lib.MANIFEST
_REWRITE = (
  "rerun the prepare command that wrote the folder (a rerun rewrites the manifest "
  "from the shards' sidecars)"
)
_COMPONENT_STREAM = 3  # seed stream of the per-folder shuffles of a mixture


@dataclasses.dataclass(frozen=True)
class PreparedDir:
  """A complete prepare output folder and its manifest (see `prepare.write_manifest`)."""

  directory: str
  manifest: dict

  @property
  def tokenizer(self) -> dict:
    return self.manifest["tokenizer"]

  def split_shards(self, split: str) -> list[int]:
    return list(self.manifest["splits"][split])

  def split_tokens(self, split: str) -> int:
    return sum(self.manifest["shards"][i]["tokens"] for i in self.split_shards(split))

  def shard_path(self, index: int) -> str:
    """Shard `index`'s file, refused if the manifest names one outside the folder."""
    return untrusted.confined_join(
      self.directory,
      self.manifest["shards"][index].get("path"),
      what=f"{MANIFEST} shards[{index}].path",
      fix=_REWRITE,
    )

  def tokenizer_path(self) -> str | None:
    """The tokenizer file stored in the folder (None for `byte`), confined to it."""
    name = self.tokenizer.get("file")
    return (
      None
      if name is None
      else untrusted.confined_join(
        self.directory, name, what=f"{MANIFEST} tokenizer.file", fix=_REWRITE
      )
    )


def open_prepared(directory: str) -> PreparedDir:
  """Reads and checks a prepared folder's manifest (every field, every path inside the
  folder); every shard file must have its size. Shard contents are verified at first read."""
  directory = paths.absolute(paths.expanduser(directory))
  path = paths.join(directory, MANIFEST)
  sources.check_prepared_dir_exists(directory)
  if not paths.is_published(directory, MANIFEST):
    partial = any(n.startswith("shard-") for n in paths.listdir(directory))
    raise ValueError(
      f"{directory!r} has no {MANIFEST}: "
      + (
        "its prepare did not finish; rerun the same prepare command to complete it"
        if partial
        else "it is not a prepared folder (python -m mmfree_jax.data.prepare)"
      )
    )
  manifest = untrusted.load_json(path, what="a prepared folder's manifest", fix=_REWRITE)
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
    found = manifest.get("format") if isinstance(manifest, dict) else manifest
    raise ValueError(
      f"{path} has format {found!r}, this version reads "
      f"{FORMAT_VERSION!r}; re-run prepare with this version"
    )
  _check_shard_fields(path, manifest)
  _check_tokenizer_fields(path, manifest)
  prepared = PreparedDir(directory, manifest)
  listed = paths.file_sizes(directory)  # one listing, not a request per shard on a bucket
  for i, shard in enumerate(manifest["shards"]):
    file = prepared.shard_path(i)
    name = shard["path"]  # confined to the folder by shard_path
    size = listed.get(name) if "/" not in name else paths.isfile(file) and paths.size(file)
    if size != shard["bytes"]:
      raise ValueError(
        f"shard {file} is missing or has another size than its manifest "
        "records (a partial copy?); copy the folder again or re-run prepare"
      )
  return prepared


def _is_count(value, low: int = 0) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _need(ok: bool, path: str, field: str, why: str) -> None:
  if not ok:
    raise ValueError(f"{path}: {field} {why}; {_REWRITE}")


def _check_shard_fields(path: str, m: dict) -> None:
  """Refuses shard, dtype and split fields that cannot describe the folder (edited?)."""
  dtypes = shards_lib.TOKEN_DTYPES
  _need(m.get("dtype") in dtypes, path, "dtype", f"is {m.get('dtype')!r}, not one of {dtypes}")
  size = m.get("record_tokens")
  _need(_is_count(size, 1), path, "record_tokens", f"is {size!r}, not a positive int")
  shards = m.get("shards")
  _need(isinstance(shards, list) and shards, path, "shards", "is not a non-empty list")
  for i, s in enumerate(shards):
    keys = ("tokens", "records", "bytes", "documents")
    _need(
      isinstance(s, dict)
      and all(_is_count(s.get(k)) for k in keys)
      and isinstance(s.get("sha256"), str),
      path,
      f"shards[{i}]",
      f"lacks one of {keys} (counts) or its sha256",
    )
    records = -(-s["tokens"] // size)
    _need(
      s["tokens"] >= 1 and s["records"] == records,
      path,
      f"shards[{i}].records",
      f"is {s['records']}, but {s['tokens']} tokens in records of {size} make {records}",
    )
  splits = m.get("splits")
  _need(
    isinstance(splits, dict)
    and all(isinstance(splits.get(k), list) for k in ("train", "validation")),
    path,
    "splits",
    "lacks its train and validation lists of shard indices",
  )
  ids = splits["train"] + splits["validation"]
  _need(
    all(_is_count(i) for i in ids) and sorted(ids) == list(range(len(shards))),
    path,
    "splits",
    f"does not put each shard 0..{len(shards) - 1} in exactly one of train and validation",
  )


def _check_tokenizer_fields(path: str, m: dict) -> None:
  tok = m.get("tokenizer")
  _need(
    isinstance(tok, dict)
    and isinstance(tok.get("spec"), str)
    and isinstance(tok.get("fingerprint"), str),
    path,
    "tokenizer",
    "lacks its spec or fingerprint",
  )
  vocab, limit = tok.get("vocab_size"), 1 << (8 * np.dtype(m["dtype"]).itemsize)
  _need(
    _is_count(vocab, 1) and vocab <= limit,
    path,
    "tokenizer.vocab_size",
    f"is {vocab!r}, not a count that {m['dtype']} ids can hold",
  )
  for key in ("eos_id", "pad_id", "bos_id"):
    value = tok.get(key)
    _need(
      (key == "bos_id" and value is None) or (_is_count(value) and value < vocab),
      path,
      f"tokenizer.{key}",
      f"is {value!r}, not an id below vocab_size {vocab}",
    )


def mixture_weights(mixture: str, prepared: list[PreparedDir]) -> list[float]:
  """Weights of the folders: `data.mixture` (`config.mixture_weights`), or their train
  tokens when it is empty."""
  weights = config_lib.mixture_weights(mixture)
  if weights is None:
    return [float(p.split_tokens("train")) for p in prepared]
  if len(weights) != len(prepared):
    raise ValueError(
      f"data.mixture has {len(weights)} weights but data.paths names "
      f"{len(prepared)} folders; give one weight per folder"
    )
  return weights


def open_sources(data_cfg) -> tuple[list[PreparedDir], list[float]]:
  """The configured prepared folders and their mixture weights, all checked."""
  prepared = [open_prepared(d) for d in sources.prepared_dirs(data_cfg.paths)]
  weights = mixture_weights(data_cfg.get("mixture", ""), prepared)
  for p, w in zip(prepared, weights):
    if w > 0 and not p.split_shards("train"):
      raise ValueError(
        f"{p.directory} has no training shards (all are held out); re-run "
        "prepare with fewer --val_shards"
      )
  return prepared, weights


def tokenizer_for(data_cfg, prepared: list[PreparedDir], *, cache_dir: str) -> Tokenizer:
  """`data.tokenizer`, checked to be the one every folder was tokenized with.

  A `bpe:<vocab>` spec (trained by prepare on the folder's corpus) is loaded from the copy
  prepare stored in the folder, so it needs no corpus text here.
  """
  spec = data_cfg.tokenizer
  first = prepared[0]
  if spec.startswith("bpe:"):
    if spec != first.tokenizer["spec"] or not first.tokenizer.get("file"):
      raise ValueError(
        f"data.tokenizer={spec!r} but {first.directory} was tokenized with "
        f"{first.tokenizer['spec']!r}; set --config.data.tokenizer="
        f"{first.tokenizer['spec']}"
      )
    tokenizer = load_tokenizer("hf:" + first.tokenizer_path(), cache_dir=cache_dir)
  else:
    tokenizer = load_tokenizer(spec, cache_dir=cache_dir)
  for p in prepared:
    if p.tokenizer["fingerprint"] != tokenizer.fingerprint:
      stored = f" (its copy: {p.tokenizer_path()})" if p.tokenizer.get("file") else ""
      raise ValueError(
        f"{p.directory} was tokenized with {p.tokenizer['spec']!r}{stored}, fingerprint "
        f"{p.tokenizer['fingerprint']}, but data.tokenizer={spec!r} has fingerprint "
        f"{tokenizer.fingerprint}; set --config.data.tokenizer={p.tokenizer['spec']} or "
        "re-run prepare with this tokenizer (all data.paths folders need the same one)"
      )
    ids = {k: getattr(tokenizer, k) for k in ("vocab_size", "eos_id", "pad_id", "bos_id")}
    recorded = {k: p.tokenizer.get(k) for k in ids}
    if recorded != ids:
      raise ValueError(
        f"{paths.join(p.directory, MANIFEST)} records tokenizer ids "
        f"{recorded}, but its tokenizer (same fingerprint) has {ids}: the "
        f"manifest was edited; {_REWRITE}"
      )
  return tokenizer


class _ShardTokens:
  """Slice access `[lo:hi]` to one shard's token stream, read record by record; the shard
  is verified (`shards.verify_shard`) before its first read in each process."""

  def __init__(self, windows: "PreparedWindows", shard: int):
    self._windows, self._shard = windows, shard

  def __getitem__(self, index: slice) -> np.ndarray:
    w = self._windows
    meta = w.shard_meta[self._shard]
    path = cache_lib.cached_copy(
      w.shard_paths[self._shard],
      meta["sha256"],
      w.cache_dir,
      sha256=meta["sha256"],
      fix=shards_lib.REDO,
    )  # a shard in a bucket: its local copy, downloaded at the first read
    name = w.shard_paths[self._shard]
    shards_lib.verify_shard(path, meta, record_tokens=w.record_tokens, dtype=w.dtype, name=name)
    size = w.record_tokens
    lo, hi = index.start, index.stop
    first, last = lo // size, (hi - 1) // size
    offset = int(w.record_offsets[self._shard])
    try:
      data = b"".join(w.source[offset + r] for r in range(first, last + 1))
    except RuntimeError as e:  # riegeli: the file changed after it verified
      raise ValueError(
        f"shard {name} cannot be read ({str(e).splitlines()[0][:200]}); {shards_lib.REDO}"
      ) from None
    return np.frombuffer(data, w.dtype)[lo - first * size : hi - first * size]


class PreparedWindows(PackedWindows):
  """The windows of a prepared folder's split (its shards' streams concatenated).

  Same windows, segment ids and padding as `PackedWindows` over the same tokens; the shards
  are read through one `grain.sources.ArrayRecordDataSource` (picklable: grain worker
  processes reopen the files). `self[i]` -> {"tokens", "segment_ids"}: int32 `[seq_len + 1]`.
  Shards in a bucket are read from their copies in `cache_dir` (default `$MMFREE_CACHE`).
  """

  def __init__(
    self,
    prepared: PreparedDir,
    split: str,
    *,
    seq_len: int,
    eos_id: int,
    pad_id: int,
    cache_dir: str | None = None,
  ):
    shards = [prepared.manifest["shards"][i] for i in prepared.split_shards(split)]
    files = [prepared.shard_path(i) for i in prepared.split_shards(split)]
    self.shard_meta = shards
    tokens = np.asarray([s["tokens"] for s in shards], np.int64)
    zeros = np.zeros(len(shards), np.int64)
    super().__init__(
      files,
      Runs(np.arange(len(shards)), zeros, tokens, zeros.astype(bool)),
      seq_len=seq_len,
      eos_id=eos_id,
      pad_id=pad_id,
    )
    self.cache_dir = cache_dir or cache_lib.default_cache_dir()
    local = [cache_lib.cached_path(f, s["sha256"], self.cache_dir) for f, s in zip(files, shards)]
    self.record_tokens = int(prepared.manifest["record_tokens"])
    self.dtype = np.dtype(prepared.manifest["dtype"])
    records = np.asarray([s["records"] for s in shards], np.int64)
    self.record_offsets = np.concatenate([[0], np.cumsum(records)[:-1]]).astype(np.int64)
    # `path[0:n]` gives the record count up front: no file is opened until read.
    self.source = (
      grain.sources.ArrayRecordDataSource([f"{p}[0:{int(n)}]" for p, n in zip(local, records)])
      if shards
      else None
    )

  def _shard(self, i: int) -> _ShardTokens:
    return _ShardTokens(self, i)


def component_seed(seed: int, index: int) -> int:
  """Shuffle seed of mixture component `index` (unrelated streams for equal folders)."""
  return int(np.random.SeedSequence([seed, _COMPONENT_STREAM, index]).generate_state(1)[0])


def split_windows(data_cfg, tokenizer: Tokenizer, split: str, *, cache_dir: str | None = None):
  """[(windows, weight)] of the configured folders' `split` (train or validation), leaving
  out zero weights and, for validation, folders without held-out shards. `cache_dir` holds
  the copies of shards in a bucket (default `$MMFREE_CACHE`)."""
  prepared, weights = open_sources(data_cfg)
  out = []
  for p, w in zip(prepared, weights):
    if w > 0 and p.split_shards(split):
      out.append(
        (
          PreparedWindows(
            p,
            split,
            seq_len=data_cfg.seq_len,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
            cache_dir=cache_dir,
          ),
          w,
        )
      )
  return out


def train_dataset(
  data_cfg,
  tokenizer: Tokenizer,
  *,
  local_batch: int,
  process_index: int,
  process_count: int,
  cache_dir: str | None = None,
) -> grain.MapDataset:
  """This process's infinite dataset of local batches (element s = its rows of step s)."""
  components = split_windows(data_cfg, tokenizer, "train", cache_dir=cache_dir)
  if len(components) == 1:  # the same stream as any other single source
    windows = components[0][0]
    ds = (
      grain.MapDataset.source(windows).shuffle(seed=split_lib.shuffle_seed(data_cfg.seed)).repeat()
    )
  else:
    ds = grain.MapDataset.mix(
      [
        grain.MapDataset.source(w).shuffle(seed=component_seed(data_cfg.seed, i)).repeat()
        for i, (w, _) in enumerate(components)
      ],
      [w for _, w in components],
    )
  return ds.batch(local_batch, drop_remainder=True)[process_index::process_count]


def validation_windows(data_cfg, tokenizer: Tokenizer, *, cache_dir: str | None = None):
  """Random access to the validation windows (held-out shards, mixed by weight), or None."""
  components = split_windows(data_cfg, tokenizer, "validation", cache_dir=cache_dir)
  if not components:
    return None
  if len(components) == 1:
    return components[0][0]
  return grain.MapDataset.mix(
    [grain.MapDataset.source(w) for w, _ in components], [w for _, w in components]
  )
