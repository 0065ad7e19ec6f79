"""The CLIs start clean in the runtime venv, also after the README's test command ran: the
compile-only TPU/CUDA toolchains it installs go to `.venv-accel` (tests/conftest.py puts them
on the test path), so a CLI on a machine without an accelerator prints no plugin tracebacks,
no `cudart_stub` lines and no libtpu host errors."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ACCEL_TOOLCHAINS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What jax prints when the toolchains are importable on a host without their devices.
NOISE = (
  "Traceback",
  "cudart_stub",
  "Unable to load CUDA",
  "TPU_WORKER_HOSTNAMES",
  "Jax plugin configuration error",
)


def _runtime_env():
  """The user's environment: no test-only path entries, no platform forced by the tests."""
  # jax sets TPU_LIBRARY_PATH (and other TPU_* variables) in a process that loaded libtpu; a
  # test worker that compiled for TPU passes them on to its subprocesses.
  dropped = ("JAX_PLATFORMS", "PYTHONPATH", "TF_CPP_MIN_LOG_LEVEL", "ALLOW_MULTIPLE_LIBTPU_LOAD")
  env = {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith("TPU_")}
  env["PYTHONPATH"] = REPO
  return env


def _noise(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if any(n in line for n in NOISE)]


@pytest.mark.subprocess
def test_toolchains_stay_out_of_the_runtime_venv():
  """The venv the CLIs run in cannot import the compile-only toolchains (the test command
  installs them beside it); if it could, every CLI would start with the noise above."""
  code = (
    "import importlib.util as u; "
    "print([m for m in ('libtpu', 'jax_cuda12_plugin', 'jax_plugins.xla_cuda12') "
    "if u.find_spec(m.split('.')[0]) and u.find_spec(m)])"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code],
    env=_runtime_env(),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=60,
    check=True,
  )
  assert proc.stdout.strip() == "[]", (
    f"the runtime venv imports {proc.stdout.strip()}: install requirements-accel.txt with "
    f"`pip install --no-deps --target {os.path.basename(ACCEL_TOOLCHAINS)}` (README)"
  )


@pytest.mark.subprocess
def test_cli_stderr_is_clean(tmp_path):
  """A CLI that initializes jax's backends (train.py --print_config resolves the platform's
  implementations) prints nothing from the plugins on stderr."""
  proc = subprocess.run(
    [sys.executable, os.path.join(REPO, "train.py"), "--print_config"],
    env=_runtime_env(),
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  code = "import jax; print(jax.devices())"
  devices = subprocess.run(
    [sys.executable, "-c", code],
    env=_runtime_env(),
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert devices.returncode == 0 and "CpuDevice" in devices.stdout, devices.stderr[-2000:]
  assert _noise(proc.stderr) + _noise(devices.stderr) == []
