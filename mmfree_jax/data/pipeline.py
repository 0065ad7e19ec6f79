"""The input pipeline: config -> tokenizer -> corpus -> split -> windows -> per-process batches.

Batch format (train and validation): a dict of numpy arrays
  tokens       int32 `[local_batch, seq_len + 1]`
  segment_ids  int32 `[local_batch, seq_len + 1]`   (see `packing.py` for the convention)
with `local_batch = global_batch // process_count`. Under a mesh, `process_index` and
`process_count` are the process's block of the batch and the number of blocks
(`process_batch_block`): processes whose devices hold the same batch rows (a context axis
across hosts) load the same rows.

Multi-process contract: the GLOBAL batch at step s is the same whatever the process count;
process p receives rows `[p * local_batch, (p+1) * local_batch)` of it and loads only those.
The training sample stream is the train windows in a shuffled order, reshuffled every epoch
(grain: seed + epoch); global batch s holds stream samples `[s * global_batch, (s+1) *
global_batch)`. Cutting the stream into chunks of local_batch, global batch s is chunks
`s * P .. s * P + P - 1`, so process p takes every P-th chunk from chunk p: `batch(local)[p::P]`.
"""

from __future__ import annotations

import functools
import os
import threading
import time

import grain
import numpy as np

from mmfree_jax.data import corpus as corpus_lib
from mmfree_jax.data import prepared as prepared_lib
from mmfree_jax.data import split as split_lib
from mmfree_jax.data.sequence_packing import PackedWindows
from mmfree_jax.data.sources import source_from_config
from mmfree_jax.data.tokenizer import Tokenizer, load_tokenizer

# Read threads and buffered local batches per process (grain's defaults, 16 and 500, buffer
# far more than a training step needs).
READ_THREADS = 4
PREFETCH_BATCHES = 8
# How often a grain worker process checks that its trainer is still alive.
PARENT_POLL_S = 0.5


def tokenizer_from_config(data_cfg, *, cache_dir: str) -> Tokenizer:
  """The tokenizer `data.tokenizer` names; a `bpe:` one is trained on the configured corpus.

  Resolves `data.source`/`data.paths` first, so a missing file fails here, before compute.
  For `array_record` it is checked against every prepared folder's manifest.
  """
  if data_cfg.source == prepared_lib.SOURCE:
    prepared, _ = prepared_lib.open_sources(data_cfg)
    return prepared_lib.tokenizer_for(data_cfg, prepared, cache_dir=cache_dir)
  source = source_from_config(data_cfg)
  texts = source.documents if source.is_text else None
  return load_tokenizer(
    data_cfg.tokenizer, corpus_texts=texts, cache_dir=cache_dir, corpus_id=source.fingerprint
  )


def process_batch_block(mesh, batch_axes, process_index: int) -> tuple[int, int]:
  """`(block, blocks)`: which block of the global batch `process_index` loads (the
  `process_index` of `train_iterator`), and how many blocks the batch is cut into (its
  `process_count`).

  A process loads the rows its devices hold, and processes whose devices hold the same rows
  (a `context` or `tensor` axis spanning processes: the devices of one batch shard on several
  hosts) load the same block. Blocks are numbered in batch order; with the batch axes alone
  spanning the processes, block = process index and blocks = process count, as before.

  Args:
    mesh: a `jax.sharding.Mesh` (its `devices` grid and `axis_names`; any objects with a
      `process_index` work).
    batch_axes: the mesh axes the batch dimension is split over (a name, a tuple, or None).
  """
  names = list(mesh.axis_names)
  axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
  split = [names.index(a) for a in axes if a in names]
  rest = [i for i in range(len(names)) if i not in split]
  grid = np.transpose(np.asarray(mesh.devices), split + rest)
  rows = grid.reshape(int(np.prod([grid.shape[i] for i in range(len(split))])), -1)
  holds: dict[int, set] = {}
  for shard, devices in enumerate(rows):
    for device in devices:
      holds.setdefault(device.process_index, set()).add(shard)
  blocks = sorted({tuple(sorted(shards)) for shards in holds.values()})
  if [r for b in blocks for r in b] != list(range(len(rows))) or len(set(map(len, blocks))) > 1:
    raise ValueError(
      f"the processes' devices do not hold disjoint, equal blocks of the batch (mesh "
      f"{dict(mesh.shape)}, batch over {axes}); let the batch axes (data, fsdp) span the "
      "processes and keep context and tensor within one host, or span them whole"
    )
  return blocks.index(tuple(sorted(holds[process_index]))), len(blocks)


def local_batch_size(global_batch: int, process_index: int, process_count: int) -> int:
  """global_batch // process_count, with errors naming the fix."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  if global_batch < 1 or global_batch % process_count:
    raise ValueError(
      f"global batch {global_batch} is not a positive multiple of the "
      f"{process_count} processes; set --config.train.global_batch to a "
      f"multiple of {process_count}"
    )
  return global_batch // process_count


def split_windows(data_cfg, tokenizer: Tokenizer, *, cache_dir: str):
  """(train windows, validation windows or None) as `PackedWindows`."""
  source = source_from_config(data_cfg)
  corpus = corpus_lib.load_corpus(source, tokenizer, cache_dir)
  train_docs, val_docs = split_lib.split_documents(
    corpus.num_documents, data_cfg.val_fraction, data_cfg.seed
  )

  def windows(docs):
    return PackedWindows(
      corpus.shard_paths,
      corpus.runs(docs),
      seq_len=data_cfg.seq_len,
      eos_id=tokenizer.eos_id,
      pad_id=tokenizer.pad_id,
    )

  return windows(train_docs), (windows(val_docs) if len(val_docs) else None)


def train_dataset(
  windows: PackedWindows, *, seed: int, local_batch: int, process_index: int, process_count: int
) -> grain.MapDataset:
  """This process's infinite dataset of local batches (element s = its rows of step s)."""
  ds = grain.MapDataset.source(windows).shuffle(seed=split_lib.shuffle_seed(seed)).repeat()
  return ds.batch(local_batch, drop_remainder=True)[process_index::process_count]


def _allow_worker_processes() -> None:
  # grain's worker processes read absl flags; a library caller may not have parsed any.
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _exit_with_parent(parent_pid: int, worker_index: int, worker_count: int) -> None:
  """grain worker init: a daemon thread ends this worker once `parent_pid` (the trainer that
  spawned it) is gone, seen as this process being re-parented. Without it a SIGKILLed trainer
  leaves its workers (and spawn's resource tracker) running, each holding its memory.
  PR_SET_PDEATHSIG is not used: it fires when the spawning *thread* exits, and grain starts
  workers from short-lived threads."""
  del worker_index, worker_count

  def watch():
    while os.getppid() == parent_pid:
      time.sleep(PARENT_POLL_S)
    os._exit(1)  # pylint: disable=protected-access

  threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def train_iterator(
  data_cfg,
  tokenizer: Tokenizer,
  *,
  global_batch: int,
  process_index: int = 0,
  process_count: int = 1,
  cache_dir: str,
) -> grain.DatasetIterator:
  """Endless training batches for this process, as a checkpointable grain iterator.

  Yields {"tokens", "segment_ids"}: int32 `[global_batch // process_count, seq_len + 1]`.
  `get_state()`/`set_state()` (or `grain.checkpoint.CheckpointSave/Restore`) resume it.
  `data.worker_count > 0` reads in that many grain worker processes (same batches).
  """
  local = local_batch_size(global_batch, process_index, process_count)
  if data_cfg.source == prepared_lib.SOURCE:
    ds = prepared_lib.train_dataset(
      data_cfg,
      tokenizer,
      local_batch=local,
      process_index=process_index,
      process_count=process_count,
      cache_dir=cache_dir,
    )
  else:
    train, _ = split_windows(data_cfg, tokenizer, cache_dir=cache_dir)
    ds = train_dataset(
      train,
      seed=data_cfg.seed,
      local_batch=local,
      process_index=process_index,
      process_count=process_count,
    )
  iter_ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=PREFETCH_BATCHES)
  )
  workers = int(data_cfg.worker_count)
  if workers < 0:
    raise ValueError(f"data.worker_count={workers} must be >= 0; set --config.data.worker_count")
  if workers:
    _allow_worker_processes()
    iter_ds = iter_ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=workers),
      worker_init_fn=functools.partial(_exit_with_parent, os.getpid()),
    )
  return iter(iter_ds)


def validation_batches(
  data_cfg,
  tokenizer: Tokenizer,
  *,
  batch_size: int,
  num_batches: int,
  process_index: int = 0,
  process_count: int = 1,
  cache_dir: str,
) -> list[dict[str, np.ndarray]]:
  """num_batches fixed validation batches (this process's rows), the same on every call.

  Global batch b holds validation windows `b * batch_size + j` for j < batch_size, in stream
  order, wrapping around when the validation split has fewer windows.
  Each: {"tokens", "segment_ids"} int32 `[batch_size // process_count, seq_len + 1]`.
  """
  local = local_batch_size(batch_size, process_index, process_count)
  if data_cfg.source == prepared_lib.SOURCE:
    val = prepared_lib.validation_windows(data_cfg, tokenizer, cache_dir=cache_dir)
    if val is None:
      raise ValueError(
        "the prepared folders in data.paths hold no validation shards; rerun "
        "their prepare command with --val_shards N (only the manifest is "
        "rewritten) or set --config.train.eval_batches=0"
      )
  else:
    _, val = split_windows(data_cfg, tokenizer, cache_dir=cache_dir)
  if val is None:
    raise ValueError(
      "data.val_fraction=0 leaves no validation documents; set "
      "--config.data.val_fraction > 0 or --config.train.eval_batches=0"
    )
  batches = []
  for b in range(num_batches):
    first = b * batch_size + process_index * local
    rows = [val[(first + j) % len(val)] for j in range(local)]
    batches.append({k: np.stack([r[k] for r in rows]) for k in ("tokens", "segment_ids")})
  return batches
