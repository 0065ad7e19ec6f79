"""Hard time budgets for benchmark sections whose items run in child processes.

A section is a list of item keys in priority order (the most valuable first). `run_section`
hands the keys still to do to a `launch(keys, budget)` generator, which runs some prefix of
them and yields one row per finished key; `child_rows` is the real launcher (a child process
per launch, killed at the budget). A launch that stops early is launched again with the keys
left while time is left; the key it was running is reported as cut when the budget is spent,
or as failed when a launch on it yields nothing (its process died: out of memory, a crash);
keys never started are reported as skipped.
`on_row` sees every row as it arrives (the caller writes its JSON there), so a run killed
from outside keeps what it measured. The clock is injectable: tests drive it by hand.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from typing import Callable, Iterable, Iterator

ROW_PREFIX = "BENCH_ROW "


class Budget:
  """A deadline `seconds` from now on `clock` (monotonic seconds)."""

  def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
    self.seconds, self.clock = float(seconds), clock
    self.end = clock() + self.seconds

  def left(self) -> float:
    return max(0.0, self.end - self.clock())


Launch = Callable[[list, Budget], Iterable[dict]]


def run_section(
  keys: list, launch: Launch, budget: Budget, on_row: Callable[[dict], None] = lambda row: None
) -> list[dict]:
  """Rows for `keys` in order (see the module docstring); each row has `"key"`."""
  rows, pending = [], list(keys)

  def emit(row):
    rows.append(row)
    on_row(row)

  while pending and budget.left() > 0:
    done = 0
    for row in launch(list(pending), budget):
      if row.get("key") not in pending:
        raise ValueError(f"launch yielded a row for {row.get('key')!r}, not one of {pending}")
      pending.remove(row["key"])
      emit(row)
      done += 1
    cut = budget.left() <= 0
    if pending and (cut or not done):  # the launch stopped on its first key left, running
      emit(
        {
          "key": pending.pop(0),
          "error": (
            f"cut: the section's {budget.seconds:.0f} s budget ran out while it ran"
            if cut
            else "its process died before it finished (out of memory or a crash)"
          ),
        }
      )
  for key in pending:
    emit({"key": key, "skipped": f"time budget ({budget.seconds:.0f} s) spent"})
  return rows


def print_row(row: dict) -> None:
  """What a child prints for each finished key."""
  print(ROW_PREFIX + json.dumps(row, default=float), flush=True)


def child_rows(
  argv: list[str], keys: list, budget: Budget, *, cwd: str, env: dict | None = None
) -> Iterator[dict]:
  """Runs `python argv... --_keys JSON` and yields the rows it prints (`print_row`); kills it
  when `budget` runs out. Its other output passes through to this process's stdout."""
  proc = subprocess.Popen(
    [sys.executable] + argv + ["--_keys", json.dumps(keys)],
    cwd=cwd,
    env=env or dict(os.environ),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    bufsize=1,
  )
  lines: queue.Queue = queue.Queue()

  def pump():
    for line in proc.stdout:
      lines.put(line)
    lines.put(None)

  threading.Thread(target=pump, daemon=True).start()
  try:
    while True:
      try:
        line = lines.get(timeout=max(budget.left(), 0.01))
      except queue.Empty:
        return  # budget spent: the finally kills the child
      if line is None:
        return
      if line.startswith(ROW_PREFIX):
        yield json.loads(line[len(ROW_PREFIX) :])
      else:
        print(line, end="", flush=True)
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait()
