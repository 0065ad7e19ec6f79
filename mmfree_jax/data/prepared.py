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
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import grain
import numpy as np

from mmfree_jax import config as config_lib
from mmfree_jax.data import shards as shards_lib
from mmfree_jax.data import split as split_lib
from mmfree_jax.data.corpus import Runs
from mmfree_jax.data.sequence_packing import PackedWindows
from mmfree_jax.data.tokenizer import Tokenizer, load_tokenizer

SOURCE = "array_record"  # the data.source value
FORMAT_VERSION = shards_lib.FORMAT_VERSION
MANIFEST = shards_lib.MANIFEST
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


def open_prepared(directory: str) -> PreparedDir:
  """Reads and checks a prepared folder's manifest; every shard file must have its size."""
  directory = os.path.abspath(os.path.expanduser(directory))
  path = os.path.join(directory, MANIFEST)
  if not os.path.isdir(directory):
    raise ValueError(f"prepared folder {directory!r} does not exist; run `python -m "
                     "mmfree_jax.data.prepare --out <folder> ...` first, or fix data.paths")
  if not os.path.isfile(path):
    partial = any(n.startswith("shard-") for n in os.listdir(directory))
    raise ValueError(
        f"{directory!r} has no {MANIFEST}: " + (
            "its prepare did not finish; rerun the same prepare command to complete it"
            if partial else "it is not a prepared folder (python -m mmfree_jax.data.prepare)"))
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT_VERSION:
    raise ValueError(f"{path} has format {manifest.get('format')!r}, this version reads "
                     f"{FORMAT_VERSION!r}; re-run prepare with this version")
  for shard in manifest["shards"]:
    file = os.path.join(directory, shard["path"])
    if not os.path.isfile(file) or os.path.getsize(file) != shard["bytes"]:
      raise ValueError(f"shard {file} is missing or has another size than its manifest "
                       "records (a partial copy?); copy the folder again or re-run prepare")
  return PreparedDir(directory, manifest)


def resolve_dirs(paths: str) -> list[str]:
  """`data.paths` for array_record: comma-separated folders or globs, in sorted order."""
  entries = [p.strip() for p in (paths or "").split(",") if p.strip()]
  if not entries:
    raise ValueError("data.source='array_record' needs data.paths: the folders written by "
                     "`python -m mmfree_jax.data.prepare` (comma-separated)")
  dirs = []
  for entry in entries:
    pattern = os.path.expanduser(entry)
    if glob.has_magic(pattern):
      matches = sorted(p for p in glob.glob(pattern) if os.path.isdir(p))
      if not matches:
        raise ValueError(f"data.paths glob {entry!r} matches no folders; fix --config.data.paths")
      dirs += matches
    else:
      dirs.append(pattern)
  return [os.path.abspath(d) for d in dirs]


def mixture_weights(mixture: str, prepared: list[PreparedDir]) -> list[float]:
  """Weights of the folders: `data.mixture` (`config.mixture_weights`), or their train
  tokens when it is empty."""
  weights = config_lib.mixture_weights(mixture)
  if weights is None:
    return [float(p.split_tokens("train")) for p in prepared]
  if len(weights) != len(prepared):
    raise ValueError(f"data.mixture has {len(weights)} weights but data.paths names "
                     f"{len(prepared)} folders; give one weight per folder")
  return weights


def open_sources(data_cfg) -> tuple[list[PreparedDir], list[float]]:
  """The configured prepared folders and their mixture weights, all checked."""
  prepared = [open_prepared(d) for d in resolve_dirs(data_cfg.paths)]
  weights = mixture_weights(data_cfg.get("mixture", ""), prepared)
  for p, w in zip(prepared, weights):
    if w > 0 and not p.split_shards("train"):
      raise ValueError(f"{p.directory} has no training shards (all are held out); re-run "
                       "prepare with fewer --val_shards")
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
      raise ValueError(f"data.tokenizer={spec!r} but {first.directory} was tokenized with "
                       f"{first.tokenizer['spec']!r}; set --config.data.tokenizer="
                       f"{first.tokenizer['spec']}")
    tokenizer = load_tokenizer("hf:" + os.path.join(first.directory, first.tokenizer["file"]),
                               cache_dir=cache_dir)
  else:
    tokenizer = load_tokenizer(spec, cache_dir=cache_dir)
  for p in prepared:
    if p.tokenizer["fingerprint"] != tokenizer.fingerprint:
      stored = f" (its copy: {os.path.join(p.directory, p.tokenizer['file'])})" if (
          p.tokenizer.get("file")) else ""
      raise ValueError(
          f"{p.directory} was tokenized with {p.tokenizer['spec']!r}{stored}, fingerprint "
          f"{p.tokenizer['fingerprint']}, but data.tokenizer={spec!r} has fingerprint "
          f"{tokenizer.fingerprint}; set --config.data.tokenizer={p.tokenizer['spec']} or "
          "re-run prepare with this tokenizer (all data.paths folders need the same one)")
  return tokenizer


class _ShardTokens:
  """Slice access `[lo:hi]` to one shard's token stream, read record by record."""

  def __init__(self, windows: "PreparedWindows", shard: int):
    self._windows, self._shard = windows, shard

  def __getitem__(self, index: slice) -> np.ndarray:
    w = self._windows
    size = w.record_tokens
    lo, hi = index.start, index.stop
    first, last = lo // size, (hi - 1) // size
    offset = int(w.record_offsets[self._shard])
    data = b"".join(w.source[offset + r] for r in range(first, last + 1))
    return np.frombuffer(data, w.dtype)[lo - first * size:hi - first * size]


class PreparedWindows(PackedWindows):
  """The windows of a prepared folder's split (its shards' streams concatenated).

  Same windows, segment ids and padding as `PackedWindows` over the same tokens; the shards
  are read through one `grain.sources.ArrayRecordDataSource` (picklable: grain worker
  processes reopen the files). `self[i]` -> {"tokens", "segment_ids"}: int32 `[seq_len + 1]`.
  """

  def __init__(self, prepared: PreparedDir, split: str, *, seq_len: int, eos_id: int,
               pad_id: int):
    shards = [prepared.manifest["shards"][i] for i in prepared.split_shards(split)]
    paths = [os.path.join(prepared.directory, s["path"]) for s in shards]
    tokens = np.asarray([s["tokens"] for s in shards], np.int64)
    zeros = np.zeros(len(shards), np.int64)
    super().__init__(paths, Runs(np.arange(len(shards)), zeros, tokens, zeros.astype(bool)),
                     seq_len=seq_len, eos_id=eos_id, pad_id=pad_id)
    self.record_tokens = int(prepared.manifest["record_tokens"])
    self.dtype = np.dtype(prepared.manifest["dtype"])
    records = np.asarray([s["records"] for s in shards], np.int64)
    self.record_offsets = np.concatenate([[0], np.cumsum(records)[:-1]]).astype(np.int64)
    # `path[0:n]` gives the record count up front: no file is opened until read.
    self.source = grain.sources.ArrayRecordDataSource(
        [f"{p}[0:{int(n)}]" for p, n in zip(paths, records)]) if shards else None

  def _shard(self, i: int) -> _ShardTokens:
    return _ShardTokens(self, i)


def component_seed(seed: int, index: int) -> int:
  """Shuffle seed of mixture component `index` (unrelated streams for equal folders)."""
  return int(np.random.SeedSequence([seed, _COMPONENT_STREAM, index]).generate_state(1)[0])


def split_windows(data_cfg, tokenizer: Tokenizer, split: str):
  """[(windows, weight)] of the configured folders' `split` (train or validation), leaving
  out zero weights and, for validation, folders without held-out shards."""
  prepared, weights = open_sources(data_cfg)
  out = []
  for p, w in zip(prepared, weights):
    if w > 0 and p.split_shards(split):
      out.append((PreparedWindows(p, split, seq_len=data_cfg.seq_len, eos_id=tokenizer.eos_id,
                                  pad_id=tokenizer.pad_id), w))
  return out


def train_dataset(data_cfg, tokenizer: Tokenizer, *, local_batch: int, process_index: int,
                  process_count: int) -> grain.MapDataset:
  """This process's infinite dataset of local batches (element s = its rows of step s)."""
  components = split_windows(data_cfg, tokenizer, "train")
  if len(components) == 1:  # the same stream as any other single source
    windows = components[0][0]
    ds = grain.MapDataset.source(windows).shuffle(
        seed=split_lib.shuffle_seed(data_cfg.seed)).repeat()
  else:
    ds = grain.MapDataset.mix(
        [grain.MapDataset.source(w).shuffle(seed=component_seed(data_cfg.seed, i)).repeat()
         for i, (w, _) in enumerate(components)], [w for _, w in components])
  return ds.batch(local_batch, drop_remainder=True)[process_index::process_count]


def validation_windows(data_cfg, tokenizer: Tokenizer):
  """Random access to the validation windows (held-out shards, mixed by weight), or None."""
  components = split_windows(data_cfg, tokenizer, "validation")
  if not components:
    return None
  if len(components) == 1:
    return components[0][0]
  return grain.MapDataset.mix([grain.MapDataset.source(w) for w, _ in components],
                              [w for _, w in components])
