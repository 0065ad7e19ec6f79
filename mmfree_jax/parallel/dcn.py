"""Cross-slice (DCN) traffic of a compiled multi-slice TPU program, read from its HLO text.

libtpu compiles a multi-slice program per slice (`num_partitions` = one slice's chips): the
collectives inside a slice keep their `replica_groups`, and each collective that crosses
slices becomes a `send`/`recv` pair handed to the megascale runtime, tagged with
`_xla_megascale_transfer_type` (`ALL_REDUCE`, `ALL_GATHER`, `ONE_TO_ONE`, ...).
"""

from __future__ import annotations

import dataclasses
import math
import re

_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_CALLEES = re.compile(r"(?:calls|body|condition|to_apply)=%([\w.\-]+)")
_SEND = re.compile(r"= \((\w+)\[([\d,]*)\]")
_KIND = re.compile(r'_xla_megascale_transfer_type="(\w+)"')


@dataclasses.dataclass(frozen=True)
class Transfer:
  """One cross-slice collective: where it is, what it does, its per-chip payload."""

  computation: str
  kind: str  # the megascale transfer type, e.g. ALL_REDUCE
  dtype: str
  elements: int
  in_loop: bool  # inside a while loop body (a layer, microbatch or time scan): per iteration


def computations(hlo_text: str) -> dict[str, list[str]]:
  """HLO module text -> {computation name: its instruction lines}."""
  comps, name = {}, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      name = header.group(1)
      comps[name] = []
    elif name and line.startswith("  "):
      comps[name].append(line)
  return comps


def loop_computations(comps: dict[str, list[str]]) -> set[str]:
  """Computations that run per iteration of a while loop, and everything they call."""
  todo = [
    c
    for lines in comps.values()
    for line in lines
    if " while(" in line
    for c in re.findall(r"(?:body|condition)=%([\w.\-]+)", line)
  ]
  seen = set()
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    for line in comps[name]:
      todo += _CALLEES.findall(line)
  return seen


def dcn_transfers(hlo_text: str) -> list[Transfer]:
  """Each cross-slice send of a compiled multi-slice program (empty for one slice)."""
  comps = computations(hlo_text)
  loops = loop_computations(comps)
  found = []
  for name, lines in comps.items():
    for line in lines:
      if " send(" not in line or "_xla_megascale_transfer_type" not in line:
        continue
      dtype, dims = _SEND.search(line).groups()
      found.append(
        Transfer(
          name,
          _KIND.search(line).group(1),
          dtype,
          math.prod(int(d) for d in dims.split(",") if d),
          name in loops,
        )
      )
  return found
