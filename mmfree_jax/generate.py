"""Text generation: prefill with the parallel forward, then a jitted `lax.while_loop` of decode
steps carrying the model state: the constant-size recurrent state `h [layers, batch, d]` for
the MatMul-free LM (no KV cache, no context limit), a KV cache of `prompt + max_new_tokens`
positions for the Transformer++.

`generate(model, prompt_ids, cfg)` works on token ids; `generate_text(model, tokenizer,
prompt, cfg)` on text (what `eval.py --prompt` and the lm-eval adapter use).
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfree_jax.data.tokenizer import document_start
from mmfree_jax.nn.model import check_token_ids
from mmfree_jax.ops.dtypes import acc_dtype

log = logging.getLogger("mmfree_jax")


class SamplingConfig(NamedTuple):
  """`temperature == 0` is greedy; `top_k == 0` and `top_p == 1` disable those filters.

  The loop compiles once per prompt shape, max_new_tokens, top_k and whether greedy / top-p
  are on; temperature, top_p and eos_id values are traced.
  """
  max_new_tokens: int = 64
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  eos_id: int | None = None

  def validate(self) -> "SamplingConfig":
    if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be an int >= 1; got {self.max_new_tokens!r}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0 (0 = greedy); got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off); got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1] (1 = off); got {self.top_p}")
    return self


def sample_from_logits(logits: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Picks one token per row. `logits [batch, vocab]` → `[batch]` int32.

  Order: temperature, then top-k, then top-p (nucleus: the smallest set of most likely tokens
  whose probability reaches top_p; the most likely token is always kept).
  """
  return _sample(logits, rng, jnp.asarray(cfg.temperature, jnp.float32),
                 jnp.asarray(cfg.top_p, jnp.float32), **_static_sampling(cfg))


def _static_sampling(cfg: SamplingConfig) -> dict:
  """The settings that change the traced program (the rest are traced scalars)."""
  return dict(greedy=cfg.temperature <= 0, top_k=cfg.top_k, nucleus=cfg.top_p < 1.0)


def _sample(logits, rng, temperature, top_p, *, greedy: bool, top_k: int, nucleus: bool):
  """`sample_from_logits` with temperature and top_p as traced scalars."""
  logits = logits.astype(acc_dtype(logits.dtype))
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature.astype(logits.dtype)
  neg = jnp.finfo(logits.dtype).min
  if top_k > 0:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if nucleus:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # mass before it < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, neg, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k",
                                             "nucleus"))
def _generate(graphdef, params, prompt, rng, temperature, top_p, eos, *, max_new_tokens: int,
              greedy: bool, top_k: int, nucleus: bool):
  """`prompt [batch, prompt_len]` → (`[batch, max_new_tokens]` int32, number generated).

  `temperature, top_p` fp32 scalars, `eos` int32 scalar (-1 = none) are traced: changing them
  does not recompile.
  """
  model = nnx.merge(graphdef, params)
  batch, prompt_len = prompt.shape
  sample = functools.partial(_sample, temperature=temperature, top_p=top_p, greedy=greedy,
                             top_k=top_k, nucleus=nucleus)
  # MatMul-free: `h [layers, batch, d]` whatever the length; Transformer++: KV cache of
  # prompt_len + max_new_tokens positions.
  state = model.init_state(batch, prompt_len + max_new_tokens)
  logits, state = model(prompt, state=state)  # prefill: parallel over the prompt
  rng, key = jax.random.split(rng)
  first = sample(logits[:, -1], key)
  out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)
  done = first == eos

  def cond(carry):
    i, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, out, state, done, rng = carry
    previous = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)  # [batch, 1]
    logits, state = model(previous, state=state)  # one decode step
    rng, key = jax.random.split(rng)
    token = jnp.where(done, jnp.maximum(eos, 0), sample(logits[:, -1], key))
    out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], i, axis=1)
    return i + 1, out, state, done | (token == eos), rng

  n, out, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), out, state, done, rng))
  return out, n


def generate(model: nnx.Module, prompt_tokens, cfg: SamplingConfig = SamplingConfig(), *,
             seed: int = 0) -> np.ndarray:
  """Continues each prompt row.

  Args:
    model: a `MatMulFreeLM` or `TransformerLM`.
    prompt_tokens: `[batch, prompt_len]` int ids (rows of equal length, prompt_len >= 1).
    cfg: sampling settings.
    seed: PRNG seed of the sampling (unused when greedy).
  Returns:
    `[batch, n]` int32 new tokens, n <= max_new_tokens (fewer when every row hit EOS);
    after a row's EOS, its remaining slots repeat the EOS id.
  """
  prompt = np.asarray(prompt_tokens, np.int32)
  if prompt.ndim != 2 or prompt.shape[1] == 0:
    raise ValueError(f"prompt must be [batch, prompt_len >= 1] token ids; got {prompt.shape}. "
                     "An empty prompt has no context: pass at least one token (e.g. BOS)")
  cfg.validate()
  check_token_ids(prompt, model.cfg.vocab_size)
  graphdef, params = nnx.split(model)
  eos = -1 if cfg.eos_id is None else cfg.eos_id
  out, n = _generate(graphdef, params, jnp.asarray(prompt), jax.random.key(seed),
                     jnp.float32(cfg.temperature), jnp.float32(cfg.top_p), jnp.int32(eos),
                     max_new_tokens=cfg.max_new_tokens, **_static_sampling(cfg))
  return np.asarray(out)[:, :int(n)]


class Generation(NamedTuple):
  """One text generation: the continuation, its ids, why it stopped, notes on the context."""
  prompt: str
  text: str
  prompt_tokens: int
  new_tokens: list[int]
  stopped_at_eos: bool
  notes: list[str]


def context_notes(model_cfg, prompt_len: int, max_new_tokens: int,
                  context_limit: int | None) -> list[str]:
  """What a prompt of `prompt_len` tokens means for this model's memory and context.

  context_limit: the trained `data.seq_len` (None: not known).
  """
  total = prompt_len + max_new_tokens
  if model_cfg.kind == "mmfree":
    note = (f"MatMul-free LM: no context limit; the decode state is a constant-size "
            f"[{model_cfg.num_layers}, batch, {model_cfg.d_model}] recurrent state (no KV "
            f"cache)")
    if context_limit is not None and total > context_limit:
      note += (f"; prompt + new tokens = {prompt_len} + {max_new_tokens} = {total} exceed "
               f"the trained data.seq_len={context_limit}, which is fine for it")
    return [note]
  notes = [f"Transformer++: KV cache sized to prompt + new tokens = {prompt_len} + "
           f"{max_new_tokens} = {total} positions"]
  if context_limit is not None and total > context_limit:
    notes.append(f"Transformer++: {total} positions exceed the trained data.seq_len="
                 f"{context_limit}; RoPE positions beyond it were never trained, quality may "
                 "drop")
  return notes


def generate_text(model: nnx.Module, tokenizer, prompt: str,
                  cfg: SamplingConfig = SamplingConfig(), *, seed: int = 0,
                  context_limit: int | None = None) -> Generation:
  """Continues `prompt` (text) until EOS or `cfg.max_new_tokens`.

  The prompt starts as a training document does (`[bos]` where the tokenizer has one);
  `cfg.eos_id` defaults to the tokenizer's EOS. The returned text stops before the EOS.
  """
  if not prompt:
    raise ValueError("empty prompt: generation needs some text to continue; pass --prompt "
                     "with at least one character")
  ids = document_start(tokenizer) + tokenizer.encode(prompt)
  if not ids:
    raise ValueError(f"prompt {prompt!r} encodes to no tokens; pass some text")
  if cfg.eos_id is None:
    cfg = cfg._replace(eos_id=tokenizer.eos_id)
  notes = context_notes(model.cfg, len(ids), cfg.max_new_tokens, context_limit)
  for note in notes:
    log.info(note)
  new = generate(model, np.asarray([ids], np.int32), cfg, seed=seed)[0].tolist()
  stopped = cfg.eos_id in new
  if stopped:
    new = new[:new.index(cfg.eos_id)]
  return Generation(prompt, tokenizer.decode(new), len(ids), new, stopped, notes)
