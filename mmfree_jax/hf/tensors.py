"""Reading HF weight files tensor by tensor, and a streaming safetensors writer.

Readers never load a whole file: safetensors shards are memory-mapped by `safe_open` and
`read(name)` returns one tensor as a numpy array. `pytorch_model.bin` is a pickle; it is read
only with `torch.load(weights_only=True, mmap=True)` when torch is importable.

The writer emits the safetensors format directly (8-byte little-endian header length, JSON
header with dtype/shape/data_offsets, raw little-endian bytes), one tensor at a time, so an
export never holds a second full copy of the model.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from typing import Callable, Iterable

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from mmfree_jax import paths
from mmfree_jax.data import untrusted
from mmfree_jax.hf.mapping import HFCheckpointError

SAFETENSORS_DTYPES = {
  "F64": np.dtype(np.float64),
  "F32": np.dtype(np.float32),
  "F16": np.dtype(np.float16),
  "BF16": np.dtype(ml_dtypes.bfloat16),
}
SAFETENSORS_NAME = {v: k for k, v in SAFETENSORS_DTYPES.items()}
# Integer tensors are written (packed ternary codes, `mmfree_jax.export`), never imported.
SAFETENSORS_NAME.update({np.dtype(np.uint8): "U8", np.dtype(np.int8): "I8"})
# The dtypes an import or export may be asked for (`--dtype`).
NUMPY_DTYPES = {
  "float32": np.dtype(np.float32),
  "float64": np.dtype(np.float64),
  "bfloat16": np.dtype(ml_dtypes.bfloat16),
  "float16": np.dtype(np.float16),
}
SINGLE_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"

TORCH_SAFE_ROUTE = (
  "Convert it to safetensors once, on a machine that has torch:\n"
  "  python -c \"import torch; from safetensors.torch import save_file; "
  "sd = torch.load('pytorch_model.bin', map_location='cpu', weights_only=True); "
  "save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors', "
  "metadata={'format': 'pt'})\"\n"
  "(or download the repository's model.safetensors; never unpickle untrusted files without "
  "weights_only=True)"
)


class _SafetensorsShard:
  """One memory-mapped `.safetensors` file."""

  def __init__(self, path: str):
    self.path = path
    try:
      self._file = safe_open(path, framework="numpy")
      self._file.__enter__()
    except (SafetensorError, OSError) as e:
      raise HFCheckpointError(
        f"cannot read {path}: {e}. The file is truncated or not safetensors; download it "
        "again (compare its size with the repository's)"
      ) from e

  def names(self) -> list[str]:
    return list(self._file.keys())

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._file.get_slice(name).get_shape())

  def dtype_name(self, name: str) -> str:
    return self._file.get_slice(name).get_dtype()

  def read(self, name: str) -> np.ndarray:
    """The tensor as stored (torch layout, stored dtype; bf16 as ml_dtypes.bfloat16)."""
    return self._file.get_tensor(name)

  def close(self) -> None:
    self._file.__exit__(None, None, None)


def _import_torch():
  """torch, or HFCheckpointError explaining the safe route when it is not installed."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise HFCheckpointError(
      "this checkpoint is a pytorch_model.bin (a pickle); reading it needs torch, which is "
      "not installed here, and we will not unpickle it without torch.load(weights_only=True)."
      " " + TORCH_SAFE_ROUTE
    ) from None
  return torch


class _TorchShard:
  """One `pytorch_model.bin`, loaded with `torch.load(weights_only=True, mmap=True)`."""

  def __init__(self, path: str):
    torch = _import_torch()
    self.path = path
    self._torch = torch
    try:
      self._tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, ...)
      raise HFCheckpointError(
        f"torch.load(weights_only=True) could not read {path}: {e}. " + TORCH_SAFE_ROUTE
      ) from e

  def names(self) -> list[str]:
    return list(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._tensors[name].shape)

  def dtype_name(self, name: str) -> str:
    names = {
      "torch.float64": "F64",
      "torch.float32": "F32",
      "torch.float16": "F16",
      "torch.bfloat16": "BF16",
    }
    return names.get(str(self._tensors[name].dtype), str(self._tensors[name].dtype))

  def read(self, name: str) -> np.ndarray:
    tensor = self._tensors[name].detach().cpu()
    if tensor.dtype == self._torch.bfloat16:  # numpy has no bf16: reinterpret the bits
      return tensor.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()

  def close(self) -> None:
    self._tensors = None


def _open_shard(path: str):
  if path.endswith(".safetensors"):
    return _SafetensorsShard(path)
  return _TorchShard(path)


class WeightFiles:
  """All weight tensors of an HF folder, by name, read one at a time.

  Use as a context manager; `names`, `shape(name)`, `dtype_name(name)`, `read(name)`.
  """

  def __init__(self, shards: list, where: dict[str, object], description: str):
    self._shards = shards
    self._where = where  # tensor name -> shard
    self.description = description
    self.allow_nonfinite = False  # read() refuses NaN/inf unless set (open_weights' flag)
    self.local_copy: str | None = None  # a bucket folder's downloaded files, removed on close

  @property
  def names(self) -> list[str]:
    return list(self._where)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._where[name].shape(name)

  def dtype_name(self, name: str) -> str:
    return self._where[name].dtype_name(name)

  def file_of(self, name: str) -> str:
    return paths.basename(self._where[name].path)

  def read(self, name: str) -> np.ndarray:
    """The tensor `name` as stored; a NaN or inf in it is an HFCheckpointError unless
    `allow_nonfinite` (a model imported with one computes NaN losses and perplexities)."""
    tensor = self._where[name].read(name)
    if not self.allow_nonfinite:
      bad = int(tensor.size - np.count_nonzero(np.isfinite(tensor)))
      if bad:
        raise HFCheckpointError(
          f"{name} in {self.file_of(name)} holds {bad} non-finite value(s) (NaN/inf) of "
          f"{tensor.size}: a damaged download or a diverged run; re-download it, or import "
          "it anyway with --allow_nonfinite (allow_nonfinite=True)"
        )
    return tensor

  def close(self) -> None:
    for shard in self._shards:
      shard.close()
    if self.local_copy is not None:
      shutil.rmtree(self.local_copy, ignore_errors=True)
      self.local_copy = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def open_weights(folder: str, *, allow_nonfinite: bool = False) -> WeightFiles:
  """Opens `model.safetensors`, or the shards of `model.safetensors.index.json`, or (torch
  only) `pytorch_model.bin` / its index, in that order of preference. Reading a tensor with a
  NaN or inf fails unless allow_nonfinite. A `gs://`/`s3://` folder's weight files are
  downloaded to a local temporary folder first (safetensors and torch map local files only),
  removed when the returned `WeightFiles` closes."""
  for single, index in ((SINGLE_FILE, SAFETENSORS_INDEX), (TORCH_FILE, TORCH_INDEX)):
    if paths.is_remote(folder) and paths.isfile(paths.join(folder, single)):
      weights = _open_downloaded(folder, [single])
    elif paths.is_remote(folder) and paths.isfile(paths.join(folder, index)):
      weights = _open_downloaded(folder, [index, *_index_files(folder, index)])
    elif paths.isfile(paths.join(folder, single)):
      weights = _open_single(paths.join(folder, single))
    elif paths.isfile(paths.join(folder, index)):
      weights = _open_index(folder, index)
    else:
      continue
    weights.allow_nonfinite = allow_nonfinite
    return weights
  present = paths.listdir(folder) if paths.isdir(folder) else "(folder does not exist)"
  raise HFCheckpointError(
    f"no weights in {folder}: expected {SINGLE_FILE}, or {SAFETENSORS_INDEX} with its "
    f"shards (or {TORCH_FILE}, read only when torch is installed). Found: {present}. "
    "Download the model's weights into that folder"
  )


def _index_files(folder: str, index_name: str) -> list[str]:
  """The shard names an index lists that lie inside `folder` (what to download; `_open_index`
  then checks the index in full and names any problem)."""
  index_path = paths.join(folder, index_name)
  try:
    weight_map = untrusted.load_json(index_path, what="an HF weight index", fix="re-download it")
    names = sorted({v for v in weight_map["weight_map"].values() if isinstance(v, str)})
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return []  # `_open_index` reports it
  inside = []
  for name in names:
    try:
      untrusted.confined_join(folder, name, what="", fix="")
    except ValueError:
      continue
    if paths.isfile(paths.join(folder, name)):
      inside.append(name)
  return inside


def _open_downloaded(folder: str, names: list[str]) -> WeightFiles:
  """Opens the files `names` of the bucket folder `folder` from a local download; errors name
  the bucket's paths."""
  tmp = tempfile.mkdtemp(prefix="mmfree-hf-")
  try:
    for name in names:
      local = paths.join(tmp, *name.split("/"))
      paths.makedirs(paths.dirname(local))
      with paths.open_file(paths.join(folder, name), "rb") as src:
        with paths.open_file(local, "wb") as dst:
          shutil.copyfileobj(src, dst, 16 << 20)
    try:
      if len(names) == 1:
        weights = _open_single(paths.join(tmp, names[0]))
      else:
        weights = _open_index(tmp, names[0])
    except HFCheckpointError as e:
      raise HFCheckpointError(str(e).replace(tmp, folder)) from None
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  weights.description = weights.description.replace(tmp, folder)
  weights.local_copy = tmp
  return weights


def _open_single(path: str) -> WeightFiles:
  shard = _open_shard(path)
  return WeightFiles([shard], {n: shard for n in shard.names()}, path)


def _open_index(folder: str, index_name: str) -> WeightFiles:
  """Opens every shard the index names and checks that each holds the tensors listed for it."""
  index_path = paths.join(folder, index_name)
  fix = "re-download the index"
  try:
    weight_map = untrusted.load_json(index_path, what="an HF weight index", fix=fix)
    weight_map = weight_map["weight_map"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise HFCheckpointError(f"cannot read the weight_map of {index_path}: {e}") from None
  if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
    raise HFCheckpointError(
      f"{index_path}: weight_map is not an object of tensor name -> shard file name; {fix}"
    )
  files = sorted(set(weight_map.values()))
  try:
    shard_paths = {
      name: untrusted.confined_join(folder, name, what=f"{index_path} weight_map", fix=fix)
      for name in files
    }
  except ValueError as e:
    raise HFCheckpointError(str(e)) from None
  absent = [name for name in files if not paths.isfile(shard_paths[name])]
  if absent:
    raise HFCheckpointError(
      f"{index_path} references shards missing from {folder}: {absent}. "
      "Download all shards listed in the index"
    )
  shards = {}
  try:
    for name in files:
      shards[name] = _open_shard(shard_paths[name])
    held = {name: set(shard.names()) for name, shard in shards.items()}
    where = {}
    for tensor, name in weight_map.items():
      if tensor not in held[name]:
        raise HFCheckpointError(
          f"{index_path} says {tensor!r} is in {name}, but {name} does "
          "not hold it: the shard and the index disagree (re-download)"
        )
      where[tensor] = shards[name]
  except BaseException:
    for shard in shards.values():
      shard.close()
    raise
  return WeightFiles(list(shards.values()), where, index_path)


# ---------------------------------------------------------------------------------- writing


def safetensors_header(
  tensors: Iterable[tuple[str, tuple[int, ...], np.dtype]], metadata: dict[str, str] | None = None
) -> bytes:
  """The length-prefixed JSON header for tensors laid out back to back in the given order.

  Returns `8-byte little-endian length + JSON`, the JSON padded with spaces to a multiple of 8
  bytes so that the data section is aligned (as the safetensors library writes it).
  """
  header: dict = {"__metadata__": dict(metadata)} if metadata else {}
  offset = 0
  for name, shape, dtype in tensors:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {
      "dtype": SAFETENSORS_NAME[np.dtype(dtype)],
      "shape": list(shape),
      "data_offsets": [offset, offset + nbytes],
    }
    offset += nbytes
  encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
  encoded += b" " * (-len(encoded) % 8)
  return struct.pack("<Q", len(encoded)) + encoded


def write_safetensors(
  path: str,
  tensors: list[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
  metadata: dict[str, str] | None = None,
) -> int:
  """Writes a safetensors file tensor by tensor.

  Args:
    path: output file (local or a bucket path: `mmfree_jax.paths`).
    tensors: `(name, shape, dtype, produce)`; `produce()` returns that tensor as a numpy
      array of exactly that shape and dtype. It is called once, in order, right before its
      bytes are written, so at most one produced tensor is alive at a time.
    metadata: string key/values for `__metadata__` (HF wants `{"format": "pt"}`).
  Returns:
    the number of bytes written.
  """
  with paths.open_file(path, "wb") as f:
    f.write(safetensors_header([(n, s, d) for n, s, d, _ in tensors], metadata))
    for name, shape, dtype, produce in tensors:
      array = np.ascontiguousarray(produce())
      if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
        raise AssertionError(
          f"{name}: produced {array.shape} {array.dtype}, header says "
          f"{tuple(shape)} {np.dtype(dtype)}"
        )
      if array.dtype.byteorder == ">":
        array = array.byteswap().view(array.dtype.newbyteorder("<"))
      f.write(memoryview(array.reshape(-1).view(np.uint8)))
      del array
    return f.tell()


def read_hf_config(src: str) -> dict:
  """The `config.json` of an HF model folder, as a dict (jax-free: the CLI reads it first)."""
  path = paths.join(src, "config.json")
  if not paths.isfile(path) and any(
    paths.isfile(paths.join(src, name)) for name in (SINGLE_FILE, SAFETENSORS_INDEX)
  ):
    raise HFCheckpointError(
      f"{path} not found, but {src} holds weights: an HF folder still being written, or whose "
      "export failed (config.json is written last); wait for it, or export or download it again"
    )
  if not paths.isfile(path):
    raise HFCheckpointError(
      f"{path} not found: --src must be an HF model folder holding "
      "config.json and the weights (e.g. a download of ridger/MMfreeLM-370M)"
    )
  try:
    config = untrusted.load_json(
      path, what="an HF model config", fix="re-download the model's config.json"
    )
  except ValueError as e:
    raise HFCheckpointError(str(e)) from None
  if not isinstance(config, dict):
    raise HFCheckpointError(f"{path} must hold a JSON object; got {type(config).__name__}")
  return config
