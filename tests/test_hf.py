"""HF checkpoint interop (`mmfree_jax.hf`): import, export, errors, tokenizer.

The HF side is independent of our code: `tests/hf_reference.py` writes HF-layout checkpoints
with the safetensors library and computes HGRNBitForCausalLM logits in plain numpy from the
docs/architecture.md §1 formulas, reading the HF tensor names. Semantics are compared in float64
(tolerance 1e-9: both sides run the same formulas in f64 and agree to ~1e-15); one float32
import is compared with a stated looser tolerance (F32_TOL).
"""

import json
import os
import struct
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import sentencepiece
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from mmfree_jax import abstract_model
from mmfree_jax.checkpoint import loading
from mmfree_jax.checkpoint.manager import Checkpointer
from mmfree_jax.config import ModelConfig, config_from_dict
from mmfree_jax.data.tokenizer import mistral_tokenizer_path
from mmfree_jax.hf import HFCheckpointError, checkpoint_io, mapping, tensors
from mmfree_jax.hf.__main__ import main as hf_main
from tests import hf_reference as ref

F64_TOL = 1e-9
# fp32 vs the f64 oracle (logits of magnitude ~1): where no int8 activation rounding flips, only
# fp32 round-off (measured <= 4e-7); a flip at a .5 boundary (docs/architecture.md §1) shifts the
# logits by ~1e-2 from that position on (the recurrence carries it). Measured at this shape: one
# flip, in 5 of 24 positions, max 1.6e-2. So: most positions within F32_TOL, all within
# F32_FLIP_TOL.
F32_TOL = 1e-5
F32_FLIP_TOL = 5e-2

HF_CONFIG = {
  "architectures": ["HGRNBitForCausalLM"],
  "model_type": "hgrn_bit",
  "hidden_size": 64,
  "num_hidden_layers": 2,
  "vocab_size": 256,
  "hidden_ratio": 4,
  "intermediate_size": None,  # derived: 256 * ceil(170 / 256) = 256
  "expand_ratio": 1,
  "num_heads": 1,
  "attn_mode": "fused_recurrent",
  "use_short_conv": False,
  "use_lower_bound": True,
  "rms_norm_eps": 1e-5,  # not the default, so a mixed-up eps would show
  "tie_word_embeddings": False,
}
TOKENS = np.random.default_rng(1).integers(0, HF_CONFIG["vocab_size"], (2, 12))


@nnx.jit
def _logits(model, tokens):
  return model(tokens)[0]


def logits_of(workdir, x64=False):
  """Loads a workdir with `loading.load_model` and returns numpy logits for TOKENS."""
  with jax.enable_x64(x64):
    model, _, _ = loading.load_model(workdir)
    return np.asarray(_logits(model, TOKENS))


def leftovers(parent):
  """Staging directories left behind in parent (there must be none)."""
  return [n for n in os.listdir(parent) if ".partial-" in n]


@pytest.fixture(scope="module")
def hf_weights():
  return ref.random_hf_weights(HF_CONFIG, seed=0)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, hf_weights):
  return ref.write_hf_checkpoint(
    str(tmp_path_factory.mktemp("hf") / "model"), HF_CONFIG, hf_weights
  )


# ----------------------------------------------------------------- import vs numpy oracle


def test_import_float64_matches_numpy_reference(hf_dir, hf_weights, tmp_path):
  workdir = str(tmp_path / "imported")
  assert hf_main(["import", "--src", hf_dir, "--workdir", workdir, "--dtype", "float64"]) == 0
  want = ref.forward(hf_weights, HF_CONFIG, TOKENS)
  got = logits_of(workdir, x64=True)
  assert got.dtype == np.float64
  np.testing.assert_allclose(got, want, rtol=0, atol=F64_TOL)
  assert np.abs(want).max() > 0.1  # the comparison is not between two near-zero arrays
  cfg = loading.load_workdir_config(workdir)
  assert cfg.model.intermediate_size == 256 and cfg.model.rms_norm_eps == 1e-5
  assert cfg.data.tokenizer == ""  # hf_dir has no tokenizer file: none is recorded
  assert leftovers(tmp_path) == []


def test_import_float32_matches_numpy_reference_and_keeps_latent_weights(
  hf_dir, hf_weights, tmp_path
):
  workdir = str(tmp_path / "imported")
  checkpoint_io.import_checkpoint(hf_dir, workdir)  # default float32
  got = logits_of(workdir)
  assert got.dtype == np.float32
  diff = np.abs(got - ref.forward(hf_weights, HF_CONFIG, TOKENS)).max(axis=-1)  # [B, T]
  assert diff.max() < F32_FLIP_TOL
  assert np.mean(diff < F32_TOL) >= 0.75
  params, _ = loading.load_params(
    workdir, ModelConfig.from_config(loading.load_workdir_config(workdir).model)
  )
  # Stored exactly as the latent HF weights (transposed), never re-quantized (issue #18).
  kernel = np.asarray(params["blocks"]["attn"]["f_proj"]["kernel"][1])
  np.testing.assert_array_equal(kernel, hf_weights["model.layers.1.attn.f_proj.weight"].T)
  assert len(np.unique(kernel)) > 3
  np.testing.assert_array_equal(
    np.asarray(params["lower_bounds"]), hf_weights["model.lower_bounds"]
  )


# -------------------------------------------------------------------------- round trip


def random_workdir(path, seed=0):
  """A workdir holding random params of the tiny model (every leaf randomized)."""
  cfg = config_from_dict(
    {
      "model": {"vocab_size": 256, "d_model": 64, "num_layers": 2},
      "data": {"tokenizer": "spm:mistral"},
    }
  )
  model_cfg = ModelConfig.from_config(cfg.model)
  _, state = nnx.split(abstract_model(model_cfg))  # shapes only: eager init is slow
  flat = mapping.flatten(state.to_pure_dict())
  rng = np.random.default_rng(seed)
  for path_, leaf in flat.items():
    scale = 0.3 if "scale" in path_ else 1.0 if path_ in ("lower_bounds", "embedding") else 0.05
    value = rng.normal(0.0, scale, leaf.shape) + (1.0 if "scale" in path_ else 0.0)
    flat[path_] = value.astype(np.float32)
  params = mapping.unflatten(flat)
  checkpointer = Checkpointer(path)
  checkpointer.save_params(7, params, cfg.to_dict())
  checkpointer.close()
  loading.save_workdir_config(path, cfg)
  return flat


def test_round_trip_float32_is_exact(tmp_path):
  src = str(tmp_path / "src")
  original = random_workdir(src)
  hf = str(tmp_path / "hf")
  assert hf_main(["export", "--workdir", src, "--dst", hf, "--dtype", "float32"]) == 0
  with open(os.path.join(hf, "config.json")) as f:
    hf_config = json.load(f)
  assert hf_config["model_type"] == "hgrn_bit"
  assert hf_config["architectures"] == ["HGRNBitForCausalLM"]
  assert (hf_config["num_heads"], hf_config["expand_ratio"], hf_config["use_short_conv"]) == (
    1,
    1,
    False,
  )
  assert (hf_config["bos_token_id"], hf_config["eos_token_id"]) == (1, 2)
  # The exported file has exactly the reference layout (names, torch shapes).
  with safe_open(os.path.join(hf, "model.safetensors"), "numpy") as f:
    assert f.metadata() == {"format": "pt"}
    shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    np.testing.assert_array_equal(
      f.get_tensor("model.layers.1.mlp.gate_proj.weight"),
      original["blocks.mlp.gate_proj.kernel"][1].T,
    )
  assert shapes == ref.hf_tensor_names(hf_config)
  assert os.path.isfile(os.path.join(hf, "tokenizer.model"))

  back = str(tmp_path / "back")
  checkpoint_io.import_checkpoint(hf, back)
  cfg = loading.load_workdir_config(back)
  params, _ = loading.load_params(back, ModelConfig.from_config(cfg.model))
  imported = mapping.flatten(params)
  assert sorted(imported) == sorted(original)
  for path_, value in original.items():
    np.testing.assert_array_equal(np.asarray(imported[path_]), value, err_msg=path_)
  np.testing.assert_array_equal(logits_of(back), logits_of(src))
  assert cfg.data.tokenizer == "spm:" + os.path.join(back, "tokenizer.model")


def test_export_to_bfloat16_of_the_latent_weights(tmp_path):
  src = str(tmp_path / "src")
  original = random_workdir(src, seed=1)
  hf = str(tmp_path / "hf")
  out = checkpoint_io.export_checkpoint(src, hf, dtype="bfloat16")  # default: the weights' float32
  assert out["step"] == 7
  with open(os.path.join(hf, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  with open(os.path.join(hf, "model.safetensors"), "rb") as f:
    (length,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(length))
  assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
  with safe_open(os.path.join(hf, "model.safetensors"), "numpy") as f:
    got = f.get_tensor("lm_head.weight")
  np.testing.assert_array_equal(got, original["lm_head.kernel"].T.astype(ml_dtypes.bfloat16))


# ------------------------------------------------------------------ other weight layouts


def _read_all(folder, dtype=np.float32):
  """Our flat params read from an HF folder (no checkpoint written)."""
  model_cfg = ModelConfig.from_config(mapping.model_section_from_hf(HF_CONFIG, "float32"))
  shapes = checkpoint_io.our_shapes(model_cfg)
  layout = list(mapping.slots(shapes, model_cfg.num_layers))
  with tensors.open_weights(folder) as weights:
    checkpoint_io.check_weights(weights, layout, "test")
    return mapping.flatten(checkpoint_io.read_params(weights, layout, shapes, np.dtype(dtype)))


def write_sharded(folder, weights, config=HF_CONFIG):
  """Two safetensors shards and model.safetensors.index.json."""
  os.makedirs(folder)
  names = sorted(weights)
  parts = {
    "model-00001-of-00002.safetensors": names[::2],
    "model-00002-of-00002.safetensors": names[1::2],
  }
  for shard, keys in parts.items():
    save_file({k: weights[k] for k in keys}, os.path.join(folder, shard), metadata={"format": "pt"})
  index = {"metadata": {}, "weight_map": {k: s for s, ks in parts.items() for k in ks}}
  with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f)
  return folder


def test_sharded_checkpoint_reads_like_the_single_file(hf_dir, hf_weights, tmp_path):
  sharded = write_sharded(str(tmp_path / "sharded"), hf_weights)
  single, split = _read_all(hf_dir), _read_all(sharded)
  for path_ in single:
    np.testing.assert_array_equal(split[path_], single[path_], err_msg=path_)
  np.testing.assert_array_equal(
    split["blocks.mlp.down_proj.kernel"][0], hf_weights["model.layers.0.mlp.down_proj.weight"].T
  )


def test_bfloat16_weights_are_upcast_exactly(hf_weights, tmp_path):
  bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in hf_weights.items()}
  folder = ref.write_hf_checkpoint(str(tmp_path / "bf16"), HF_CONFIG, bf16)
  flat = _read_all(folder, np.float64)
  np.testing.assert_array_equal(
    flat["embedding"], bf16["model.embeddings.weight"].astype(np.float64)
  )
  np.testing.assert_array_equal(
    flat["blocks.attn.o_proj.kernel"][1],
    bf16["model.layers.1.attn.o_proj.weight"].T.astype(np.float64),
  )


class _FakeTensor:
  """Just enough of a torch tensor for the reader: shape, dtype, detach/cpu/numpy."""

  def __init__(self, array):
    self.array, self.shape, self.dtype = array, array.shape, "torch.float32"

  def detach(self):
    return self

  def cpu(self):
    return self

  def numpy(self):
    return self.array


class _FakeTorch:
  bfloat16 = object()

  def __init__(self, weights):
    self.weights, self.calls = weights, []

  def load(self, path, **kwargs):
    self.calls.append(kwargs)
    return {k: _FakeTensor(v) for k, v in self.weights.items()}


def test_pytorch_bin_is_read_with_weights_only(hf_dir, hf_weights, tmp_path, monkeypatch):
  folder = tmp_path / "bin"
  folder.mkdir()
  (folder / "pytorch_model.bin").write_bytes(b"not read by the fake")
  fake = _FakeTorch(hf_weights)
  monkeypatch.setitem(sys.modules, "torch", fake)
  flat = _read_all(str(folder))
  assert fake.calls and all(c.get("weights_only") is True for c in fake.calls)
  np.testing.assert_array_equal(
    flat["blocks.attn.i_proj.kernel"][0], hf_weights["model.layers.0.attn.i_proj.weight"].T
  )


# --------------------------------------------------------------------------------- errors


def _variant(tmp_path, hf_weights, *, drop=(), add=None, reshape=None, config=None):
  weights = {k: v for k, v in hf_weights.items() if k not in drop}
  weights.update(add or {})
  for name, shape in (reshape or {}).items():
    weights[name] = np.zeros(shape, np.float32)
  return ref.write_hf_checkpoint(
    str(tmp_path / "hf_variant"), {**HF_CONFIG, **(config or {})}, weights
  )


ERROR_CASES = {
  "missing_key": (
    dict(drop=["model.layers.1.mlp_norm.weight"]),
    ["lacks 1 tensor", "model.layers.1.mlp_norm.weight"],
  ),
  "missing_lower_bounds": (
    dict(drop=["model.lower_bounds"]),
    ["model.lower_bounds", "use_lower_bound=True"],
  ),
  "unexpected_key": (
    dict(add={"model.layers.0.attn.h_conv1d.weight": np.zeros((64, 1, 4), np.float32)}),
    ["does not have", "model.layers.0.attn.h_conv1d.weight"],
  ),
  "wrong_shape": (
    dict(reshape={"model.layers.0.attn.f_proj.weight": (64, 32)}),
    ["model.layers.0.attn.f_proj.weight", "(64, 32)", "(64, 64)"],
  ),
  "wrong_layer_count": (
    dict(config={"num_hidden_layers": 3}),
    ["model.layers.2.", "num_hidden_layers=3"],
  ),
  "num_heads": (dict(config={"num_heads": 4}), ["num_heads=4", "num_heads in [1]"]),
  "expand_ratio": (dict(config={"expand_ratio": 2}), ["expand_ratio=2", "expand_ratio in [1]"]),
  "short_conv": (
    dict(config={"use_short_conv": True}),
    ["use_short_conv=True", "use_short_conv in [False]"],
  ),
  "attn_mode": (dict(config={"attn_mode": "chunk"}), ["attn_mode='chunk'", "fused_recurrent"]),
  "tied": (dict(config={"tie_word_embeddings": True}), ["tie_word_embeddings in [False]"]),
  "model_type": (dict(config={"model_type": "llama"}), ["model_type='llama'", "hgrn_bit"]),
  "integer_weights": (
    dict(add={"lm_head.weight": np.zeros((256, 64), np.int8)}),
    ["lm_head.weight", "I8", "latent floating-point"],
  ),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_import_errors_name_the_problem_and_write_nothing(case, hf_weights, tmp_path):
  variant, fragments = ERROR_CASES[case]
  src = _variant(tmp_path, hf_weights, **variant)
  workdir = tmp_path / "out" / "workdir"
  with pytest.raises(HFCheckpointError) as err:
    checkpoint_io.import_checkpoint(src, str(workdir))
  for fragment in fragments:
    assert fragment in str(err.value)
  assert not workdir.exists()
  assert not (tmp_path / "out").exists() or leftovers(tmp_path / "out") == []


def _expect_import_error(src, tmp_path, fragments, error=HFCheckpointError):
  workdir = tmp_path / "workdir"
  with pytest.raises(error) as err:
    checkpoint_io.import_checkpoint(str(src), str(workdir))
  for fragment in fragments:
    assert fragment in str(err.value)
  assert not workdir.exists() and leftovers(tmp_path) == []
  return err


def test_folder_without_weights(tmp_path):
  src = tmp_path / "empty"
  src.mkdir()
  (src / "config.json").write_text(json.dumps(HF_CONFIG))
  _expect_import_error(
    src, tmp_path, ["no weights", "model.safetensors", "model.safetensors.index.json"]
  )


def test_folder_without_config(hf_dir, tmp_path):
  _expect_import_error(tmp_path, tmp_path, ["config.json not found"])


def test_truncated_safetensors(hf_weights, tmp_path):
  src = ref.write_hf_checkpoint(str(tmp_path / "trunc"), HF_CONFIG, hf_weights)
  path = os.path.join(src, "model.safetensors")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 1000)
  _expect_import_error(src, tmp_path, ["model.safetensors", "truncated", "download it again"])


def test_index_with_missing_shard(hf_weights, tmp_path):
  src = write_sharded(str(tmp_path / "sharded"), hf_weights)
  os.remove(os.path.join(src, "model-00002-of-00002.safetensors"))
  _expect_import_error(
    src, tmp_path, ["model-00002-of-00002.safetensors", "missing", "model.safetensors.index.json"]
  )


def test_pytorch_bin_without_torch_explains_the_safe_route(tmp_path, monkeypatch):
  src = tmp_path / "bin"
  src.mkdir()
  (src / "config.json").write_text(json.dumps(HF_CONFIG))
  (src / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle we must not open")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  _expect_import_error(
    src, tmp_path, ["pytorch_model.bin", "torch", "weights_only=True", "safetensors", "save_file"]
  )


def test_failure_while_writing_leaves_no_destination(hf_dir, tmp_path, monkeypatch):
  def broken_save(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(checkpoint_io, "save_params", broken_save)
  _expect_import_error(hf_dir, tmp_path, ["disk full"], error=OSError)


def test_existing_destination_is_not_touched(hf_dir, tmp_path):
  workdir = tmp_path / "workdir"
  workdir.mkdir()
  (workdir / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="not empty"):
    checkpoint_io.import_checkpoint(hf_dir, str(workdir))
  assert os.listdir(workdir) == ["keep.txt"]


def test_export_refuses_transformer_workdir(tmp_path):
  cfg = config_from_dict(
    {
      "model": {
        "kind": "transformer",
        "vocab_size": 256,
        "d_model": 64,
        "num_layers": 2,
        "num_heads": 4,
      }
    }
  )
  loading.save_workdir_config(str(tmp_path / "w"), cfg)
  with pytest.raises(HFCheckpointError, match="only model.kind='mmfree'"):
    checkpoint_io.export_checkpoint(str(tmp_path / "w"), str(tmp_path / "hf"))
  assert not (tmp_path / "hf").exists()


def test_cli_reports_errors_with_exit_code(tmp_path, capsys):
  assert hf_main(["import", "--src", str(tmp_path), "--workdir", str(tmp_path / "w")]) == 1
  assert "config.json not found" in capsys.readouterr().err


# -------------------------------------------------------------------- config translation


@pytest.mark.parametrize("d,layers,inter", [(1024, 24, 2816), (2048, 24, 5632), (2560, 32, 6912)])
def test_released_sizes_derive_the_reference_intermediate_size(d, layers, inter):
  section = mapping.model_section_from_hf(
    {
      "hidden_size": d,
      "num_hidden_layers": layers,
      "vocab_size": 32000,
      "intermediate_size": None,
      "hidden_ratio": 4,
    },
    "bfloat16",
  )
  assert section["intermediate_size"] == inter
  exported = mapping.hf_config_from_model(ModelConfig.from_config(section), torch_dtype="bf16")
  assert (
    exported["hidden_size"],
    exported["num_hidden_layers"],
    exported["intermediate_size"],
  ) == (d, layers, inter)


# ------------------------------------------------------------------------------ tokenizer


def test_mistral_tokenizer_from_mistral_common():
  sp = sentencepiece.SentencePieceProcessor(model_file=mistral_tokenizer_path())
  assert sp.get_piece_size() == 32000
  assert (sp.bos_id(), sp.eos_id()) == (1, 2)
  assert sp.decode(sp.encode("MatMul-free language models")) == "MatMul-free language models"


def test_mistral_tokenizer_missing_package_is_a_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "mistral_common", None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps mistral_common"):
    mistral_tokenizer_path()


def test_spm_mistral_alias_resolves_in_the_data_package(tmp_path):
  from mmfree_jax.data import load_tokenizer

  tok = load_tokenizer("spm:mistral", cache_dir=str(tmp_path))
  assert tok.vocab_size == 32000 and tok.eos_id == 2 and tok.bos_id == 1
  assert tok.decode(tok.encode("In the beginning")) == "In the beginning"
