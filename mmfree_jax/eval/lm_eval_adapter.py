"""lm-eval-harness adapter: run any harness task on a mmfree_jax model.

lm-eval is an OPTIONAL dependency (`pip install lm-eval`); only this module imports it.

  from mmfree_jax.eval.lm_eval_adapter import MMFreeLM
  import lm_eval
  lm = MMFreeLM(workdir="/tmp/tiny")                 # or MMFreeLM(model=m, tokenizer=tok)
  out = lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"], limit=100)

Importing this module also registers the model name `mmfree_jax` with the harness, so
`lm_eval.simple_evaluate(model="mmfree_jax", model_args="workdir=/tmp/tiny,step=400", ...)`
works from Python once the module is imported.

The three request types map onto `mmfree_jax.eval` / `mmfree_jax.generate`:
- `loglikelihood`: `score_continuations` (lm-eval's context/continuation token split; the
  MatMul-free LM prefills each distinct context once and reuses its state for every
  continuation, the Transformer++ recomputes);
- `loglikelihood_rolling`: lm-eval's rolling windows of `max_length` tokens for the
  Transformer++, the whole document with full context for the MatMul-free LM;
- `generate_until`: `generate_batch` (prefill + one jitted decode loop for `batch_size`
  requests of different lengths), cut at the first stop string.
"""

from __future__ import annotations

import logging
from typing import Any

try:
  from lm_eval.api.model import LM
  from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without lm-eval
  raise ImportError(
    "mmfree_jax.eval.lm_eval_adapter needs lm-eval-harness, an optional dependency: "
    "pip install lm-eval"
  ) from e

from mmfree_jax import generate as generate_lib
from mmfree_jax.data.tokenizer import document_start, prefix_token
from mmfree_jax.eval import multiple_choice, perplexity, runner, scoring

log = logging.getLogger("mmfree_jax")


def _int_or_none(value) -> int | None:
  return None if value in (None, "", "None") else int(value)


@register_model("mmfree_jax")
class MMFreeLM(LM):
  """A MatMul-free LM or Transformer++ behind lm-eval's `LM` interface.

  Args:
    workdir, step, config: load the checkpoint (`runner.load_for_eval`), or with
      `packed=True` the packed directory `workdir` (`runner.load_packed_for_eval`, with the
      `packed_method` product); or
    model, tokenizer: an in-memory model and tokenizer (`mmfree_jax.data.Tokenizer`-like).
    batch_size: rows per forward ("auto" = 16).
    max_length: Transformer++ context window (default: the workdir's data.seq_len, else
      unlimited); the MatMul-free LM has no limit and ignores it.
    max_gen_toks: default generation length of `generate_until`.
    chunk_len: MatMul-free tokens per forward chunk.
    seed: sampling seed of `generate_until` when a task asks for sampling.
  """

  def __init__(
    self,
    workdir: str | None = None,
    step=None,
    *,
    model=None,
    tokenizer=None,
    config=None,
    batch_size: Any = 16,
    max_length=None,
    max_gen_toks: int = 256,
    chunk_len: int = 512,
    seed: int = 0,
    packed=False,
    packed_method: str = runner.DEFAULT_METHOD,
    **unused,
  ):
    super().__init__()
    if unused:
      log.info("MMFreeLM ignores lm-eval arguments %s", sorted(unused))
    if (workdir is None) == (model is None):
      raise ValueError("MMFreeLM needs either workdir=... or model=... and tokenizer=...")
    seq_len = None
    if workdir is not None:
      if packed not in (False, None, "", "False", "false", "0"):  # a packed directory
        model, cfg, step = runner.load_packed_for_eval(workdir, config, packed_method)
      else:
        model, cfg, step = runner.load_for_eval(workdir, _int_or_none(step), config)
      tokenizer = tokenizer or runner.load_tokenizer_for(cfg, model.cfg)
      seq_len = int(cfg.data.seq_len)
    elif tokenizer is None:
      raise ValueError("MMFreeLM(model=...) also needs tokenizer=...")
    self.model, self.tokenizer, self.step = model, tokenizer, step
    self.batch_size = 16 if batch_size in (None, "auto") else int(str(batch_size).split(":")[0])
    max_length = _int_or_none(max_length) or seq_len
    self.max_length = max_length if model.cfg.kind == "transformer" else None
    self.max_gen_toks = int(max_gen_toks)
    self.chunk_len = int(chunk_len)
    self.seed = int(seed)

  def _score(self, pairs):
    """`(ll, is_greedy)` per (context ids, continuation ids); an empty continuation is 0."""
    scorable = [k for k, (_, cont) in enumerate(pairs) if cont]
    scored = scoring.score_continuations(
      self.model,
      [pairs[k] for k in scorable],
      batch_size=self.batch_size,
      max_len=self.max_length,
      chunk_len=self.chunk_len,
    )
    out = [(0.0, True)] * len(pairs)
    for k, s in zip(scorable, scored):
      out[k] = (s.logprob, s.is_greedy)
    return out

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    args = [req.args for req in requests]
    pairs = [
      multiple_choice.encode_pair(self.tokenizer, context, continuation)
      for context, continuation in args
    ]
    out = self._score(pairs)
    for (context, continuation), result in zip(args, out):
      self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    prefix = prefix_token(self.tokenizer)
    pairs, owner = [], []
    for k, req in enumerate(requests):
      windows = perplexity.rolling_requests(
        self.tokenizer.encode(req.args[0]), prefix, self.max_length
      )
      pairs += windows
      owner += [k] * len(windows)
    totals = [0.0] * len(requests)
    for k, (ll, _) in zip(owner, self._score(pairs)):
      totals[k] += ll
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
    return totals

  def _sampling(self, gen_kwargs: dict) -> tuple[generate_lib.SamplingConfig, list[str]]:
    kwargs = dict(gen_kwargs or {})
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    if not kwargs.pop("do_sample", temperature > 0):
      temperature = 0.0
    cfg = generate_lib.SamplingConfig(
      max_new_tokens=max_new,
      temperature=temperature,
      top_k=int(kwargs.pop("top_k", 0) or 0),
      top_p=float(kwargs.pop("top_p", 1.0) or 1.0),
      eos_id=self.tokenizer.eos_id,
    )
    return cfg.validate(), until

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Requests with the same generation settings run `batch_size` at a time through
    `generate_batch` (one decode loop, per-row EOS), sorted by prompt length so a batch's
    prompts are close in length (the shorter ones are fed their last prompt tokens inside
    the loop)."""
    jobs = []  # (sampling, until, ids, request index)
    for k, req in enumerate(requests):
      context, gen_kwargs = req.args
      cfg, until = self._sampling(gen_kwargs)
      ids = (
        document_start(self.tokenizer) + self.tokenizer.encode(context)
        if context
        else [prefix_token(self.tokenizer)]
      )
      if self.max_length is not None:  # Transformer++: keep the newest tokens that fit
        ids = ids[-max(self.max_length - cfg.max_new_tokens, 1) :]
      jobs.append((cfg, tuple(until), ids, k))
    groups: dict = {}
    for job in jobs:
      groups.setdefault(job[:2], []).append(job)
    outputs: list[str | None] = [None] * len(requests)
    for (cfg, until), group in groups.items():
      group.sort(key=lambda job: len(job[2]))
      for start in range(0, len(group), self.batch_size):
        batch = group[start : start + self.batch_size]
        news = generate_lib.generate_batch(
          self.model, [job[2] for job in batch], cfg, seed=self.seed
        )
        for (_, _, _, k), new in zip(batch, news):
          if cfg.eos_id in new:
            new = new[: new.index(cfg.eos_id)]
          text = self.tokenizer.decode(new)
          for stop in until:
            if stop and stop in text:
              text = text[: text.index(stop)]
          self.cache_hook.add_partial("generate_until", requests[k].args, text)
          outputs[k] = text
    return outputs


def evaluate_tasks(
  workdir: str,
  tasks: list[str],
  *,
  step: int | None = None,
  config=None,
  batch_size: int = 16,
  limit: int | None = None,
  include_path: str | None = None,
  packed: bool = False,
  packed_method: str = runner.DEFAULT_METHOD,
) -> dict:
  """Runs harness `tasks` on a workdir's checkpoint (a packed directory with `packed`).

  Returns `{"step": N, "lm_eval": {task: {metric: value}}}` (what `eval.py` writes).
  """
  import lm_eval  # pylint: disable=g-import-not-at-top
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top

  lm = MMFreeLM(
    workdir, step, config=config, batch_size=batch_size, packed=packed, packed_method=packed_method
  )
  manager = TaskManager(include_path=include_path) if include_path else TaskManager()
  try:
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager)
  except (OSError, KeyError) as e:  # a dataset download refused or failed; an unknown name
    raise ValueError(_task_error(list(tasks), manager, e)) from None
  return {"step": lm.step, "lm_eval": out["results"]}


def _task_error(tasks: list[str], manager, error: Exception) -> str:
  """One line naming the task that cannot load (found by loading each alone, only after a
  failure) and the offline recipe."""
  from lm_eval.tasks import get_task_dict  # pylint: disable=g-import-not-at-top

  task = None
  for name in tasks:
    try:
      get_task_dict([name], manager)
    except (OSError, KeyError) as e:
      task, error = name, e
      break
  if task is None:
    raise error  # not a task's loading: a genuine bug, with its traceback
  reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
  if isinstance(error, KeyError):
    return (
      f"lm-eval task {task!r} is not a known task or group ({reason}); list them with "
      "`lm-eval ls tasks`, or pass the folder of its YAML with --lm_eval_include_path"
    )
  return (
    f"lm-eval task {task!r} cannot load its dataset ({reason}): it is downloaded from "
    "the Hugging Face Hub. Offline: run it once where the Hub is reachable (the cache "
    "under HF_HOME fills), then set HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1; or write a "
    "task YAML over local files (dataset_path: json, dataset_kwargs: {data_files: ...}) "
    "and pass its folder with --lm_eval_include_path"
  )
