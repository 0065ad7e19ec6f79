"""The accelerator chip table: datasheet peaks, HBM and interconnect per chip (jax-free).

Every datasheet number in the repository lives here. A chip is found by the exact
`jax.Device.device_kind` string its runtime reports, or by an alias listed with it, never by
a prefix: "NVIDIA H100 PCIe" and "NVIDIA H100 NVL" start like the SXM part but have ~0.76x
and ~0.84x its peaks, and libtpu reports a v5p as "TPU v5". A kind not in the table has no
datasheet peak (`lookup` returns None) and callers measure instead.

Sources (dense figures; NVIDIA's datasheets print the 2:4-sparse figure, twice the dense one):
  H100 SXM / PCIe / NVL: nvidia.com/en-us/data-center/h100 (datasheet, 2023)
  H200 SXM / NVL:        nvidia.com/en-us/data-center/h200 (datasheet, 2024)
  GH200:                 nvidia.com/en-us/data-center/grace-hopper-superchip (datasheet, 2024):
                         H100 compute with 96 GB HBM3 at 4 TB/s or 144 GB HBM3e at 4.9 TB/s
  B200:                  nvidia.com/en-us/data-center/hgx (HGX B200, per GPU)
  A100:                  nvidia.com/en-us/data-center/a100 (datasheet, 2021)
  TPU v4 / v5e / v5p / v6e: cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e} (v5p int8: the Cloud
                         TPU v5p launch post, 2023-12-06); ICI is the bidirectional per-chip
                         figure (v5p's 4800 Gbps each way = 1200 GB/s); v4's page gives none.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip's datasheet values (per chip; None where the datasheet has none)."""

  name: str
  bf16_flops: float  # dense bf16 matmul FLOP/s
  int8_ops: float  # dense int8 matmul OP/s
  hbm_bytes: float
  hbm_bytes_per_s: float
  ici_bytes_per_s: float | None  # chip-to-chip (TPU ICI / NVLink), bidirectional
  device_kinds: tuple[str, ...]  # what `jax.Device.device_kind` reports for it


CHIPS = {
  c.name: c
  for c in (
    Chip("H100 SXM", 989.5e12, 1979e12, 80e9, 3.35e12, 900e9, ("NVIDIA H100 80GB HBM3",)),
    Chip("H100 PCIe", 756.5e12, 1513e12, 80e9, 2.0e12, 600e9, ("NVIDIA H100 PCIe",)),
    Chip("H100 NVL", 835.5e12, 1670.5e12, 94e9, 3.9e12, 600e9, ("NVIDIA H100 NVL",)),
    Chip("H200 SXM", 989.5e12, 1979e12, 141e9, 4.8e12, 900e9, ("NVIDIA H200",)),
    Chip("H200 NVL", 835.5e12, 1670.5e12, 141e9, 4.8e12, 900e9, ("NVIDIA H200 NVL",)),
    Chip("GH200 96GB", 989.5e12, 1979e12, 96e9, 4.0e12, 900e9, ("NVIDIA GH200 480GB",)),
    Chip("GH200 144GB", 989.5e12, 1979e12, 144e9, 4.9e12, 900e9, ("NVIDIA GH200 144G HBM3e",)),
    Chip("B200", 2250e12, 4500e12, 180e9, 8.0e12, 1800e9, ("NVIDIA B200",)),
    Chip("A100 SXM 80GB", 312e12, 624e12, 80e9, 2.039e12, 600e9, ("NVIDIA A100-SXM4-80GB",)),
    Chip("A100 SXM 40GB", 312e12, 624e12, 40e9, 1.555e12, 600e9, ("NVIDIA A100-SXM4-40GB",)),
    Chip("A100 PCIe 80GB", 312e12, 624e12, 80e9, 1.935e12, 600e9, ("NVIDIA A100 80GB PCIe",)),
    Chip("A100 PCIe 40GB", 312e12, 624e12, 40e9, 1.555e12, 600e9, ("NVIDIA A100-PCIE-40GB",)),
    Chip("TPU v4", 275e12, 275e12, 32 * 2**30, 1200e9, None, ("TPU v4",)),
    Chip("TPU v5e", 197e12, 393e12, 16e9, 819e9, 400e9, ("TPU v5 lite", "TPU v5e")),
    Chip("TPU v5p", 459e12, 918e12, 95e9, 2765e9, 1200e9, ("TPU v5", "TPU v5p")),
    Chip("TPU v6e", 918e12, 1836e12, 32e9, 1638e9, 800e9, ("TPU v6 lite", "TPU v6e")),
  )
}

_BY_KIND = {kind: chip for chip in CHIPS.values() for kind in chip.device_kinds}
if len(_BY_KIND) != sum(len(c.device_kinds) for c in CHIPS.values()):
  raise AssertionError("a device_kind is listed under two chips")


def lookup(device_kind: str) -> Chip | None:
  """The chip whose runtime reports exactly `device_kind` (or a listed alias), else None."""
  return _BY_KIND.get(device_kind.strip())


def chip(name: str) -> Chip:
  """A chip by its table name (e.g. "TPU v5p"); a clear error naming the choices."""
  if name not in CHIPS:
    raise ValueError(f"unknown chip {name!r}; the table has {sorted(CHIPS)}")
  return CHIPS[name]
