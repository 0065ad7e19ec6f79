"""Packed export → load → generate / evaluate, against the latent model it came from.

The latent model and the packed one compute the same integers (int8 activation codes x ternary
weight codes); they differ only in float round-off: the latent model multiplies de-quantized
values `(c_x / sx)(c_w * mean|W|)`, the packed one accumulates exact integers and scales once.
Round-off can move an activation across a rounding boundary of its int8 code, after which the
two drift apart; in float64 (these tests) that does not happen at these sizes, so: logits
within 1e-12 of their scale, greedy tokens and multiple-choice predictions identical,
perplexity within 1e-4 relative (it agrees to ~1e-13). In fp32 the same flips make greedy
continuations of an untrained model part after a few tokens (docs/architecture.md).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmfree_jax import eval as ev
from mmfree_jax import export
from mmfree_jax import generate as generate_lib
from mmfree_jax.checkpoint import loading
from mmfree_jax.checkpoint import manager as ckpt_lib
from mmfree_jax.config import ModelConfig
from mmfree_jax.eval.samples import SAMPLE_MC
from mmfree_jax.export import __main__ as export_cli
from mmfree_jax.nn.model import build_model
from mmfree_jax.numerics import ternary_packing
from tests.perturb import perturb_params
from tests.test_eval import ByteTok, _make_workdir, _tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["In the beginning", "And God said", "Let there be light, and"]


def _make_f64_workdir(workdir):
  """A tiny float64 workdir with perturbed params (logits spread, no near-ties) at step 1."""
  cfg = _tiny_config()
  with cfg.unlocked():
    cfg.model.update(dtype="float64", param_dtype="float64")
  model = perturb_params(build_model(ModelConfig.from_config(cfg.model), 0))
  checkpointer = ckpt_lib.Checkpointer(str(workdir))
  checkpointer.save_params(1, nnx.split(model)[1].to_pure_dict(), json.loads(cfg.to_json()))
  checkpointer.close()
  loading.save_workdir_config(str(workdir), cfg)
  return model


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp("export")
  with jax.enable_x64(True):
    model = _make_f64_workdir(root / "wd")
    dirs = {}
    for fmt in ("2bit", "base3", "int8"):
      dirs[fmt] = root / fmt
      assert (
        export_cli.main(["--workdir", str(root / "wd"), "--dst", str(dirs[fmt]), "--format", fmt])
        == 0
      )
  return root, model, dirs


@pytest.mark.slow
def test_stored_codes_are_the_latent_weights_quantized(exported):
  root, model, dirs = exported
  packed_model, cfg, manifest = export.load_packed(str(dirs["2bit"]), method="lut")
  assert manifest["format"] == "2bit" and manifest["step"] == 1 and cfg.model.d_model == 32
  kernel = np.asarray(model.blocks.mlp.gate_proj.kernel[...][1])
  scale = np.maximum(np.mean(np.abs(kernel)), 1e-5)
  codes = np.clip(np.round(kernel / scale), -1, 1)  # numpy: half-even, as the quantizer
  stored = jax.tree.map(lambda a: a[1], packed_model.packed_params().blocks.gate_proj)
  unpacked = ternary_packing.unpack_ternary(stored.w, "2bit", kernel.shape[0])
  np.testing.assert_array_equal(np.asarray(unpacked), codes)
  np.testing.assert_allclose(float(stored.scale), scale, rtol=1e-6)
  # the default method holds the same codes as bit planes, converted while loading: bit j of
  # word w of column o is input 32w + j (numpy's little-endian packbits of each column)
  for fmt in ("2bit", "base3"):
    planes_model, _, _ = export.load_packed(str(dirs[fmt]))
    planes = np.asarray(planes_model.packed_params().blocks.gate_proj.w[1])
    words = -(-kernel.shape[0] // 32)
    padded = np.zeros((words * 32, kernel.shape[1]), bool)
    for plane, value in enumerate((1, -1)):
      padded[: kernel.shape[0]] = codes == value
      expected = np.ascontiguousarray(np.packbits(padded.T, axis=-1, bitorder="little"))
      expected = expected.view("<u4")
      np.testing.assert_array_equal(planes[plane], expected, err_msg=f"{fmt} plane {value}")
  with open(dirs["2bit"] / "model.safetensors", "rb") as f:
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
  assert header["blocks.1.gate_proj.codes"]["dtype"] == "U8"
  assert header["embedding"]["dtype"] == "F64"  # full precision, as the checkpoint


@pytest.mark.slow
def test_packed_logits_and_greedy_tokens_equal_latent(exported):
  _, model, dirs = exported
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 259, (3, 11)), jnp.int32)
  latent, latent_state = model(tokens)
  scale = float(np.max(np.abs(np.asarray(latent))))
  for fmt, method in [
    ("2bit", "popcount"),
    ("2bit", "lut"),
    ("base3", "popcount"),
    ("base3", "lut"),
    ("int8", "lut"),
  ]:
    packed_model, _, _ = export.load_packed(str(dirs[fmt]), method=method)
    logits, state = packed_model(tokens)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(latent), atol=1e-12 * scale)
    np.testing.assert_allclose(np.asarray(state.h), np.asarray(latent_state.h), atol=1e-12)
  sampling = generate_lib.SamplingConfig(max_new_tokens=8)
  prompts = [[ByteTok.bos_id] + ByteTok().encode(p) for p in PROMPTS]
  latent_tokens = generate_lib.generate_batch(model, prompts, sampling)
  assert generate_lib.generate_batch(packed_model, prompts, sampling) == latent_tokens


def _data_bytes(path) -> int:
  """Bytes of the tensors of a safetensors file (its header's offsets)."""
  with open(path, "rb") as f:
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
  return sum(
    e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items() if k != "__metadata__"
  )


def test_int8_embedding_is_the_rows_quantized_and_the_rest_exact(exported, tmp_path):
  """--embedding_dtype int8: each row is stored as absmax int8 codes with one scale (error
  at most half a step, max|row| / 254); the model then equals the latent model whose
  embedding is those de-quantized rows (same 1e-12 tolerance as the other formats)."""
  root, model, dirs = exported
  assert (
    export_cli.main(
      [
        "--workdir",
        str(root / "wd"),
        "--dst",
        str(tmp_path / "e8"),
        "--format",
        "2bit",
        "--embedding_dtype",
        "int8",
      ]
    )
    == 0
  )
  packed_model, _, manifest = export.load_packed(str(tmp_path / "e8"))
  assert manifest["embedding_dtype"] == "int8"
  params = packed_model.packed_params()
  table = np.asarray(model.embedding[...])
  rows = np.asarray(params.embedding, np.float64) / np.asarray(params.embedding_scale)[:, None]
  assert params.embedding.dtype == jnp.int8
  step = np.max(np.abs(table), axis=1, keepdims=True) / 127
  assert np.all(np.abs(rows - table) <= 0.5 * step * (1 + 1e-9))
  assert np.max(np.abs(rows - table)) > 0  # it is lossy: the check above can fail
  full, small = (_data_bytes(d / "model.safetensors") for d in (dirs["2bit"], tmp_path / "e8"))
  assert full - small == table.size * 7 - table.shape[0] * 8  # f64 → int8 + an f64 scale/row
  reference = nnx.clone(model)
  reference.embedding[...] = jnp.asarray(rows)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 259, (2, 9)), jnp.int32)
  latent, _ = reference(tokens)
  logits, _ = packed_model(tokens)
  scale = float(np.max(np.abs(np.asarray(latent))))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(latent), atol=1e-12 * scale)


@pytest.mark.slow
def test_packed_perplexity_and_multiple_choice_equal_latent(exported, tmp_path):
  root, _, dirs = exported
  doc = tmp_path / "doc.txt"
  doc.write_text("In the beginning God created the heaven.\n\nAnd the earth was void.\n")
  options = ev.EvalOptions(
    ppl_files=[str(doc)], mc_files=[SAMPLE_MC], mc_limit=8, batch_size=8, chunk_len=8
  )
  latent = ev.evaluate_workdir(
    str(root / "wd"), options, tokenizer=ByteTok(), output_dir=str(tmp_path / "a")
  )
  packed = ev.evaluate_workdir(
    str(dirs["base3"]), options, tokenizer=ByteTok(), packed=True, output_dir=str(tmp_path / "b")
  )
  assert packed["model"]["packed_format"] == "base3"
  a, b = latent["perplexity"][str(doc)], packed["perplexity"][str(doc)]
  assert a["tokens"] == b["tokens"]
  assert abs(b["perplexity"] - a["perplexity"]) <= 1e-4 * a["perplexity"]
  mc_a, mc_b = latent["multiple_choice"]["sample_mc"], packed["multiple_choice"]["sample_mc"]
  assert mc_a["acc"] == mc_b["acc"] and mc_a["acc_norm"] == mc_b["acc_norm"]
  assert mc_a["predictions"] == mc_b["predictions"]


@pytest.mark.slow
def test_lm_eval_generate_until_from_packed(exported):
  pytest.importorskip("lm_eval", reason="lm-eval not installed")
  from mmfree_jax.eval.lm_eval_adapter import MMFreeLM

  _, model, dirs = exported
  packed_model, _, _ = export.load_packed(str(dirs["2bit"]))
  requests = [type("R", (), {"args": (p, {"until": ["\n"], "max_gen_toks": 6})})() for p in PROMPTS]
  latent = MMFreeLM(model=model, tokenizer=ByteTok()).generate_until(requests)
  packed = MMFreeLM(model=packed_model, tokenizer=ByteTok()).generate_until(requests)
  assert latent == packed and len(packed) == len(PROMPTS)


@pytest.mark.slow
@pytest.mark.subprocess
def test_eval_cli_packed(exported, tmp_path):
  _, _, dirs = exported
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_ENABLE_X64="1")
  cmd = [
    sys.executable,
    os.path.join(REPO, "eval.py"),
    f"--packed={dirs['2bit']}",
    "--prompt=In the beginning",
    "--max_new_tokens=4",
  ]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(dirs["2bit"] / "eval" / "step_1.json") as f:
    out = json.load(f)
  assert out["model"]["packed_format"] == "2bit" and len(out["generation"]) == 1
  assert out["model"]["packed_method"] == "popcount"
  # the table-lookup product: the same tokens (exact integers either way)
  proc = subprocess.run(
    cmd + ["--packed_method=lut", f"--output_dir={tmp_path}"],
    capture_output=True,
    text=True,
    env=env,
    timeout=240,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "step_1.json") as f:
    lut = json.load(f)
  assert lut["model"]["packed_method"] == "lut"
  assert lut["generation"][0]["text"] == out["generation"][0]["text"]
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, "eval.py"),
      "--workdir=/nonexistent",
      "--packed_method=lut",
      "--prompt=x",
    ],
    capture_output=True,
    text=True,
    env=env,
    timeout=240,
  )
  assert proc.returncode == 1 and "--packed_method applies to a --packed" in proc.stderr


def test_eval_cli_packed_method_choices_are_the_library_s():
  """eval.py takes the choices for its --help from the jax-free `registry`: they are the
  library's methods and default."""
  import importlib.util  # pylint: disable=import-outside-toplevel

  from mmfree_jax import registry  # pylint: disable=import-outside-toplevel
  from mmfree_jax.nn import packed  # pylint: disable=import-outside-toplevel

  spec = importlib.util.spec_from_file_location("eval_cli", os.path.join(REPO, "eval.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  flag = module.flags.FLAGS["packed_method"]
  assert set(flag.parser.enum_values) == set(ternary_packing.MATVEC_METHODS)
  assert flag.default == packed.DEFAULT_METHOD
  assert ternary_packing.MATVEC_METHODS == registry.MATVEC_METHODS
  assert packed.DEFAULT_METHOD == registry.DEFAULT_MATVEC_METHOD
  with open(os.path.join(REPO, "eval.py"), encoding="utf-8") as f:
    assert '"unpack"' not in f.read()  # no copy of the choices


def _copy(src, dst):
  dst.mkdir()
  for name in os.listdir(src):
    if os.path.isfile(src / name):
      (dst / name).write_bytes((src / name).read_bytes())
  return dst


def test_bad_packed_directories_name_the_file(exported, tmp_path):
  root, _, dirs = exported
  src = dirs["2bit"]
  missing = _copy(src, tmp_path / "missing")
  os.remove(missing / "model.safetensors")
  with pytest.raises(export.PackedDirError, match=r"missing/model.safetensors not found"):
    export.load_packed(str(missing))
  truncated = _copy(src, tmp_path / "truncated")
  data = (truncated / "model.safetensors").read_bytes()
  (truncated / "model.safetensors").write_bytes(data[: len(data) - 100])
  with pytest.raises(export.PackedDirError, match=r"truncated/model.safetensors"):
    export.load_packed(str(truncated))
  unknown = _copy(src, tmp_path / "unknown")
  manifest = json.loads((unknown / "packed.json").read_text())
  (unknown / "packed.json").write_text(json.dumps(dict(manifest, format="1bit")))
  with pytest.raises(export.PackedDirError, match=r"unknown/packed.json: unknown packed format"):
    export.load_packed(str(unknown))
  shapes = _copy(src, tmp_path / "shapes")
  config = json.loads((shapes / "config.json").read_text())
  config["model"]["d_model"] = 64
  (shapes / "config.json").write_text(json.dumps(config))
  with pytest.raises(
    export.PackedDirError,
    match=r"shapes/model.safetensors: tensor .* has "
    r"shape .* the config and the codes disagree",
  ):
    export.load_packed(str(shapes))
  wrong_format = _copy(src, tmp_path / "wrong_format")
  (wrong_format / "packed.json").write_text(json.dumps(dict(manifest, format="base3")))
  with pytest.raises(export.PackedDirError, match=r"wrong_format/model.safetensors"):
    export.load_packed(str(wrong_format))


def test_bad_export_requests(exported, tmp_path):
  root, _, dirs = exported
  _make_workdir(tmp_path / "tf", kind="transformer")
  with pytest.raises(export.PackedDirError, match="no ternary BitLinear layers"):
    export.export_workdir(str(tmp_path / "tf"), str(tmp_path / "out"))
  with pytest.raises(export.PackedDirError, match="unknown packed format '1bit'"):
    export.export_workdir(str(root / "wd"), str(tmp_path / "out"), fmt="1bit")
  with pytest.raises(FileExistsError, match="not empty"):
    export.export_workdir(str(root / "wd"), str(dirs["2bit"]))
  assert export_cli.main(["--workdir", str(tmp_path / "tf"), "--dst", str(tmp_path / "out")]) == 1
  assert not os.path.exists(tmp_path / "out")  # staged: nothing left behind


def _mapped(path) -> int:
  """How many of this process's memory mappings are of `path` (an open safetensors handle
  maps its file until closed)."""
  with open("/proc/self/maps") as f:
    return sum(line.rstrip().endswith(str(path)) for line in f)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc (Linux)")
def test_rejected_packed_directories_leave_no_open_file(exported, tmp_path):
  """Each check of the tensors that raises closes the file it read them from, also while the
  error (and the loader's frames, through its traceback) is still alive."""
  _, _, dirs = exported
  manifest = json.loads((dirs["2bit"] / "packed.json").read_text())
  shapes = _copy(dirs["2bit"], tmp_path / "shapes")
  config = json.loads((shapes / "config.json").read_text())
  config["model"]["d_model"] = 64
  (shapes / "config.json").write_text(json.dumps(config))
  wrong_format = _copy(dirs["2bit"], tmp_path / "wrong_format")
  (wrong_format / "packed.json").write_text(json.dumps(dict(manifest, format="base3")))
  layers = _copy(dirs["2bit"], tmp_path / "layers")
  config = json.loads((layers / "config.json").read_text())
  config["model"]["num_layers"] += 1
  (layers / "config.json").write_text(json.dumps(config))
  for bad in (shapes, wrong_format, layers):
    try:
      export.load_packed(str(bad))
    except export.PackedDirError as e:
      error = e
    assert error.__traceback__ is not None
    assert _mapped(bad / "model.safetensors") == 0, bad
    del error
