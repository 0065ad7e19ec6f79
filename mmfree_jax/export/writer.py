"""Writes a packed inference directory (`export.layout`) from a training workdir.

Export never holds the latent model: each stacked checkpoint leaf is restored alone (orbax
partial restore), quantized layer by layer and written, so the peak is about one leaf (the
largest is gate_proj's `[L, d, 2I]`). It writes into a local staging folder published at the
end (`hf.staging.staged_directory`: renamed on a disk; uploaded to a `gs://`/`s3://`
destination with `packed.json`, which readers open first, uploaded last).
"""

from __future__ import annotations

import contextlib
import json
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from mmfree_jax import data as data_lib
from mmfree_jax import paths
from mmfree_jax.checkpoint import loading
from mmfree_jax.checkpoint.manager import Checkpointer, CheckpointError, check_compatible
from mmfree_jax.config import ModelConfig, config_from_dict
from mmfree_jax.data.cache import default_cache_dir
from mmfree_jax.data.tokenizer import tokenizer_file
from mmfree_jax.export.layout import (
  CONFIG,
  EMBEDDING_DTYPES,
  EXPORT_FORMATS,
  INT8,
  LAYER_LINEARS,
  LAYER_NORMS,
  MANIFEST,
  VERSION,
  WEIGHTS,
  PackedDirError,
  layout,
  stat_dtype,
)
from mmfree_jax.hf import tensors
from mmfree_jax.hf.staging import check_destination, staged_directory
from mmfree_jax.nn import packed
from mmfree_jax.nn.model import abstract_model
from mmfree_jax.numerics import mlgru


def _tokenizer_files(cfg, tmp: str) -> str | None:
  """Copies (or saves, for a trained BPE) the tokenizer into `tmp`; rewrites data.tokenizer to
  the copy (relative to the directory). Returns the file name or None (`byte`)."""
  spec = cfg.data.tokenizer
  kind = spec.partition(":")[0]
  if spec in ("byte", ""):  # "": none recorded (an HF import without one): ids only
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
    paths.write_atomic(paths.join(tmp, name), paths.read_bytes(src))
    new_spec = ("spm:" if name.endswith(".model") else "hf:") + name
  with cfg.unlocked():
    cfg.data.tokenizer = new_spec
  return name


class _LeafReader:
  """Restores one checkpoint leaf at a time (the latest one asked for stays cached)."""

  def __init__(self, workdir: str, step: int, model_cfg: ModelConfig):
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


def _producers(
  reader: _LeafReader, cfg: ModelConfig, fmt: str, embedding_dtype: np.dtype
) -> dict[str, Callable[[], np.ndarray]]:
  """name → function making that tensor from the checkpoint (called in `layout` order)."""
  stat = stat_dtype(cfg)
  f32 = lambda path, index=None: (
    lambda: np.asarray(reader.get(path) if index is None else reader.get(path)[index], stat)
  )
  embedding_scale: list[np.ndarray] = []

  def embedding():
    table = reader.get(("embedding",))
    if embedding_dtype != INT8:
      return np.asarray(table, embedding_dtype)
    codes, scale = packed.quantize_embedding(jnp.asarray(table))
    embedding_scale.append(np.asarray(scale, stat))
    return np.asarray(codes)

  out = {
    "embedding": embedding,
    "embedding.scale": lambda: embedding_scale.pop(),
    "final_norm": f32(("final_norm", "scale")),
  }

  def lower_bounds():
    if not cfg.use_lower_bound:
      return np.zeros((cfg.num_layers, cfg.d_model), stat)
    bounds = mlgru.layer_lower_bounds(jnp.asarray(reader.get(("lower_bounds",))), cfg.compute_dtype)
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

  linears = [
    (f"blocks.{l}.{proj}", ("blocks", group, proj), l)
    for group, proj in LAYER_LINEARS
    for l in range(cfg.num_layers)
  ]
  for prefix, path, index in linears + [("lm_head", ("lm_head",), None)]:
    out[f"{prefix}.codes"] = codes(prefix, path, index)
    out[f"{prefix}.scale"] = lambda prefix=prefix: scales.pop(prefix)
    out[f"{prefix}.norm_scale"] = f32(path + ("norm_scale",), index)
  return out


def export_workdir(
  workdir: str,
  dst: str,
  *,
  fmt: str = "2bit",
  step: int | None = None,
  embedding_dtype: str | None = None,
  tokenizer: str | None = None,
) -> dict:
  """Writes the packed directory of a MatMul-free workdir's checkpoint.

  Args:
    workdir: a training or import workdir (config.json + checkpoints/).
    dst: destination folder; must not exist or be empty.
    fmt: '2bit', 'base3' or 'int8' (also the float code formats of `nn.packed.CODE_FORMATS`).
    step: checkpoint step (default: the latest).
    embedding_dtype: dtype of the stored embedding (default: the checkpoint's param dtype;
      'bfloat16' halves its bytes, as the released models store it; 'int8' stores per-row
      absmax codes and scales, a quarter of fp32, and is the one lossy choice).
    tokenizer: a `data.tokenizer` spec to store instead of the workdir's; a workdir that
      records none (an HF import of a folder without a tokenizer file) exports ids-only.
  Returns:
    a summary: dst, step, format, bytes of model.safetensors, peak restored leaf bytes.
  """
  if fmt not in packed.CODE_FORMATS:
    raise PackedDirError(f"unknown packed format {fmt!r}; choose one of {EXPORT_FORMATS}")
  cfg = loading.load_workdir_config(workdir)
  if tokenizer is not None:
    with cfg.unlocked():
      cfg.data.tokenizer = tokenizer
  model_cfg = ModelConfig.from_config(cfg.model)
  if model_cfg.kind != "mmfree":
    raise PackedDirError(
      f"{workdir} holds a model.kind={model_cfg.kind!r} model: it has no ternary BitLinear "
      "layers to pack. Only MatMul-free (kind='mmfree') workdirs export to packed formats; "
      "use `python -m mmfree_jax.hf export` for full-precision weights"
    )
  emb_name = embedding_dtype or model_cfg.param_dtype
  if emb_name not in EMBEDDING_DTYPES:
    raise PackedDirError(
      f"unknown embedding dtype {emb_name!r}; choose one of {sorted(EMBEDDING_DTYPES)}"
    )
  emb_dtype = EMBEDDING_DTYPES[emb_name]
  dst = check_destination(dst)
  checkpointer = Checkpointer(workdir, read_only=True)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise CheckpointError(f"no checkpoint in {checkpointer.directory}; train first")
    step = max(steps) if step is None else step
    if step not in steps:
      raise CheckpointError(
        f"no checkpoint step {step} in {checkpointer.directory}; available: {steps}"
      )
    check_compatible(checkpointer.read_config(step), cfg.model.to_dict(), checkpointer.directory)
  finally:
    checkpointer.close()
  x64 = model_cfg.param_dtype == "float64"
  reader = _LeafReader(workdir, step, model_cfg)
  try:
    with jax.enable_x64(True) if x64 else contextlib.nullcontext():
      manifest = write_packed(
        dst,
        cfg,
        fmt,
        _producers(reader, model_cfg, fmt, emb_dtype),
        embedding_dtype=emb_name,
        step=step,
        source=paths.absolute(workdir),
      )
  finally:
    reader.close()
  return dict(manifest, dst=dst, peak_leaf_bytes=reader.peak_leaf_bytes)


def write_packed(
  dst: str,
  cfg,
  fmt: str,
  produce: dict[str, Callable[[], np.ndarray]],
  *,
  embedding_dtype: str,
  step: int | None,
  source: str,
) -> dict:
  """Writes a packed directory (staged, published at the end, `packed.json` last) from a full
  config and one producer per `layout` tensor, called in file order. Returns the manifest."""
  model_cfg = ModelConfig.from_config(cfg.model)
  emb_dtype = EMBEDDING_DTYPES[embedding_dtype]
  cfg = config_from_dict(json.loads(cfg.to_json()))  # a copy: the tokenizer moves
  with staged_directory(dst, last=(MANIFEST,)) as tmp:
    tok_name = _tokenizer_files(cfg, tmp)
    entries = [
      (name, shape, dtype, produce[name])
      for name, shape, dtype in layout(model_cfg, fmt, emb_dtype)
    ]
    nbytes = tensors.write_safetensors(
      paths.join(tmp, WEIGHTS),
      entries,
      metadata={"format": fmt, "mmfree_jax": f"packed/{VERSION}"},
    )
    paths.write_atomic(paths.join(tmp, CONFIG), cfg.to_json(indent=2))
    manifest = {
      "format": fmt,
      "version": VERSION,
      "step": step,
      "source": source,
      "embedding_dtype": embedding_dtype,
      "bytes": nbytes,
      "tokenizer": tok_name,
    }
    paths.write_atomic(paths.join(tmp, MANIFEST), json.dumps(manifest, indent=2))
  return manifest
