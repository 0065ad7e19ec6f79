"""`byte`: UTF-8 bytes as ids, no training and no file (tests, smoke runs)."""

from __future__ import annotations

from mmfree_jax.data.tokenizer.base import EOS_TOKEN, PAD_TOKEN, Tokenizer


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as ids 0..255; eos 256, pad 257; vocab 258. No training, for tests."""

  def __init__(self):
    self.spec = "byte"
    self.eos_id, self.pad_id, self.bos_id = 256, 257, None
    self.vocab_size = 258
    self.fingerprint = "byte-v1"
    self._specials = {256: EOS_TOKEN, 257: PAD_TOKEN}

  def _encode_batch(self, texts):
    return [list(t.encode("utf-8")) for t in texts]

  def _decode(self, ids):
    pieces, run = [], bytearray()
    for i in ids:
      if i < 256:
        run.append(i)
      else:
        pieces += [run.decode("utf-8", errors="replace"), self._specials[i]]
        run = bytearray()
    return "".join(pieces) + run.decode("utf-8", errors="replace")
