"""Train/validation split by document, deterministic from `data.seed` and `data.val_fraction`."""

from __future__ import annotations

import numpy as np

_SPLIT_STREAM = 1  # seed stream ids: the split and the shuffle draw from different streams
_SHUFFLE_STREAM = 2


def derived_seed(seed: int, stream: int) -> int:
  """A 32-bit seed for one use of `data.seed` (neighbouring seeds give unrelated streams)."""
  return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def num_validation_documents(num_docs: int, val_fraction: float) -> int:
  """round(val_fraction * num_docs), at least 1 when val_fraction > 0, leaving >= 1 to train."""
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(
      f"data.val_fraction={val_fraction} must be in [0, 1); set --config.data.val_fraction"
    )
  if val_fraction == 0.0:
    return 0
  if num_docs < 2:
    raise ValueError(
      f"the corpus has {num_docs} document(s): too few to hold out a "
      "validation document; add documents or set --config.data.val_fraction=0"
    )
  return min(max(1, round(val_fraction * num_docs)), num_docs - 1)


def split_documents(num_docs: int, val_fraction: float, seed: int):
  """(train ids, validation ids): sorted int64 arrays partitioning `range(num_docs)`.

  The validation documents are a uniformly random subset drawn from seed.
  """
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"data.seed={seed!r} must be a non-negative int; set --config.data.seed")
  n_val = num_validation_documents(num_docs, val_fraction)
  rng = np.random.default_rng(derived_seed(seed, _SPLIT_STREAM))
  is_val = np.zeros(num_docs, bool)
  is_val[rng.choice(num_docs, size=n_val, replace=False)] = True
  return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def shuffle_seed(seed: int) -> int:
  """The grain shuffle seed for `data.seed` (grain adds the epoch number to it)."""
  return derived_seed(seed, _SHUFFLE_STREAM)
