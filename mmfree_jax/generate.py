"""Text generation: prefill with the parallel forward, then a jitted `lax.while_loop` of decode
steps carrying the model state: the constant-size recurrent state `h [layers, batch, d]` for
the MatMul-free LM (no KV cache, no context limit), a KV cache of `prompt + max_new_tokens`
positions for the Transformer++.

`generate_batch(model, [ids, ...], cfg)` continues prompts of different lengths in one loop
(per-row EOS), `generate(model, prompt_ids [B, P], cfg)` equal-length rows; `generate_text(model,
tokenizer, prompt, cfg)` works on text (`eval.py --prompt`). Any model with the
`model(tokens, state=) -> (logits, state)` / `init_state` contract works: the latent
MatMul-free LM, the Transformer++ and the packed `nn.packed.PackedLM`; the loop runs a latent
model as `mmfree_jax.infer` plans it for decoding (weights quantized / sliced per layer once).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmfree_jax.data.tokenizer import document_start
from mmfree_jax.infer import memory
from mmfree_jax.infer.runner import prepare_for_decoding
from mmfree_jax.infer.sampling import (  # noqa: F401 (the public API re-exported)
  MAX_NEW_TOKENS,
  SamplingConfig,
  sample_from_logits,
  sample_traced,
  static_sampling,
)
from mmfree_jax.nn.model import MatMulFreeLM, TransformerLM, check_token_ids
from mmfree_jax.parallel import kernel_sharding, sharding

log = logging.getLogger("mmfree_jax")
# generation's memory estimate lives with the inference plans; these names stay here too
generation_memory_bytes = memory.generation_memory_bytes
check_generation_fits = memory.check_generation_fits
available_memory_bytes = memory.available_memory_bytes


_STREAM_SINK: list = []  # the `on_tokens` callback of the generate call running now


def _emit_tokens(position, tokens, emitting):
  """Host side of streaming: forwards a step's tokens when row 0 emitted one."""
  if _STREAM_SINK and bool(np.asarray(emitting)[0]):
    _STREAM_SINK[-1](int(np.asarray(position)[0]), np.asarray(tokens))


def _decode_loop(model, emit, carry):
  """Runs decode steps until every row is done. `carry = (t, feed, state, out, count, done,
  rng)` after the prefill's first `emit`; `emit(t, logits [batch, vocab], out, count, done,
  rng) -> (feed, out, count, done, rng)` samples a step. Returns `out [batch, max_new_tokens]`
  int32 and `count [batch]` int32.
  """

  def cond(carry):
    return ~jnp.all(carry[5])

  # The weights ride in the carry through an optimization barrier: XLA would otherwise hoist
  # loop-invariant weight work out of the loop and keep its (larger) result for every layer
  # at once, e.g. a packed model's codes unpacked to fp32 or their gather indices to int32
  # (a 0.8 GB 2-bit 2.7B then needs 7-23 GB).
  step_graphdef, step_params = nnx.split(model)

  def body(carry):
    t, feed, state, out, count, done, rng, params = carry
    params = jax.lax.optimization_barrier(params)
    logits, state = nnx.merge(step_graphdef, params)(feed[:, None], state=state)  # decode step
    t = t + 1
    feed, out, count, done, rng = emit(t, logits[:, -1], out, count, done, rng)
    return t, feed, state, out, count, done, rng, params

  carry = jax.lax.while_loop(cond, body, (*carry, step_params))
  return carry[3], carry[4]


@functools.partial(
  jax.jit,
  static_argnames=(
    "graphdef",
    "max_new_tokens",
    "min_len",
    "greedy",
    "top_k",
    "nucleus",
    "vocab_limit",
    "stream",
    "layout",
  ),
)
def _generate(
  graphdef,
  params,
  prompt,
  lengths,
  rng,
  temperature,
  top_p,
  eos,
  *,
  max_new_tokens: int,
  min_len: int,
  greedy: bool,
  top_k: int,
  nucleus: bool,
  vocab_limit: int | None = None,
  stream: bool = False,
  layout: sharding.Layout | None = None,
):
  """`prompt [batch, P]` right-padded, `lengths [batch]` int32 (min_len <= lengths <= P).

  Returns `[batch, max_new_tokens]` int32 and the per-row count of generated tokens `[batch]`.
  `temperature, top_p` fp32 scalars, `eos` int32 scalar (-1 = none) are traced: changing them
  does not recompile.

  Prompts of different lengths share one loop: the first `min_len` tokens of every row are
  prefilled in parallel, then each step feeds every row its next prompt token while it has
  one (teacher forcing) and its last sampled token after; a row emits from the step its prompt
  is consumed and stops at its own EOS. Every row sits at the same position, so one
  `[batch, 1]` decode step serves all (no padding masks, exact for both model kinds).
  vocab_limit: only ids below it are sampled. stream: each step's tokens go to
  `_emit_tokens` (host callback, in order). layout: the caller's `parallel.sharding.active()`
  (`min_len` then a multiple of its context size, or the prefill runs unsplit).
  """
  with sharding.within(layout):  # the prefill splits the prompt over the context axis
    model = prepare_for_decoding(nnx.merge(graphdef, params))  # weights prepared once
    batch, prompt_len = prompt.shape
    rows = jnp.arange(batch)
    sample = functools.partial(
      sample_traced,
      temperature=temperature,
      top_p=top_p,
      greedy=greedy,
      top_k=top_k,
      nucleus=nucleus,
    )
    fill = jnp.maximum(eos, 0)  # what a finished row is fed (its output repeats the EOS)
    # MatMul-free: `h [layers, batch, d]` whatever the length; Transformer++: KV cache of
    # prompt_len + max_new_tokens positions.
    state = model.init_state(batch, prompt_len + max_new_tokens)
    logits, state = model(prompt[:, :min_len], state=state)  # prefill: parallel

    def emit(t, logits, out, count, done, rng):
      """Samples after `t` consumed tokens; rows past their prompt record it."""
      rng, key = jax.random.split(rng)
      if vocab_limit is not None:
        keep = jnp.arange(logits.shape[-1]) < vocab_limit
        logits = jnp.where(keep, logits, jnp.finfo(logits.dtype).min)
      token = sample(logits, key)
      emitting = (t >= lengths) & ~done
      slot = jnp.minimum(count, max_new_tokens - 1)
      if stream:
        jax.debug.callback(_emit_tokens, slot, token, emitting, ordered=True)
      out = out.at[rows, slot].set(jnp.where(emitting, token, out[rows, slot]))
      count = count + emitting
      done = done | (emitting & ((token == eos) | (count >= max_new_tokens)))
      prompt_next = jax.lax.dynamic_index_in_dim(
        prompt, jnp.minimum(t, prompt_len - 1), 1, keepdims=False
      )
      feed = jnp.where(t < lengths, prompt_next, jnp.where(done, fill, token))
      return feed, out, count, done, rng

    out = jnp.zeros((batch, max_new_tokens), jnp.int32)
    count = jnp.zeros((batch,), jnp.int32)
    t = jnp.int32(min_len)
    feed, out, count, done, rng = emit(t, logits[:, -1], out, count, jnp.zeros((batch,), bool), rng)

    return _decode_loop(model, emit, (t, feed, state, out, count, done, rng))


def prefill_length(shortest: int) -> int:
  """How many prompt tokens the parallel prefill takes: the shortest prompt, rounded down to a
  multiple of the active mesh's context size (the rest is fed one step at a time), so that a
  long prompt is split over the context axis whatever its length."""
  shards = kernel_sharding.seq_shards()
  return shortest - shortest % shards if shortest >= shards else shortest


def _return_freed_heap() -> None:
  """Hands the heap the compiler freed back to the OS (glibc's `malloc_trim`), which glibc
  would otherwise keep resident for the process's life: ~0.1 GB after compiling the packed
  2.7B generate, 8% of its decode-time RSS. A no-op without glibc."""
  try:
    ctypes.CDLL(None).malloc_trim(0)
  except (OSError, AttributeError):  # not glibc
    pass


def generate_batch(
  model: nnx.Module,
  prompts,
  cfg: SamplingConfig = SamplingConfig(),
  *,
  seed: int = 0,
  vocab_limit: int | None = None,
  on_tokens: Callable[[int, np.ndarray], None] | None = None,
) -> list[list[int]]:
  """Continues prompts of different lengths in one decode loop.

  Args:
    model: a `MatMulFreeLM`, `TransformerLM` or packed `PackedLM`.
    prompts: token-id lists (each >= 1 token), any lengths.
    cfg: sampling settings; each row stops at its own `eos_id` (kept as its last token).
    seed: PRNG seed of the sampling (unused when greedy).
    vocab_limit: sample only ids below it (a model vocab padded past the tokenizer's).
    on_tokens: called as `on_tokens(position, tokens [batch])` at every step where row 0
      emits (streaming; the whole batch's sampled tokens of that step). Under a
      `parallel.sharding.logical_sharding` mesh (an ordered host callback needs one device)
      it is called after the loop instead, once per token of row 0, with `out[:, position]`.
  Returns:
    the new tokens of each prompt, in order (at most max_new_tokens; ends with the EOS when
    it stopped there).
  """
  prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
  if not prompts or any(p.size == 0 for p in prompts):
    raise ValueError(
      "every prompt needs at least one token (e.g. BOS); got "
      f"{[int(p.size) for p in prompts]} tokens"
    )
  cfg.validate()
  lengths = np.asarray([p.size for p in prompts], np.int32)
  padded = np.zeros((len(prompts), int(lengths.max())), np.int32)
  for row, p in enumerate(prompts):
    padded[row, : p.size] = p
  check_token_ids(padded, model.cfg.vocab_size)
  check_generation_fits(
    model.cfg,
    len(prompts),
    padded.shape[1],
    cfg.max_new_tokens,
    frozen_copy=isinstance(model, (MatMulFreeLM, TransformerLM)),
  )
  graphdef, params = nnx.split(model)
  layout = sharding.active()
  params = sharding.place_params(params)
  eos = -1 if cfg.eos_id is None else cfg.eos_id
  stream = on_tokens is not None and layout is None
  if stream:
    _STREAM_SINK.append(on_tokens)
  compiled = _generate._cache_size()  # pylint: disable=protected-access
  try:
    out, count = _generate(
      graphdef,
      params,
      sharding.place(padded, ("activation_batch", "activation_seq")),
      jnp.asarray(lengths),
      jax.random.key(seed),
      jnp.float32(cfg.temperature),
      jnp.float32(cfg.top_p),
      jnp.int32(eos),
      max_new_tokens=cfg.max_new_tokens,
      min_len=prefill_length(int(lengths.min())),
      vocab_limit=vocab_limit,
      stream=stream,
      layout=layout,
      **static_sampling(cfg),
    )
    out, count = np.asarray(out), np.asarray(count)
  finally:
    if stream:
      _STREAM_SINK.pop()
  if _generate._cache_size() > compiled:  # pylint: disable=protected-access
    _return_freed_heap()
  for position in range(count[0] if on_tokens is not None and not stream else 0):
    on_tokens(position, out[:, position])
  return [out[row, : count[row]].tolist() for row in range(len(prompts))]


def generate(
  model: nnx.Module,
  prompt_tokens,
  cfg: SamplingConfig = SamplingConfig(),
  *,
  seed: int = 0,
  vocab_limit: int | None = None,
  on_tokens: Callable[[int, np.ndarray], None] | None = None,
) -> np.ndarray:
  """Continues each prompt row.

  Args:
    model: a `MatMulFreeLM`, `TransformerLM` or packed `PackedLM`.
    prompt_tokens: `[batch, prompt_len]` int ids (rows of equal length, prompt_len >= 1; for
      rows of different lengths use `generate_batch`).
    cfg: sampling settings.
    seed: PRNG seed of the sampling (unused when greedy).
    vocab_limit, on_tokens: as `generate_batch`.
  Returns:
    `[batch, n]` int32 new tokens, n <= max_new_tokens (fewer when every row hit EOS);
    after a row's EOS, its remaining slots repeat the EOS id.
  """
  prompt = np.asarray(prompt_tokens, np.int32)
  if prompt.ndim != 2 or prompt.shape[1] == 0:
    raise ValueError(
      f"prompt must be [batch, prompt_len >= 1] token ids; got {prompt.shape}. "
      "An empty prompt has no context: pass at least one token (e.g. BOS)"
    )
  rows = generate_batch(
    model, list(prompt), cfg, seed=seed, vocab_limit=vocab_limit, on_tokens=on_tokens
  )
  n = max(len(r) for r in rows)
  fill = 0 if cfg.eos_id is None else cfg.eos_id
  return np.asarray([r + [fill] * (n - len(r)) for r in rows], np.int32).reshape(len(rows), n)


class Generation(NamedTuple):
  """One text generation: the continuation, its ids, why it stopped, notes on the context."""

  prompt: str
  text: str
  prompt_tokens: int
  new_tokens: list[int]
  stopped_at_eos: bool
  notes: list[str]


def context_notes(
  model_cfg, prompt_len: int, max_new_tokens: int, context_limit: int | None
) -> list[str]:
  """What a prompt of `prompt_len` tokens means for this model's memory and context.

  context_limit: the trained `data.seq_len` (None: not known).
  """
  total = prompt_len + max_new_tokens
  if model_cfg.kind == "mmfree":
    note = (
      f"MatMul-free LM: no context limit; the decode state is a constant-size "
      f"[{model_cfg.num_layers}, batch, {model_cfg.d_model}] recurrent state (no KV "
      f"cache)"
    )
    if context_limit is not None and total > context_limit:
      note += (
        f"; prompt + new tokens = {prompt_len} + {max_new_tokens} = {total} exceed "
        f"the trained data.seq_len={context_limit}, which is fine for it"
      )
    return [note]
  notes = [
    f"Transformer++: KV cache sized to prompt + new tokens = {prompt_len} + "
    f"{max_new_tokens} = {total} positions"
  ]
  if context_limit is not None and total > context_limit:
    notes.append(
      f"Transformer++: {total} positions exceed the trained data.seq_len="
      f"{context_limit}; RoPE positions beyond it were never trained, quality may "
      "drop"
    )
  return notes


class _TextStream:
  """Turns streamed token ids into text pieces for `on_text` (stops at EOS; a piece is what
  decoding the ids so far adds, so multi-token characters come out whole)."""

  def __init__(self, tokenizer, eos_id, on_text):
    self.tokenizer, self.eos_id, self.on_text = tokenizer, eos_id, on_text
    self.ids, self.shown, self.done = [], "", False

  def __call__(self, position, tokens):
    del position
    token = int(tokens[0])
    if self.done or token == self.eos_id:
      self.done = True
      return
    self.ids.append(token)
    text = self.tokenizer.decode(self.ids)
    if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
      return
    if text.startswith(self.shown):
      self.on_text(text[len(self.shown) :])
    self.shown = text


def generate_text(
  model: nnx.Module,
  tokenizer,
  prompt: str,
  cfg: SamplingConfig = SamplingConfig(),
  *,
  seed: int = 0,
  context_limit: int | None = None,
  on_text: Callable[[str], None] | None = None,
) -> Generation:
  """Continues `prompt` (text) until EOS or `cfg.max_new_tokens`.

  The prompt starts as a training document does (`[bos]` where the tokenizer has one);
  `cfg.eos_id` defaults to the tokenizer's EOS. The returned text stops before the EOS. Only
  ids the tokenizer has are sampled (a model vocab padded past them never emits the rest).
  on_text: called with each new piece of text as it is generated (e.g. print it).
  """
  if not prompt:
    raise ValueError(
      "empty prompt: generation needs some text to continue; pass --prompt "
      "with at least one character"
    )
  ids = document_start(tokenizer) + tokenizer.encode(prompt)
  if not ids:
    raise ValueError(f"prompt {prompt!r} encodes to no tokens; pass some text")
  if cfg.eos_id is None:
    cfg = cfg._replace(eos_id=tokenizer.eos_id)
  notes = context_notes(model.cfg, len(ids), cfg.max_new_tokens, context_limit)
  for note in notes:
    log.info(note)
  limit = tokenizer.vocab_size if tokenizer.vocab_size < model.cfg.vocab_size else None
  stream = _TextStream(tokenizer, cfg.eos_id, on_text) if on_text is not None else None
  new = generate(
    model, np.asarray([ids], np.int32), cfg, seed=seed, vocab_limit=limit, on_tokens=stream
  )[0].tolist()
  stopped = cfg.eos_id in new
  if stopped:
    new = new[: new.index(cfg.eos_id)]
  return Generation(prompt, tokenizer.decode(new), len(ids), new, stopped, notes)
