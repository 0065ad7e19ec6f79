"""Reads a packed inference directory (`export.layout`) into a `nn.packed.PackedLM`.

Loading checks every name, shape and dtype against the config first, then reads each tensor
into a fresh array (the bit-packed formats' layers into one stacked array per tensor:
`nn.packed.PackedParams`, as bit planes for the default 'popcount' method); it never makes
fp32 weights, and imports nothing of training (no orbax, grain or tokenizer libraries).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from mmfree_jax import paths
from mmfree_jax.config import ModelConfig, config_from_dict
from mmfree_jax.data import untrusted
from mmfree_jax.export.layout import (
  CONFIG,
  EMBEDDING_DTYPES,
  F32,
  INT8,
  MANIFEST,
  STORED_DTYPES,
  VERSION,
  WEIGHTS,
  PackedDirError,
  layout,
  linear_shapes,
)
from mmfree_jax.nn import packed
from mmfree_jax.numerics import ternary_packing as packing
from mmfree_jax.numerics.dtypes import acc_dtype


def _read_json(path: str) -> dict:
  if not paths.isfile(path):
    raise PackedDirError(
      f"{path} not found: not a packed directory (write one with "
      "`python -m mmfree_jax.export --workdir W --dst DIR`)"
    )
  try:
    return json.loads(paths.read_bytes(path))
  except (ValueError, RecursionError) as e:  # RecursionError: nested too deeply to parse
    reason = "nested too deeply" if isinstance(e, RecursionError) else e
    raise PackedDirError(
      f"{path} is not valid JSON ({reason}); export the directory again"
    ) from None


def load_config(directory: str):
  """The full config stored with a packed directory, tokenizer paths made absolute."""
  path = paths.join(directory, CONFIG)
  try:
    cfg = config_from_dict(_read_json(path))
  except (KeyError, TypeError) as e:
    raise PackedDirError(f"{path}: not a mmfree_jax config ({e})") from e
  kind, _, arg = cfg.data.tokenizer.partition(":")
  if kind in ("hf", "spm") and arg and arg != "mistral":  # the export stores a relative file
    try:
      file = untrusted.confined_join(
        paths.absolute(directory),
        arg,
        what=f"{path} data.tokenizer",
        fix="export the directory again",
      )
    except ValueError as e:
      raise PackedDirError(str(e)) from None
    with cfg.unlocked():
      cfg.data.tokenizer = f"{kind}:{file}"
  return cfg


def _open(path: str, shown: str):
  """`safe_open(path)` (a local file) for a `with` block (header checks only; tensors are
  read by `_TensorReader`); errors name `shown`, the file the user gave."""
  try:
    return safe_open(path, framework="numpy")
  except (SafetensorError, OSError) as e:
    raise PackedDirError(
      f"cannot read {shown}: {e}. The file is truncated or not safetensors; "
      "export it again (or copy it again, comparing sizes)"
    ) from e


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype, align: int = 64) -> np.ndarray:
  """`np.empty` with `align`-byte aligned data: on CPU `jax.device_put(may_alias=True)` then
  uses it in place (XLA's minimum alignment is 64), where numpy's 16-byte aligned arrays are
  copied (a stacked 2.7B gate_proj: +0.28 GB at load)."""
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(nbytes + align, np.uint8)
  start = -raw.ctypes.data % align
  return raw[start : start + nbytes].view(dtype).reshape(shape)


def _to_device(array: np.ndarray) -> jax.Array:
  return jax.device_put(array, may_alias=True)


class _TensorReader:
  """Reads one tensor at a time from a (validated) safetensors file into a fresh array.

  Plain reads, not safetensors' memory map: the map's touched pages stay resident until the
  file is closed, so loading held the file twice (a 0.82 GB 2.7B peaked at 2.09 GB RSS).
  A truncated file fails on opening, before any tensor is read (safetensors maps lazily)."""

  def __init__(self, path: str, dtypes: dict[str, np.dtype], shown: str):
    self._file = paths.open_file(path, "rb")  # a local file: `load_packed` downloads
    header_len = int.from_bytes(self._file.read(8), "little")
    self._header = json.loads(self._file.read(header_len))
    self._base = 8 + header_len
    self._dtypes = dtypes
    need = self._base + max(
      (e["data_offsets"][1] for k, e in self._header.items() if k != "__metadata__"), default=0
    )
    size = paths.size(path)
    if size < need:
      self._file.close()
      raise PackedDirError(
        f"{shown} is truncated: {size} bytes, its tensors need {need}; export it again"
      )

  def shape(self, name: str) -> list[int]:
    return self._header[name]["shape"]

  def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
    """The tensor `name`, into `out` (a C-contiguous array of its shape and dtype) if given."""
    entry = self._header[name]
    begin, end = entry["data_offsets"]
    if out is None:
      out = _aligned_empty(tuple(entry["shape"]), self._dtypes[name])
    elif out.shape != tuple(entry["shape"]) or out.dtype != self._dtypes[name]:
      raise ValueError(
        f"tensor {name} is {entry['shape']} {self._dtypes[name]}, not {list(out.shape)} {out.dtype}"
      )
    if out.nbytes != end - begin:
      raise ValueError(f"tensor {name} has {end - begin} bytes, its shape needs {out.nbytes}")
    self._file.seek(self._base + begin)
    if self._file.readinto(out.reshape(-1).view(np.uint8)) != out.nbytes:
      raise ValueError(f"tensor {name} is truncated")
    return out

  def read_stacked(self, names: list[str]) -> np.ndarray:
    """Tensors of one shape and dtype stacked on a new leading axis, each read into its slice."""
    first = names[0]
    out = _aligned_empty((len(names),) + tuple(self._header[first]["shape"]), self._dtypes[first])
    for i, name in enumerate(names):
      self.read(name, out[i])
    return out

  def close(self) -> None:
    self._file.close()


# one compile per matrix shape, reused across layers
_packed_to_planes = jax.jit(packing.packed_to_planes, static_argnames=("fmt", "n_in"))


def _read_planes(reader: _TensorReader, names: list[str], fmt: str, n_in: int) -> np.ndarray:
  """Byte-packed codes of one shape (a tensor per layer) → their bit planes stacked
  `[len(names), 2, n_out, words]` uint32, converted a layer at a time (so loading holds one
  layer's codes besides the planes)."""
  shape = tuple(reader.shape(names[0]))
  out = _aligned_empty((len(names), 2, shape[-1], packing.plane_words(n_in)), np.dtype(np.uint32))
  for i, name in enumerate(names):
    out[i] = np.asarray(_packed_to_planes(reader.read(name), fmt=fmt, n_in=n_in))
  return out


def _read_manifest(directory: str, method: str) -> tuple[dict, str]:
  """The manifest and its format, checked against this version and `method`."""
  path = paths.join(directory, MANIFEST)
  if not paths.isfile(path) and any(
    paths.isfile(paths.join(directory, name)) for name in (CONFIG, WEIGHTS)
  ):
    raise PackedDirError(
      f"{path} not found: {directory} is not a packed directory, or one still being written "
      "or whose export failed (packed.json is written last); wait for it or export it again"
    )
  manifest = _read_json(path)
  fmt = manifest.get("format")
  if fmt not in packed.CODE_FORMATS:
    raise PackedDirError(
      f"{path}: unknown packed format {fmt!r}; this version reads {tuple(packed.CODE_FORMATS)}"
    )
  if manifest.get("version") != VERSION:
    raise PackedDirError(
      f"{path}: packed format version {manifest.get('version')!r}, this version reads {VERSION}"
    )
  if method not in packing.MATVEC_METHODS:
    raise PackedDirError(
      f"unknown matvec method {method!r}; choose one of {packing.MATVEC_METHODS}"
    )
  return manifest, fmt


def _check_tensors(
  local: str, path: str, config_path: str, model_cfg, fmt: str
) -> tuple[list, str]:
  """`(expected layout, embedding dtype)` after checking every tensor's name, shape and
  dtype in the local copy `local` of `path` against the config and format; the file is closed
  on every exit."""
  with _open(local, path) as handle:
    names = set(handle.keys())
    dtype_of = lambda name: STORED_DTYPES.get(handle.get_slice(name).get_dtype())
    emb_dtype = dtype_of("embedding") if "embedding" in names else F32
    if emb_dtype not in EMBEDDING_DTYPES.values():
      raise PackedDirError(
        f"{path}: embedding stored as {emb_dtype}; expected one of {sorted(EMBEDDING_DTYPES)}"
      )
    expected = layout(model_cfg, fmt, emb_dtype)
    missing = [n for n, _, _ in expected if n not in names]
    extra = sorted(names - {n for n, _, _ in expected})
    if missing or extra:
      raise PackedDirError(
        f"{path} does not match {config_path}: missing "
        f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
        f"{extra[:5]}{' ...' if len(extra) > 5 else ''}"
      )
    for name, shape, dtype in expected:
      got = tuple(handle.get_slice(name).get_shape())
      if dtype_of(name) != dtype:
        raise PackedDirError(
          f"{path}: tensor {name} is stored as "
          f"{handle.get_slice(name).get_dtype()}, format {fmt!r} needs "
          f"{dtype}"
        )
      if got != tuple(shape):
        raise PackedDirError(
          f"{path}: tensor {name} has shape {got}, but config.json (d_model="
          f"{model_cfg.d_model}, num_layers={model_cfg.num_layers}, vocab_size="
          f"{model_cfg.vocab_size}, intermediate_size={model_cfg.intermediate_size}) and "
          f"format {fmt!r} need {tuple(shape)}: the config and the codes disagree"
        )
  return expected, emb_dtype


def _read_params(
  reader: _TensorReader, model_cfg, fmt: str, method: str, int8_embedding: bool
) -> packed.PackedParams:
  """The tensors of a checked file as `PackedParams` (stacked or per layer, as `fmt` keeps
  them; bit planes where `method` reads them)."""
  read = lambda name: _to_device(reader.read(name))
  lower_bounds = jnp.asarray(reader.read("lower_bounds"), acc_dtype(model_cfg.compute_dtype))
  linear = lambda get, prefix: packed.PackedLinear(
    get(f"{prefix}.codes"), get(f"{prefix}.scale")[..., 0], get(f"{prefix}.norm_scale")
  )

  def block(get, lower_bound):
    return packed.PackedBlock(
      attn_norm=get("attn_norm"),
      i_proj=linear(get, "i_proj"),
      f_proj=linear(get, "f_proj"),
      g_proj=linear(get, "g_proj"),
      o_proj=linear(get, "o_proj"),
      g_norm=get("g_norm"),
      mlp_norm=get("mlp_norm"),
      gate_proj=linear(get, "gate_proj"),
      down_proj=linear(get, "down_proj"),
      lower_bound=lower_bound,
    )

  layers = range(model_cfg.num_layers)
  n_in = {f"{proj}.codes": shape[0] for proj, shape in linear_shapes(model_cfg).items()}
  n_in["lm_head.codes"] = model_cfg.d_model
  planes = packed.holds_planes(fmt, method)

  def stacked(name):
    names = [f"blocks.{l}.{name}" for l in layers]
    if planes and name in n_in:
      return _to_device(_read_planes(reader, names, fmt, n_in[name]))
    return _to_device(reader.read_stacked(names))

  def head(name):
    if planes and name in n_in:
      return _to_device(_read_planes(reader, [name], fmt, n_in[name])[0])
    return read(name)

  if packed.stacked(fmt):  # one [layers, ...] array per tensor (nn.packed.PackedParams)
    blocks = block(stacked, lower_bounds)
  else:
    blocks = tuple(
      block(lambda name, l=l: read(f"blocks.{l}.{name}"), lower_bounds[l]) for l in layers
    )
  return packed.PackedParams(
    read("embedding"),
    blocks,
    read("final_norm"),
    linear(head, "lm_head"),
    read("embedding.scale") if int8_embedding else None,
  )


def load_packed(directory: str, *, method: str = packed.DEFAULT_METHOD):
  """Reads a packed directory. Returns `(PackedLM, config, manifest)`.

  Every tensor's name, shape and dtype is checked against `config.json` and the format before
  any is read; errors name the file. With `method='popcount'` the bit-packed codes are
  converted to bit planes while loading (`nn.packed`).
  """
  manifest, fmt = _read_manifest(directory, method)
  cfg = load_config(directory)
  model_cfg = ModelConfig.from_config(cfg.model)
  config_path = paths.join(directory, CONFIG)
  if model_cfg.kind != "mmfree":
    raise PackedDirError(
      f"{config_path}: model.kind={model_cfg.kind!r}; a packed directory holds a MatMul-free model"
    )
  path = paths.join(directory, WEIGHTS)
  if not paths.isfile(path):
    raise PackedDirError(f"{path} not found: the packed directory is incomplete; export it again")
  with paths.local_copy(path) as local:  # a bucket's file is downloaded once, read locally
    expected, emb_dtype = _check_tensors(local, path, config_path, model_cfg, fmt)
    reader = _TensorReader(local, {n: d for n, _, d in expected}, path)
    try:
      params = _read_params(reader, model_cfg, fmt, method, emb_dtype == INT8)
    except (ValueError, KeyError, OSError) as e:
      raise PackedDirError(f"cannot read {path}: {e}; export it again") from e
    finally:
      reader.close()
  return packed.PackedLM(params, packed.PackedSpec(model_cfg, fmt, method)), cfg, manifest
