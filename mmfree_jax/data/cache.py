"""Where tokenizer and corpus caches live: `$MMFREE_CACHE`, else `~/.cache/mmfree_jax`."""

from __future__ import annotations

import os


def default_cache_dir() -> str:
  return os.environ.get(
    "MMFREE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mmfree_jax")
  )
