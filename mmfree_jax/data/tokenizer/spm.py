"""`spm:<tokenizer.model>` and `spm:mistral`: sentencepiece models."""

from __future__ import annotations

import hashlib
import importlib.resources

from mmfree_jax import paths
from mmfree_jax.data.tokenizer.base import Tokenizer

# The tokenizer of the released MMfreeLM checkpoints (Mistral-7B-v0.1, 32000 pieces), from the
# copy inside the mistral_common package.
MISTRAL_ALIAS = "spm:mistral"


def mistral_tokenizer_path() -> str:
  """Path of the Mistral-7B-v0.1 sentencepiece model shipped by mistral_common.

  Raises FileNotFoundError naming the fix when mistral_common is not installed.
  """
  try:
    path = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
  except ModuleNotFoundError:
    raise FileNotFoundError(
      "the Mistral tokenizer comes from the mistral_common package, which is not installed: "
      "`pip install --no-deps mistral_common` (only its data file is used), or pass a "
      "tokenizer.model path with spm:<path>"
    ) from None
  if not path.is_file():
    raise FileNotFoundError(
      f"{path} is missing from the installed mistral_common; reinstall "
      "it (`pip install --no-deps --force-reinstall mistral_common`)"
    )
  return str(path)


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model with its own bos/eos (pad = its pad id, else eos)."""

  def __init__(self, path: str, spec: str):
    """`path`: a `tokenizer.model` file, local or in a bucket (read whole, parsed in memory)."""
    # Only spm: specs need it; importing it here keeps grain workers' start-up light.
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    proto = paths.read_bytes(path)
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=proto)
    except (RuntimeError, OSError) as e:  # garbage: "could not parse ModelProto"
      reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
      raise ValueError(
        f"{path} (from data.tokenizer={spec!r}) is not a sentencepiece model ({reason}); "
        "copy a good tokenizer.model from the model's folder (no network needed), or use "
        "spm:mistral (shipped inside mistral_common)"
      ) from None
    self.spec = spec
    self.vocab_size = self._sp.get_piece_size()
    if self._sp.eos_id() < 0:
      raise ValueError(
        f"sentencepiece model {path} has no eos id; retrain it with "
        "--eos_id set, or use another tokenizer"
      )
    self.eos_id = self._sp.eos_id()
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
    proto = self._sp.serialized_model_proto()
    self.fingerprint = "spm-" + hashlib.sha256(proto).hexdigest()[:16]

  file_name = "tokenizer.model"
  backend = "sentencepiece"

  def save(self, folder: str) -> str:
    """Writes `folder/tokenizer.model` (local or in a bucket, atomically); returns its path."""
    path = paths.join(folder, self.file_name)
    paths.write_atomic(path, self._sp.serialized_model_proto())
    return path

  def _encode_batch(self, texts):
    return self._sp.encode(texts, out_type=int)

  def _decode(self, ids):
    return self._sp.decode(ids)
