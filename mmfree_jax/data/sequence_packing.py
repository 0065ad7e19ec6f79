"""Concatenate-then-split packing into fixed windows with segment ids.

A split's token stream (its documents concatenated, each ending with EOS) is cut into
non-overlapping windows of `seq_len + 1` tokens; window i is stream
`[i * (seq_len+1), (i+1) * (seq_len+1))`. The tail shorter than a window is dropped, unless
the whole stream is shorter than one window: then that one window is padded at the end.

Window format (what every batch row is):
  tokens       int32 `[seq_len + 1]`
  segment_ids  int32 `[seq_len + 1]`: the index of the document within the window, from 1;
               a new segment starts right after each EOS (the EOS belongs to the document it
               ends); padding has segment id 0 and `pad_id` tokens.
Model convention: inputs `tokens[:, :-1]` (with `segment_ids[:, :-1]`), targets
`tokens[:, 1:]`, loss mask `segment_ids[:, 1:] != 0` (see `mmfree_jax.loss.split_window`).
"""

from __future__ import annotations

import threading

import numpy as np

from mmfree_jax.data.corpus import Runs

_OPEN_LOCK = threading.Lock()


def segment_ids_for(tokens: np.ndarray, eos_id: int, num_valid: int | None = None) -> np.ndarray:
  """Segment ids of a window: int32, same shape `[..., T]` as tokens.

  `1 + (number of EOS strictly before position t)`; positions at or after num_valid (padding,
  1-D windows only) get 0.
  """
  tokens = np.asarray(tokens)
  eos = (tokens == eos_id).astype(np.int32)
  before = np.cumsum(eos, axis=-1, dtype=np.int32) - eos  # EOS strictly before t
  segments = 1 + before
  if num_valid is not None:
    segments[num_valid:] = 0
  return segments


class PackedWindows:
  """Random access to the windows of a token stream given as runs of memory-mapped shards.

  Picklable without the data (grain worker processes reopen the shards by path).
  `self[i]` -> {"tokens": int32 `[seq_len+1]`, "segment_ids": int32 `[seq_len+1]`}.
  """

  def __init__(self, shard_paths, runs: Runs, *, seq_len: int, eos_id: int, pad_id: int):
    if seq_len < 1:
      raise ValueError(f"data.seq_len={seq_len} must be >= 1; set --config.data.seq_len")
    self.shard_paths = tuple(shard_paths)
    self.runs = runs
    self.window = seq_len + 1
    self.eos_id, self.pad_id = int(eos_id), int(pad_id)
    self._run_lengths = runs.lengths
    self._run_ends = np.cumsum(self._run_lengths)  # stream offset where each run ends
    self.num_tokens = int(self._run_ends[-1]) if len(self._run_ends) else 0
    self._shards = None

  def __len__(self) -> int:
    if not self.num_tokens:
      return 0
    return max(1, self.num_tokens // self.window)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_shards"] = None  # memory maps are reopened, not pickled
    return state

  def _shard(self, i: int) -> np.ndarray:
    if self._shards is None:
      # grain reads windows from several threads; np.load parses the .npy header with
      # ast.literal_eval, which CPython 3.11 does not make thread-safe ("AST constructor
      # recursion depth mismatch"), so the first opening is serialized.
      with _OPEN_LOCK:
        if self._shards is None:
          self._shards = [np.load(p, mmap_mode="r") for p in self.shard_paths]
    return self._shards[i]

  def stream_slice(self, lo: int, hi: int) -> np.ndarray:
    """Tokens `[lo, hi)` of the stream, int32 `[hi - lo]` (0 <= lo <= hi <= num_tokens)."""
    out = np.empty(hi - lo, np.int32)
    r = int(np.searchsorted(self._run_ends, lo, side="right"))
    pos = lo
    while pos < hi:
      offset = pos - int(self._run_ends[r] - self._run_lengths[r])  # position within run r
      body = int(self.runs.stop[r] - self.runs.start[r])
      if offset < body:
        take = min(body - offset, hi - pos)
        start = int(self.runs.start[r]) + offset
        out[pos - lo : pos - lo + take] = self._shard(int(self.runs.shard[r]))[start : start + take]
        pos += take
      else:  # past the run's tokens: its virtual EOS
        out[pos - lo] = self.eos_id
        pos += 1
      if pos >= self._run_ends[r]:
        r += 1
    return out

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    n = len(self)
    if not 0 <= index < n:
      raise IndexError(f"window {index} out of range [0, {n})")
    lo = index * self.window
    hi = min(lo + self.window, self.num_tokens)
    tokens = np.full(self.window, self.pad_id, np.int32)
    tokens[: hi - lo] = self.stream_slice(lo, hi)
    return {"tokens": tokens, "segment_ids": segment_ids_for(tokens, self.eos_id, hi - lo)}
