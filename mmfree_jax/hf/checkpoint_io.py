"""Import an HF `hgrn_bit` checkpoint into a workdir, and export a workdir to that layout.

Import: `config.json` → our config; weights (safetensors, sharded safetensors, or torch-only
`pytorch_model.bin`) are checked by name and shape against `NAME_TABLE` before any byte is
read, then read one tensor at a time into our stacked param arrays (one host copy of the
model), kept as latent full-precision weights (never re-quantized: reference issue #18), and
saved as a params-only checkpoint step 0 plus `config.json`. The tokenizer recorded is the one
the folder holds (`tokenizer.model`, else `tokenizer.json`), or `--tokenizer`, or none.

Export: params of a step → `config.json` + `model.safetensors` in the reference key layout, in
the dtype of the weights by default (bit-exact round trip; `--dtype bfloat16` as released),
written tensor by tensor, with the workdir's tokenizer file and its true special ids.

Both write into a hidden temporary directory next to the destination and rename it at the
end, so a failure leaves no half-written destination. A `gs://`/`s3://` destination has no
rename: an export is staged locally and uploaded with `config.json` last (what readers open
first); an import writes the workdir in place, orbax's checkpoint then `config.json` last, and
deletes it on failure. An HF source folder may be in a bucket (its weights are downloaded to a
local temporary folder: safetensors maps local files only).
"""

from __future__ import annotations

import contextlib
import json

import jax
import numpy as np
from flax import nnx

from mmfree_jax import paths
from mmfree_jax.checkpoint import loading
from mmfree_jax.checkpoint.manager import Checkpointer
from mmfree_jax.config import ModelConfig, config_from_dict
from mmfree_jax.data import tokenizer_from_config
from mmfree_jax.data.cache import default_cache_dir
from mmfree_jax.data.tokenizer import load_tokenizer
from mmfree_jax.hf import mapping, tensors
from mmfree_jax.hf.mapping import HFCheckpointError, Slot
from mmfree_jax.hf.staging import (
  check_destination,
  check_workdir_destination,
  staged_directory,
  workdir_destination,
)
from mmfree_jax.nn.model import abstract_model

_SHOWN = 10  # names listed in an error before "... and N more"
# Orbax's cap on bytes serialized at once while an import saves (bounds the host copies); it
# is raised to fit the largest single array, which orbax cannot split.
SAVE_CONCURRENT_GB = 1.0
# Tokenizer files of an HF folder, in the order import looks for them, with their spec kind.
TOKENIZER_FILES = (("tokenizer.model", "spm"), ("tokenizer.json", "hf"))


def numpy_dtype(name: str) -> np.dtype:
  """`float32 | float64 | bfloat16 | float16` → numpy dtype (bf16 from ml_dtypes)."""
  try:
    return tensors.NUMPY_DTYPES[name]
  except KeyError:
    raise HFCheckpointError(
      f"unknown dtype {name!r}; choose one of {sorted(tensors.NUMPY_DTYPES)}"
    ) from None


# ----------------------------------------------------------------------------------- import


def our_shapes(model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """`{dotted param path: shape}` of the model the config describes (nothing allocated)."""
  x64 = model_cfg.param_dtype == "float64"  # else eval_shape warns about f64 → f32
  with jax.enable_x64(True) if x64 else contextlib.nullcontext():
    _, state = nnx.split(abstract_model(model_cfg))
  return {path: tuple(leaf.shape) for path, leaf in mapping.flatten(state.to_pure_dict()).items()}


def _listing(names: list[str]) -> str:
  more = f" ... and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
  return f"{names[:_SHOWN]}{more}"


def check_weights(weights: tensors.WeightFiles, layout: list[Slot], config_note: str) -> None:
  """Names, shapes and dtypes of the stored tensors against the layout; raises on mismatch.

  config_note: the config values the layout came from, quoted in the errors.
  """
  expected = {slot.hf_name: slot for slot in layout}
  present = set(weights.names)
  missing = sorted(set(expected) - present, key=natural_key)
  if missing:
    raise HFCheckpointError(
      f"{weights.description} lacks {len(missing)} tensor(s) that config.json ({config_note}) "
      f"implies: {_listing(missing)}. The weights and config.json disagree, or the download "
      "is incomplete"
    )
  unexpected = sorted(present - set(expected), key=natural_key)
  if unexpected:
    raise HFCheckpointError(
      f"{weights.description} holds {len(unexpected)} tensor(s) that the model of "
      f"config.json ({config_note}) does not have: {_listing(unexpected)}. This variant "
      "(or a config.json that does not match the weights) is not supported"
    )
  for slot in layout:
    shape = weights.shape(slot.hf_name)
    if shape != slot.hf_shape:
      raise HFCheckpointError(
        f"{slot.hf_name} in {weights.file_of(slot.hf_name)} has shape {shape}, but "
        f"config.json ({config_note}) implies {slot.hf_shape}"
      )
    dtype = weights.dtype_name(slot.hf_name)
    if dtype not in tensors.SAFETENSORS_DTYPES:
      raise HFCheckpointError(
        f"{slot.hf_name} is stored as {dtype}; expected latent floating-point weights "
        f"({sorted(tensors.SAFETENSORS_DTYPES)}). Packed/quantized checkpoints are not "
        "supported: export the latent weights"
      )


def natural_key(name: str):
  return [int(part) if part.isdigit() else part for part in name.split(".")]


def read_params(
  weights: tensors.WeightFiles,
  layout: list[Slot],
  shapes: dict[str, tuple[int, ...]],
  dtype: np.dtype,
) -> dict:
  """Our nested param dict of numpy arrays in `dtype`, filled one HF tensor at a time.

  Each HF tensor is read, transposed if it is a Linear weight, cast, and written into its
  layer slice of the preallocated stacked array, then dropped: peak host memory is one copy
  of the model plus one tensor.
  """
  flat = {path: np.empty(shape, dtype) for path, shape in shapes.items()}
  for slot in layout:
    tensor = weights.read(slot.hf_name)  # torch layout, stored dtype
    if slot.transpose:
      tensor = tensor.T
    target = flat[slot.ours] if slot.layer is None else flat[slot.ours][slot.layer]
    target[...] = tensor  # cast to dtype (exact for bf16/f16/f32 → f32/f64)
    del tensor
  return mapping.unflatten(flat)


def to_device_leaf_by_leaf(flat: dict[str, np.ndarray]) -> None:
  """Replaces each numpy leaf of flat by a jax array, in place, freeing the numpy copy as it
  goes (peak: the model plus one leaf). Orbax deep-copies numpy leaves before writing (a
  second full copy); for jax arrays it does not."""
  for path in list(flat):
    flat[path] = jax.device_put(flat.pop(path))


def save_concurrent_gb(params: dict) -> float:
  """`SAVE_CONCURRENT_GB`, or just above the largest array when that is bigger: orbax refuses
  any array over its cap (the 1.3B/2.7B fp32 `gate_proj` stacks are 2.2 GB)."""
  largest = max(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(params))
  return max(SAVE_CONCURRENT_GB, (largest + 1) * 1.01 / 1e9)


def save_params(workdir: str, params: dict, cfg) -> None:
  """Params-only checkpoint step 0 (synchronous) with the full config dict."""
  checkpointer = Checkpointer(
    workdir, keep=1, async_save=False, save_concurrent_gb=save_concurrent_gb(params)
  )
  try:
    checkpointer.save_params(0, params, cfg.to_dict())
  finally:
    checkpointer.close()


def _import_tokenizer(src: str, tmp: str, workdir: str, spec: str | None) -> str:
  """The `data.tokenizer` of an import: `spec` if given, else the folder's tokenizer file
  (copied into the workdir), else '' (none: eval needs --tokenizer)."""
  if spec:
    return spec
  for name, kind in TOKENIZER_FILES:
    if paths.isfile(paths.join(src, name)):
      paths.write_atomic(paths.join(tmp, name), paths.read_bytes(paths.join(src, name)))
      return f"{kind}:{paths.join(workdir, name)}"
  return ""


def _check_special_ids(spec: str, hf_config: dict, tmp: str, workdir: str) -> list[str]:
  """Loads the recorded tokenizer (a bad `--tokenizer` fails here) and notes where
  config.json's bos/eos disagree with it (the tokenizer's ids are what the model uses)."""
  kind, _, path = spec.partition(":")
  if not spec or kind == "bpe":  # bpe: is trained on a corpus, not loadable here
    return []
  if path.startswith(workdir.rstrip("/") + "/"):  # still in the staging folder
    spec = f"{kind}:{paths.join(tmp, path[len(workdir.rstrip('/')) + 1 :])}"
  tok = load_tokenizer(spec, cache_dir=default_cache_dir())
  notes = []
  for key, ours in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id)):
    theirs = hf_config.get(key)
    if theirs is not None and ours is not None and theirs != ours:
      notes.append(
        f"config.json says {key}={theirs} but the tokenizer's is {ours}; the tokenizer's is used"
      )
  return notes


def import_checkpoint(
  src: str,
  workdir: str,
  *,
  dtype: str = "float32",
  tokenizer: str | None = None,
  allow_nonfinite: bool = False,
) -> dict:
  """Converts an HF hgrn_bit folder into a workdir `loading.load_model` can open.

  Args:
    src: folder with `config.json` and `model.safetensors` (or an index and shards, or a
      `pytorch_model.bin` when torch is installed); `tokenizer.model` is copied if present.
    workdir: destination; must not exist or be empty.
    dtype: param (and compute) dtype of the imported model: float32 (default), float64,
      bfloat16 or float16. Weights stay latent full precision in that dtype.
    tokenizer: a `data.tokenizer` spec to record instead of the folder's tokenizer file.
    allow_nonfinite: import tensors holding NaN/inf (refused by default, naming the tensor).
  Returns:
    a summary dict (workdir, num_params, tokenizer ('' = none), notes, model config).
  """
  np_dtype = numpy_dtype(dtype)
  hf_config = tensors.read_hf_config(src)
  model_section = mapping.model_section_from_hf(hf_config, dtype)
  model_cfg = ModelConfig.from_config(model_section)
  shapes = our_shapes(model_cfg)
  layout = list(mapping.slots(shapes, model_cfg.num_layers))
  note = ", ".join(
    f"{k}={hf_config.get(k)}"
    for k in (
      "hidden_size",
      "num_hidden_layers",
      "vocab_size",
      "intermediate_size",
      "hidden_ratio",
      "use_lower_bound",
    )
  )
  workdir = check_workdir_destination(workdir)
  with tensors.open_weights(src, allow_nonfinite=allow_nonfinite) as weights:
    check_weights(weights, layout, note)
    with workdir_destination(workdir) as tmp:
      tokenizer = _import_tokenizer(src, tmp, workdir, tokenizer)
      notes = _check_special_ids(tokenizer, hf_config, tmp, workdir)
      cfg = config_from_dict({"model": model_section, "data": {"tokenizer": tokenizer}})
      flat = mapping.flatten(read_params(weights, layout, shapes, np_dtype))
      with jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext():
        to_device_leaf_by_leaf(flat)
        save_params(tmp, mapping.unflatten(flat), cfg)
      del flat
      loading.save_workdir_config(tmp, cfg)
  return {
    "workdir": workdir,
    "num_params": sum(int(np.prod(s)) for s in shapes.values()),
    "tokenizer": tokenizer,
    "notes": notes,
    "model": model_section,
  }


# ----------------------------------------------------------------------------------- export


def workdir_tokenizer(cfg):
  """The tokenizer a workdir's config names (a `bpe:` one from its cache, trained on the
  configured corpus if missing), or None when it records none."""
  if not cfg.data.tokenizer:
    return None
  try:
    return tokenizer_from_config(cfg.data, cache_dir=default_cache_dir())
  except (OSError, ValueError) as e:
    raise FileNotFoundError(
      f"the workdir's tokenizer {cfg.data.tokenizer!r} cannot be loaded "
      f"({e}); restore its file or fix data.tokenizer in config.json"
    ) from e


def special_token_ids(tokenizer) -> dict:
  """`{bos,eos,pad}_token_id` of our tokenizer (bos None when it has none), or the reference
  defaults (1, 2) without one."""
  if tokenizer is None:
    return {k: mapping.REFERENCE_DEFAULTS[k] for k in ("bos_token_id", "eos_token_id")}
  return {
    "bos_token_id": tokenizer.bos_id,
    "eos_token_id": tokenizer.eos_id,
    "pad_token_id": tokenizer.pad_id,
  }


def _tensor_producer(leaf: jax.Array, slot: Slot, dtype: np.dtype):
  """A function returning the HF tensor of `slot` (one layer slice, transposed, cast)."""

  def produce() -> np.ndarray:
    part = leaf if slot.layer is None else leaf[slot.layer]
    host = np.asarray(jax.device_get(part))
    if slot.transpose:
      host = host.T
    return np.ascontiguousarray(host, dtype=dtype)

  return produce


def export_checkpoint(
  workdir: str, dst: str, *, dtype: str | None = None, step: int | None = None
) -> dict:
  """Writes an HF hgrn_bit folder (config.json, model.safetensors, tokenizer) from a workdir.

  Args:
    workdir: a training or import workdir (config.json + checkpoints/).
    dst: destination folder; must not exist or be empty.
    dtype: dtype of the stored tensors: None (default) = the weights' own `param_dtype` (a
      bit-exact round trip), or bfloat16 (as released), float32, float16, float64.
    step: checkpoint step (default: latest).
  Returns:
    a summary dict (dst, step, dtype, num_params, tokenizer file name or None).
  """
  cfg = loading.load_workdir_config(workdir)
  model_cfg = ModelConfig.from_config(cfg.model)
  dtype = dtype or model_cfg.param_dtype
  np_dtype = numpy_dtype(dtype)
  tokenizer = workdir_tokenizer(cfg)
  hf_config = mapping.hf_config_from_model(
    model_cfg, torch_dtype=dtype, **special_token_ids(tokenizer)
  )
  dst = check_destination(dst)
  x64 = model_cfg.param_dtype == "float64"
  with jax.enable_x64(True) if x64 else contextlib.nullcontext():
    params, step = loading.load_params(workdir, model_cfg, step)
    flat = mapping.flatten(params)
    layout = list(mapping.slots({p: tuple(a.shape) for p, a in flat.items()}, model_cfg.num_layers))
    with staged_directory(dst, last=("config.json",)) as tmp:
      paths.write_atomic(paths.join(tmp, "config.json"), json.dumps(hf_config, indent=2) + "\n")
      entries = [
        (s.hf_name, s.hf_shape, np_dtype, _tensor_producer(flat[s.ours], s, np_dtype))
        for s in layout
      ]
      tensors.write_safetensors(
        paths.join(tmp, tensors.SINGLE_FILE), entries, metadata={"format": "pt"}
      )
      written = tokenizer.save(tmp) if tokenizer is not None else None
  return {
    "dst": dst,
    "step": step,
    "dtype": dtype,
    "num_params": sum(int(np.prod(s.hf_shape)) for s in layout),
    "tokenizer": None if written is None else paths.basename(written),
  }
