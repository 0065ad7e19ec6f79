"""Goodput: the share of a workdir's wall time spent on training steps that were kept.

As MaxText measures it (the ml-goodput-measurement library): goodput = productive step time /
wall time, where a step is productive when its result survives (a step computed after the last
checkpoint of a run that then died is redone by the next run, and counts as badput). The rest
of the wall time is itemised, each as a fraction of the wall time (all of them sum to 1):

- `compile`: the train step's compile in setup and the whole first step of each run (MaxText's
  program startup: tracing, compiling, loading the executable);
- `checkpoint_save`: the host time a save blocks the loop (the async save's copy off the device
  and its launch) and the wait for the last save at the end; `checkpoint_restore`: the resume;
- `data`: the host time blocked fetching the next batch (MaxText's synchronous data loading);
- `restarts`: the time of steps a later run redid (steps after the checkpoint it resumed
  from) plus the start-up of every run after the first (MaxText's wasted progress from
  disruptions and its re-initialisation);
- `startup`: the first run's start-up before its loop (devices, mesh, data readers, state);
- `eval`: validation; `other`: the rest (logging, the time after a run's last step).

Wall time is the sum of each run's own time from setup to its last record; the gap between a
run's end (or death) and the next start is not counted (a queue's wait and a person's pause look
the same from here). Each run's record is one line of `WORKDIR/goodput.jsonl`, rewritten whole
(through `mmfree_jax.paths`, so a `gs://` workdir works) at log steps, checkpoints and the end;
a run killed between two records loses only the time since its last one.

Pure accounting (no jax): `Recorder` times one run's phases on an injectable clock,
`breakdown` turns run records into fractions, `Ledger` keeps the records in the workdir.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator

from mmfree_jax import paths

log = logging.getLogger("mmfree_jax")

LEDGER = "goodput.jsonl"
# Phases a run times directly; `startup` is what its setup spent outside them.
PHASES = ("compile", "checkpoint_save", "checkpoint_restore", "data", "eval", "other")
# The badput categories of `breakdown`, in the order the summary prints them.
BADPUT = (
  "compile",
  "checkpoint_save",
  "checkpoint_restore",
  "data",
  "restarts",
  "startup",
  "eval",
  "other",
)


class Recorder:
  """One run's timeline: named phases and the step laps between them, on one clock.

  Every second from `start` to the last call lands in exactly one bucket: a phase (timed by
  `phase`), the start-up (before `begin_loop`, outside phases), a step lap (`lap`: the loop's
  time since the previous lap, less the phases inside it) or, after the last call, `other`.
  """

  def __init__(self, clock: Callable[[], float] = time.perf_counter, start: float | None = None):
    self.clock = clock
    self.start = clock() if start is None else start
    self.unix_start = time.time()
    self.phases = dict.fromkeys(PHASES, 0.0)
    self.startup_s = 0.0
    self.step_s = 0.0  # seconds of productive steps (laps, less each run's first step)
    self.first_step = self.last_step = 0
    self.marks: list[list[float]] = []  # [step, step_s after it] at checkpoints
    self._lap_at = self._phases_at = None

  def _phase_total(self) -> float:
    return sum(self.phases.values())

  @contextlib.contextmanager
  def phase(self, name: str | None) -> Iterator[None]:
    """Times the block into phase `name` (one of `PHASES`); None times nothing."""
    if name is None:
      yield
      return
    if name not in self.phases:
      raise ValueError(f"unknown goodput phase {name!r}; one of {PHASES}")
    began = self.clock()
    try:
      yield
    finally:
      self.phases[name] += self.clock() - began

  def begin_loop(self, first_step: int) -> None:
    """The loop starts at `first_step`: what setup spent outside phases is the start-up."""
    now = self.clock()
    self.first_step = self.last_step = int(first_step)
    self.startup_s = now - self.start - self._phase_total()
    self._lap_at, self._phases_at = now, self._phase_total()

  def lap(self, step: int, *, first: bool = False) -> None:
    """Step `step` is done: the loop's time since the last lap, less its phases, is the step's
    (the `compile` phase's for a run's first step)."""
    if self._lap_at is None:
      raise RuntimeError("Recorder.lap before begin_loop")
    now, phases = self.clock(), self._phase_total()
    seconds = (now - self._lap_at) - (phases - self._phases_at)
    if first:
      self.phases["compile"] += seconds
      phases += seconds
    else:
      self.step_s += seconds
    self._lap_at, self._phases_at = now, phases
    self.last_step = int(step)

  def mark(self, step: int) -> None:
    """A checkpoint of `step` starts: a later run that resumes from it keeps the steps up to
    here (marked before the save, which may not finish; only a committed one is resumed)."""
    self.marks.append([int(step), self.step_s])

  def record(self) -> dict:
    """This run so far, as `goodput.jsonl` holds it (and `breakdown` reads it)."""
    return {
      "unix_start": self.unix_start,
      "first_step": self.first_step,
      "last_step": self.last_step,
      "wall_s": self.clock() - self.start,
      "startup_s": self.startup_s,
      "step_s": self.step_s,
      "phases": dict(self.phases),
      "marks": [list(m) for m in self.marks],
    }


def kept_step_s(record: dict, bound: int | None) -> float:
  """Seconds of `record`'s productive steps a later run kept: those up to step `bound` (the
  step the next run resumed from; None: no later run, all kept)."""
  if bound is None or bound >= record["last_step"]:
    return record["step_s"]
  if bound <= record["first_step"]:
    return 0.0
  at = [s for step, s in record["marks"] if step <= bound]
  return at[-1] if at else 0.0


def _later_bounds(records: list[dict]) -> list[int | None]:
  """For each run, the lowest step any later run resumed from (None for the last run)."""
  bounds, lowest = [], None
  for record in reversed(records):
    bounds.append(lowest)
    first = record["first_step"]
    lowest = first if lowest is None else min(lowest, first)
  return bounds[::-1]


def breakdown(records: list[dict]) -> dict:
  """Goodput and the badput fractions of a workdir's runs (oldest first, the last may be
  running): `goodput` + every `badput_<category>` (`BADPUT`) = 1; plus `goodput_wall_s` and
  `goodput_lost_steps` (steps computed and then redone after a restart)."""
  wall = sum(r["wall_s"] for r in records)
  badput = dict.fromkeys(BADPUT, 0.0)
  productive, lost_steps = 0.0, 0
  for i, (record, bound) in enumerate(zip(records, _later_bounds(records))):
    kept = kept_step_s(record, bound)
    productive += kept
    badput["restarts"] += record["step_s"] - kept
    if bound is not None and bound < record["last_step"]:
      lost_steps += record["last_step"] - max(bound, record["first_step"])
    badput["restarts" if i > 0 else "startup"] += record["startup_s"]
    for name, seconds in record["phases"].items():
      badput[name] += seconds
  # `other` also holds each run's time after its last lap (closing, the final record).
  badput["other"] = wall - productive - sum(v for k, v in badput.items() if k != "other")
  scale = 1.0 / wall if wall > 0 else 0.0
  out = {"goodput": productive * scale}
  out.update({f"badput_{k}": v * scale for k, v in badput.items()})
  out.update(goodput_wall_s=wall, goodput_lost_steps=lost_steps)
  return out


def summary_line(fractions: dict) -> str:
  """`goodput 87.3% (compile 8.1%, checkpoint 2.0%, data 1.1%, restarts 1.5%, …)`."""
  f = {k[len("badput_") :]: v for k, v in fractions.items() if k.startswith("badput_")}
  parts = {
    "compile": f["compile"],
    "checkpoint": f["checkpoint_save"] + f["checkpoint_restore"],
    "data": f["data"],
    "restarts": f["restarts"],
    "startup": f["startup"],
    "eval": f["eval"],
    "other": f["other"],
  }
  items = ", ".join(f"{k} {100 * v:.1f}%" for k, v in parts.items())
  lost = int(fractions["goodput_lost_steps"])
  redone = f"; {lost} step(s) redone after restarts" if lost else ""
  wall = fractions["goodput_wall_s"]
  return f"goodput {100 * fractions['goodput']:.1f}% ({items}) of {wall:.1f}s{redone}"


class Ledger:
  """`WORKDIR/goodput.jsonl`: one record per run of the workdir, the current run's last.

  The earlier runs' records are read once; `save` rewrites the file whole (atomically on every
  backend). Only the writing process (process 0) saves; every process can compute `fractions`.
  An unreadable file is reported and counted as no earlier runs: accounting never stops a run.
  """

  def __init__(self, workdir: str, recorder: Recorder, *, enabled: bool = True):
    self.path = paths.join(workdir, LEDGER)
    self.recorder = recorder
    self.enabled = enabled
    self.earlier = _read(self.path)

  def fractions(self) -> dict:
    return breakdown(self.earlier + [self.recorder.record()])

  def save(self) -> dict:
    """Writes the records (process 0) and returns their `breakdown`."""
    with self.recorder.phase("other"):
      records = self.earlier + [self.recorder.record()]
      if self.enabled:
        paths.write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in records))
    return breakdown(records)


_RECORD_KEYS = ("first_step", "last_step", "wall_s", "startup_s", "step_s", "phases", "marks")


def _read(path: str) -> list[dict]:
  try:
    text = paths.read_text(path) if paths.exists(path) else ""
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    for r in records:
      missing = [k for k in _RECORD_KEYS if k not in r]
      if missing:
        raise KeyError(f"a record lacks {missing}")
  except (OSError, ValueError, KeyError, TypeError) as e:
    log.warning("ignoring %s (%s): goodput counts this run only", path, e)
    return []
  return records
