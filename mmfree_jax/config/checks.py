"""Validators of single config values: a `Check` says in words what it accepts (`rule`), for
the error message, `--print_config` and the generated schema docs."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence


@dataclasses.dataclass(frozen=True)
class Check:
  """`ok(value)` is whether `value` is accepted; `rule` (or what it returns, when a callable:
  a bound read at check time) completes "must be ..."."""

  rule: str | Callable[[], str]
  ok: Callable[[Any], bool]

  @property
  def text(self) -> str:
    return self.rule() if callable(self.rule) else self.rule

  def error(self, name: str, value: Any) -> str | None:
    """`None` when `value` passes, else one line naming the key, the value and the fix."""
    try:
      if self.ok(value):
        return None
    except (TypeError, ValueError):
      pass
    return f"{name} must be {self.text}; got {value!r} (set --config.{name})"


def is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(minimum: int | None = None, *, allow_none: bool = False) -> Check:
  """An int (not a bool) >= `minimum`; `allow_none` also accepts None."""
  rule = "an int" + (f" >= {minimum}" if minimum is not None else "")
  rule += " or None" if allow_none else ""
  return Check(
    rule, lambda v: (allow_none and v is None) or (is_int(v) and (minimum is None or v >= minimum))
  )


def number(
  low: float | None = None,
  high: float | None = None,
  *,
  low_open: bool = False,
  high_open: bool = False,
) -> Check:
  """A finite int or float within the bounds (closed unless `*_open`)."""
  if low is not None and high is not None:
    rule = (
      f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    )
  elif low is not None:
    rule = f"a finite number {'>' if low_open else '>='} {low:g}"
  elif high is not None:
    rule = f"a finite number {'<' if high_open else '<='} {high:g}"
  else:
    rule = "a finite number"

  def ok(v) -> bool:
    if not is_number(v) or not math.isfinite(v):
      return False
    if low is not None and (v <= low if low_open else v < low):
      return False
    return high is None or (v < high if high_open else v <= high)

  return Check(rule, ok)


def one_of(choices: Sequence[str]) -> Check:
  """One of `choices` (a registry's names)."""
  choices = tuple(choices)
  return Check(f"one of {choices}", lambda v: isinstance(v, str) and v in choices)


BOOL = Check("True or False", lambda v: isinstance(v, bool))
TEXT = Check("a string", lambda v: isinstance(v, str))
