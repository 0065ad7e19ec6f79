"""A packed inference directory: write it from a training workdir, read it into a `PackedLM`.

Layout of `DIR` (docs/architecture.md; `python -m mmfree_jax.export`):

    model.safetensors   the tensors below, metadata {"format": <fmt>, "mmfree_jax": "packed/1"}
    config.json         the workdir's full config (data.tokenizer pointing at the copy below)
    packed.json         {"format", "version", "step", "source", "embedding_dtype", "bytes"}
    tokenizer.json | tokenizer.model   the tokenizer, when the config names a file or a BPE

Tensors (L layers, P = every BitLinear: i/f/g/o_proj, gate_proj, down_proj, lm_head):

    embedding                      [vocab, d]          checkpoint dtype (or --embedding_dtype)
    embedding.scale                [vocab]             fp32, only for --embedding_dtype int8:
                                                       row ≈ codes / scale (lossy, opt-in)
    final_norm, lower_bounds       [d], [L, d]          fp32 (the effective forget-gate bounds)
    blocks.<l>.{attn,g,mlp}_norm   [d]                  fp32
    <P>.codes                      uint8 [packed_length(in), out] ('2bit', 'base3') or int8 /
                                   float [in, out]: `nn.packed.FORMATS`
    <P>.scale                      fp32 [1]: max(mean|W|, 1e-5)
    <P>.norm_scale                 fp32 [in]

Export never holds the latent model: each stacked checkpoint leaf is restored alone (orbax
partial restore), quantized layer by layer and written, so the peak is about one leaf (the
largest is gate_proj's `[L, d, 2I]`). Loading checks every name, shape and dtype against the config
first, then reads each tensor into a fresh array (the bit-packed formats' layers into one
stacked array per tensor: `nn.packed.PackedParams`); it never makes fp32 weights.
Both write into a hidden temporary directory renamed at the end (as `mmfree_jax.hf`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from mmfree_jax.config import ModelConfig, config_from_dict
from mmfree_jax.hf import tensors
from mmfree_jax.nn import packed
from mmfree_jax.nn.model import abstract_model
from mmfree_jax.ops import mlgru
from mmfree_jax.ops import ternary_packing as packing
from mmfree_jax.ops.dtypes import acc_dtype

VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
MANIFEST = "packed.json"
EXPORT_FORMATS = ("2bit", "base3", "int8")  # what the CLI offers; loading reads any FORMATS
LAYER_LINEARS = (("attn", "i_proj"), ("attn", "f_proj"), ("attn", "g_proj"), ("attn", "o_proj"),
                 ("mlp", "gate_proj"), ("mlp", "down_proj"))
LAYER_NORMS = {"attn_norm": ("attn_norm", "scale"), "g_norm": ("attn", "g_norm", "scale"),
               "mlp_norm": ("mlp_norm", "scale")}
INT8 = np.dtype(np.int8)
F32 = np.dtype(np.float32)
EMBEDDING_DTYPES = {"float32": F32, "bfloat16": np.dtype(ml_dtypes.bfloat16),
                    "float64": np.dtype(np.float64), "int8": INT8}
_STORED_DTYPES = {**tensors.SAFETENSORS_DTYPES, "U8": np.dtype(np.uint8), "I8": INT8}


class PackedDirError(ValueError):
  """A packed directory (or a request to write one) that cannot be used; names the file."""


# ------------------------------------------------------------------------------ the layout


def code_shape(n_in: int, n_out: int, fmt: str) -> tuple[tuple[int, int], np.dtype]:
  """Shape and dtype of the stored codes of an `[n_in, n_out]` kernel in `fmt`."""
  kind = packed.FORMATS[fmt]
  if kind == packed.PACKED:
    return (packing.packed_length(n_in, fmt), n_out), np.dtype(np.uint8)
  return (n_in, n_out), np.dtype(ml_dtypes.bfloat16 if kind == jnp.bfloat16 else kind)


def _linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
  d, inter = cfg.d_model, cfg.intermediate_size
  return {"i_proj": (d, d), "f_proj": (d, d), "g_proj": (d, d), "o_proj": (d, d),
          "gate_proj": (d, 2 * inter), "down_proj": (inter, d)}


def stat_dtype(cfg: ModelConfig) -> np.dtype:
  """Norm scales, weight scales and lower bounds: fp32 (f64 for a float64 checkpoint)."""
  return np.dtype(np.float64) if cfg.param_dtype == "float64" else F32


def layout(cfg: ModelConfig, fmt: str,
           embedding_dtype: np.dtype) -> list[tuple[str, tuple, np.dtype]]:
  """Every stored tensor `(name, shape, dtype)` in file order: the checkpoint's stacked leaves
  one after another (so export restores each leaf once)."""
  d, layers = cfg.d_model, cfg.num_layers
  stat = stat_dtype(cfg)
  out = [("embedding", (cfg.vocab_size, d), embedding_dtype)]
  if embedding_dtype == INT8:
    out.append(("embedding.scale", (cfg.vocab_size,), stat))
  out += [("final_norm", (d,), stat), ("lower_bounds", (layers, d), stat)]
  for name in LAYER_NORMS:
    out += [(f"blocks.{l}.{name}", (d,), stat) for l in range(layers)]
  linears = [(f"blocks.{l}.{proj}", shape) for proj, shape in _linear_shapes(cfg).items()
             for l in range(layers)] + [("lm_head", (d, cfg.vocab_size))]
  for prefix, (n_in, n_out) in linears:
    shape, dtype = code_shape(n_in, n_out, fmt)
    out += [(f"{prefix}.codes", shape, dtype), (f"{prefix}.scale", (1,), stat),
            (f"{prefix}.norm_scale", (n_in,), stat)]
  return out


# ---------------------------------------------------------------------------------- export


def _tokenizer_files(cfg, tmp: str) -> str | None:
  """Copies (or saves, for a trained BPE) the tokenizer into `tmp`; rewrites data.tokenizer to
  the copy (relative to the directory). Returns the file name or None (`byte`)."""
  from mmfree_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from mmfree_jax.data.cache import default_cache_dir  # pylint: disable=import-outside-toplevel
  from mmfree_jax.data.tokenizer import tokenizer_file  # pylint: disable=import-outside-toplevel
  spec = cfg.data.tokenizer
  kind = spec.partition(":")[0]
  if spec == "byte":
    return None
  if kind == "bpe":  # trained on the corpus and cached: store the trained file itself
    tok = data_lib.tokenizer_from_config(cfg.data, cache_dir=default_cache_dir())
    tok.save(tmp)
    name, new_spec = "tokenizer.json", "hf:tokenizer.json"
  else:
    src = tokenizer_file(spec)
    if src is None:
      raise PackedDirError(f"data.tokenizer={spec!r}: no tokenizer file to store with the model")
    name = "tokenizer.model" if src.endswith(".model") or kind == "spm" else "tokenizer.json"
    shutil.copyfile(src, os.path.join(tmp, name))
    new_spec = ("spm:" if name.endswith(".model") else "hf:") + name
  with cfg.unlocked():
    cfg.data.tokenizer = new_spec
  return name


class _LeafReader:
  """Restores one checkpoint leaf at a time (the latest one asked for stays cached)."""

  def __init__(self, workdir: str, step: int, model_cfg: ModelConfig):
    # pylint: disable-next=import-outside-toplevel
    from mmfree_jax.checkpoint.manager import Checkpointer
    self.checkpointer = Checkpointer(workdir, read_only=True)
    self.step = step
    _, abstract = nnx.split(abstract_model(model_cfg))
    self.abstract = abstract.to_pure_dict()
    self.device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    self.cached: tuple[tuple[str, ...], np.ndarray] | None = None
    self.peak_leaf_bytes = 0

  def get(self, path: tuple[str, ...]) -> np.ndarray:
    if self.cached is not None and self.cached[0] == path:
      return self.cached[1]
    self.cached = None  # drop the previous leaf before reading the next
    node = self.abstract
    for key in path:
      node = node[key]
    sub: dict = {}
    cursor = sub
    for key in path[:-1]:
      cursor = cursor.setdefault(key, {})
    cursor[path[-1]] = jax.ShapeDtypeStruct(node.shape, node.dtype, sharding=self.device)
    restored = self.checkpointer.restore_params(self.step, sub)
    for key in path:
      restored = restored[key]
    value = np.asarray(jax.device_get(restored))
    self.peak_leaf_bytes = max(self.peak_leaf_bytes, value.nbytes)
    self.cached = (path, value)
    return value

  def close(self):
    self.cached = None
    self.checkpointer.close()


def _producers(reader: _LeafReader, cfg: ModelConfig, fmt: str,
               embedding_dtype: np.dtype) -> dict[str, Callable[[], np.ndarray]]:
  """name → function making that tensor from the checkpoint (called in `layout` order)."""
  stat = stat_dtype(cfg)
  f32 = lambda path, index=None: lambda: np.asarray(
      reader.get(path) if index is None else reader.get(path)[index], stat)
  embedding_scale: list[np.ndarray] = []

  def embedding():
    table = reader.get(("embedding",))
    if embedding_dtype != INT8:
      return np.asarray(table, embedding_dtype)
    codes, scale = packed.quantize_embedding(jnp.asarray(table))
    embedding_scale.append(np.asarray(scale, stat))
    return np.asarray(codes)

  out = {"embedding": embedding, "embedding.scale": lambda: embedding_scale.pop(),
         "final_norm": f32(("final_norm", "scale"))}

  def lower_bounds():
    if not cfg.use_lower_bound:
      return np.zeros((cfg.num_layers, cfg.d_model), stat)
    bounds = mlgru.layer_lower_bounds(jnp.asarray(reader.get(("lower_bounds",))),
                                      cfg.compute_dtype)
    return np.asarray(bounds, stat)

  out["lower_bounds"] = lower_bounds
  for name, path in LAYER_NORMS.items():
    for l in range(cfg.num_layers):
      out[f"blocks.{l}.{name}"] = f32(("blocks",) + path, l)
  scales: dict[str, np.ndarray] = {}

  def codes(prefix, path, index):
    def produce():
      kernel = reader.get(path + ("kernel",))
      kernel = kernel if index is None else kernel[index]
      w, scale = packed.pack_kernel(jnp.asarray(kernel), fmt)
      scales[prefix] = np.asarray(scale, stat).reshape(1)
      w = np.asarray(w)
      return w.astype(ml_dtypes.bfloat16) if w.dtype == jnp.bfloat16 else w
    return produce

  linears = [(f"blocks.{l}.{proj}", ("blocks", group, proj), l)
             for group, proj in LAYER_LINEARS for l in range(cfg.num_layers)]
  for prefix, path, index in linears + [("lm_head", ("lm_head",), None)]:
    out[f"{prefix}.codes"] = codes(prefix, path, index)
    out[f"{prefix}.scale"] = lambda prefix=prefix: scales.pop(prefix)
    out[f"{prefix}.norm_scale"] = f32(path + ("norm_scale",), index)
  return out


def export_workdir(workdir: str, dst: str, *, fmt: str = "2bit", step: int | None = None,
                   embedding_dtype: str | None = None) -> dict:
  """Writes the packed directory of a MatMul-free workdir's checkpoint.

  Args:
    workdir: a training or import workdir (config.json + checkpoints/).
    dst: destination folder; must not exist or be empty.
    fmt: '2bit', 'base3' or 'int8' (also the float code formats of `nn.packed.FORMATS`).
    step: checkpoint step (default: the latest).
    embedding_dtype: dtype of the stored embedding (default: the checkpoint's param dtype;
      'bfloat16' halves its bytes, as the released models store it; 'int8' stores per-row
      absmax codes and scales, a quarter of fp32, and is the one lossy choice).
  Returns:
    a summary: dst, step, format, bytes of model.safetensors, peak restored leaf bytes.
  """
  # pylint: disable=import-outside-toplevel
  from mmfree_jax.checkpoint import loading
  from mmfree_jax.checkpoint.manager import Checkpointer, CheckpointError, check_compatible
  from mmfree_jax.hf.convert import check_destination
  # pylint: enable=import-outside-toplevel
  if fmt not in packed.FORMATS:
    raise PackedDirError(f"unknown packed format {fmt!r}; choose one of {EXPORT_FORMATS}")
  cfg = loading.load_workdir_config(workdir)
  model_cfg = ModelConfig.from_config(cfg.model)
  if model_cfg.kind != "mmfree":
    raise PackedDirError(
        f"{workdir} holds a model.kind={model_cfg.kind!r} model: it has no ternary BitLinear "
        "layers to pack. Only MatMul-free (kind='mmfree') workdirs export to packed formats; "
        "use `python -m mmfree_jax.hf export` for full-precision weights")
  emb_name = embedding_dtype or model_cfg.param_dtype
  if emb_name not in EMBEDDING_DTYPES:
    raise PackedDirError(f"unknown embedding dtype {emb_name!r}; choose one of "
                         f"{sorted(EMBEDDING_DTYPES)}")
  emb_dtype = EMBEDDING_DTYPES[emb_name]
  dst = check_destination(dst)
  checkpointer = Checkpointer(workdir, read_only=True)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise CheckpointError(f"no checkpoint in {checkpointer.directory}; train first")
    step = max(steps) if step is None else step
    if step not in steps:
      raise CheckpointError(f"no checkpoint step {step} in {checkpointer.directory}; "
                            f"available: {steps}")
    check_compatible(checkpointer.read_config(step), cfg.model.to_dict(),
                     checkpointer.directory)
  finally:
    checkpointer.close()
  x64 = model_cfg.param_dtype == "float64"
  reader = _LeafReader(workdir, step, model_cfg)
  try:
    with jax.enable_x64(True) if x64 else contextlib.nullcontext():
      manifest = write_packed(dst, cfg, fmt, _producers(reader, model_cfg, fmt, emb_dtype),
                              embedding_dtype=emb_name, step=step,
                              source=os.path.abspath(workdir))
  finally:
    reader.close()
  return dict(manifest, dst=dst, peak_leaf_bytes=reader.peak_leaf_bytes)


def write_packed(dst: str, cfg, fmt: str, produce: dict[str, Callable[[], np.ndarray]], *,
                 embedding_dtype: str, step: int | None, source: str) -> dict:
  """Writes a packed directory (staged, renamed at the end) from a full config and one
  producer per `layout` tensor, called in file order. Returns the manifest."""
  from mmfree_jax.hf.convert import staged_directory  # pylint: disable=import-outside-toplevel
  model_cfg = ModelConfig.from_config(cfg.model)
  emb_dtype = EMBEDDING_DTYPES[embedding_dtype]
  cfg = config_from_dict(json.loads(cfg.to_json()))  # a copy: the tokenizer moves
  with staged_directory(dst) as tmp:
    tok_name = _tokenizer_files(cfg, tmp)
    entries = [(name, shape, dtype, produce[name])
               for name, shape, dtype in layout(model_cfg, fmt, emb_dtype)]
    nbytes = tensors.write_safetensors(os.path.join(tmp, WEIGHTS), entries, metadata={
        "format": fmt, "mmfree_jax": f"packed/{VERSION}"})
    with open(os.path.join(tmp, CONFIG), "w") as f:
      f.write(cfg.to_json(indent=2))
    manifest = {"format": fmt, "version": VERSION, "step": step, "source": source,
                "embedding_dtype": embedding_dtype, "bytes": nbytes, "tokenizer": tok_name}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=2)
  return manifest


# ------------------------------------------------------------------------------------ load


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise PackedDirError(f"{path} not found: not a packed directory (write one with "
                         "`python -m mmfree_jax.export --workdir W --dst DIR`)")
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise PackedDirError(f"{path} is not valid JSON ({e}); export the directory again") from e


def load_config(directory: str):
  """The full config stored with a packed directory, tokenizer paths made absolute."""
  path = os.path.join(directory, CONFIG)
  try:
    cfg = config_from_dict(_read_json(path))
  except (KeyError, TypeError) as e:
    raise PackedDirError(f"{path}: not a mmfree_jax config ({e})") from e
  kind, _, arg = cfg.data.tokenizer.partition(":")
  if kind in ("hf", "spm") and arg and not os.path.isabs(arg):
    with cfg.unlocked():
      cfg.data.tokenizer = f"{kind}:{os.path.join(os.path.abspath(directory), arg)}"
  return cfg


def _open(path: str):
  if not os.path.isfile(path):
    raise PackedDirError(f"{path} not found: the packed directory is incomplete; export it "
                         "again")
  try:
    handle = safe_open(path, framework="numpy")
    handle.__enter__()
  except (SafetensorError, OSError) as e:
    raise PackedDirError(f"cannot read {path}: {e}. The file is truncated or not safetensors; "
                         "export it again (or copy it again, comparing sizes)") from e
  return handle


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype, align: int = 64) -> np.ndarray:
  """`np.empty` with `align`-byte aligned data: on CPU `jax.device_put(may_alias=True)` then
  uses it in place (XLA's minimum alignment is 64), where numpy's 16-byte aligned arrays are
  copied (a stacked 2.7B gate_proj: +0.28 GB at load)."""
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(nbytes + align, np.uint8)
  start = -raw.ctypes.data % align
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def _to_device(array: np.ndarray) -> jax.Array:
  return jax.device_put(array, may_alias=True)


class _TensorReader:
  """Reads one tensor at a time from a (validated) safetensors file into a fresh array.

  Plain reads, not safetensors' memory map: the map's touched pages stay resident until the
  file is closed, so loading held the file twice (a 0.82 GB 2.7B peaked at 2.09 GB RSS).
  A truncated file fails on opening, before any tensor is read (safetensors maps lazily)."""

  def __init__(self, path: str, dtypes: dict[str, np.dtype]):
    self._file = open(path, "rb")  # pylint: disable=consider-using-with
    header_len = int.from_bytes(self._file.read(8), "little")
    self._header = json.loads(self._file.read(header_len))
    self._base = 8 + header_len
    self._dtypes = dtypes
    need = self._base + max((e["data_offsets"][1] for k, e in self._header.items()
                             if k != "__metadata__"), default=0)
    size = os.fstat(self._file.fileno()).st_size
    if size < need:
      self._file.close()
      raise PackedDirError(f"{path} is truncated: {size} bytes, its tensors need {need}; "
                           "export it again")

  def shape(self, name: str) -> list[int]:
    return self._header[name]["shape"]

  def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
    """The tensor `name`, into `out` (a C-contiguous array of its shape and dtype) if given."""
    entry = self._header[name]
    begin, end = entry["data_offsets"]
    if out is None:
      out = _aligned_empty(tuple(entry["shape"]), self._dtypes[name])
    elif out.shape != tuple(entry["shape"]) or out.dtype != self._dtypes[name]:
      raise ValueError(f"tensor {name} is {entry['shape']} {self._dtypes[name]}, not "
                       f"{list(out.shape)} {out.dtype}")
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
  out = _aligned_empty((len(names), 2, shape[-1], packing.plane_words(n_in)),
                       np.dtype(np.uint32))
  for i, name in enumerate(names):
    out[i] = np.asarray(_packed_to_planes(reader.read(name), fmt=fmt, n_in=n_in))
  return out


def load_packed(directory: str, *, method: str = packed.DEFAULT_METHOD):
  """Reads a packed directory. Returns `(PackedLM, config, manifest)`.

  Every tensor's name, shape and dtype is checked against `config.json` and the format before
  any is read; errors name the file. With `method='popcount'` the bit-packed codes are
  converted to bit planes while loading (`nn.packed`).
  """
  manifest = _read_json(os.path.join(directory, MANIFEST))
  fmt = manifest.get("format")
  if fmt not in packed.FORMATS:
    raise PackedDirError(f"{os.path.join(directory, MANIFEST)}: unknown packed format {fmt!r}; "
                         f"this version reads {tuple(packed.FORMATS)}")
  if manifest.get("version") != VERSION:
    raise PackedDirError(f"{os.path.join(directory, MANIFEST)}: packed format version "
                         f"{manifest.get('version')!r}, this version reads {VERSION}")
  if method not in packing.MATVEC_METHODS:
    raise PackedDirError(f"unknown matvec method {method!r}; choose one of "
                         f"{packing.MATVEC_METHODS}")
  cfg = load_config(directory)
  model_cfg = ModelConfig.from_config(cfg.model)
  if model_cfg.kind != "mmfree":
    raise PackedDirError(f"{os.path.join(directory, CONFIG)}: model.kind={model_cfg.kind!r}; "
                         "a packed directory holds a MatMul-free model")
  path = os.path.join(directory, WEIGHTS)
  handle = _open(path)
  names = set(handle.keys())
  dtype_of = lambda name: _STORED_DTYPES.get(handle.get_slice(name).get_dtype())
  emb_dtype = dtype_of("embedding") if "embedding" in names else F32
  if emb_dtype not in EMBEDDING_DTYPES.values():
    raise PackedDirError(f"{path}: embedding stored as {emb_dtype}; expected one of "
                         f"{sorted(EMBEDDING_DTYPES)}")
  expected = layout(model_cfg, fmt, emb_dtype)
  missing = [n for n, _, _ in expected if n not in names]
  extra = sorted(names - {n for n, _, _ in expected})
  if missing or extra:
    raise PackedDirError(f"{path} does not match {os.path.join(directory, CONFIG)}: missing "
                         f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
                         f"{extra[:5]}{' ...' if len(extra) > 5 else ''}")
  for name, shape, dtype in expected:
    got = tuple(handle.get_slice(name).get_shape())
    if dtype_of(name) != dtype:
      raise PackedDirError(f"{path}: tensor {name} is stored as "
                           f"{handle.get_slice(name).get_dtype()}, format {fmt!r} needs {dtype}")
    if got != tuple(shape):
      raise PackedDirError(
          f"{path}: tensor {name} has shape {got}, but config.json (d_model="
          f"{model_cfg.d_model}, num_layers={model_cfg.num_layers}, vocab_size="
          f"{model_cfg.vocab_size}, intermediate_size={model_cfg.intermediate_size}) and "
          f"format {fmt!r} need {tuple(shape)}: the config and the codes disagree")
  handle.__exit__(None, None, None)
  reader = _TensorReader(path, {n: d for n, _, d in expected})
  try:
    read = lambda name: _to_device(reader.read(name))
    lower_bounds = jnp.asarray(reader.read("lower_bounds"), acc_dtype(model_cfg.compute_dtype))
    linear = lambda get, prefix: packed.PackedLinear(
        get(f"{prefix}.codes"), get(f"{prefix}.scale")[..., 0], get(f"{prefix}.norm_scale"))

    def block(get, lower_bound):
      return packed.PackedBlock(
          attn_norm=get("attn_norm"), i_proj=linear(get, "i_proj"), f_proj=linear(get, "f_proj"),
          g_proj=linear(get, "g_proj"), o_proj=linear(get, "o_proj"), g_norm=get("g_norm"),
          mlp_norm=get("mlp_norm"), gate_proj=linear(get, "gate_proj"),
          down_proj=linear(get, "down_proj"), lower_bound=lower_bound)

    layers = range(model_cfg.num_layers)
    n_in = {f"{proj}.codes": shape[0] for proj, shape in _linear_shapes(model_cfg).items()}
    n_in["lm_head.codes"] = model_cfg.d_model
    planes = method == "popcount" and packed.stacked(fmt)

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
      blocks = tuple(block(lambda name, l=l: read(f"blocks.{l}.{name}"), lower_bounds[l])
                     for l in layers)
    params = packed.PackedParams(
        read("embedding"), blocks, read("final_norm"), linear(head, "lm_head"),
        read("embedding.scale") if emb_dtype == INT8 else None)
  except (ValueError, KeyError, OSError) as e:
    raise PackedDirError(f"cannot read {path}: {e}; export it again") from e
  finally:
    reader.close()
  return packed.PackedLM(params, packed.PackedSpec(model_cfg, fmt, method)), cfg, manifest
