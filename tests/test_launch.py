"""The launchers in launch/: `dist.coordinator=auto` without a cluster, the JobSet gives every
pod what `dist.coordinator=auto` reads, the TPU VM command is the README's. That SLURM
discovery trains like an explicit coordinator (bitwise) is part of
tests/test_training_e2e.py::test_two_processes_match_one, which runs that explicit pair anyway."""

import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from mmfree_jax.parallel import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")


def _read(*path):
  with open(os.path.join(*path)) as f:
    return f.read()


# ---- SLURM: dist.coordinator=auto from the SLURM_* variables ----


@pytest.mark.subprocess
def test_auto_without_a_cluster_is_one_clear_line(monkeypatch):
  for k in list(os.environ):
    if k.startswith(("SLURM_", "TPU_", "MEGASCALE_", "OMPI_", "KUBERNETES_")):
      monkeypatch.delenv(k)
  script = (
    "from mmfree_jax.config import base_config\n"
    "from mmfree_jax.parallel import distributed\n"
    "c = base_config(); c.dist.coordinator = 'auto'\n"
    "distributed.maybe_initialize(c.dist)\n"
  )
  run = subprocess.run(
    [sys.executable, "-c", script],
    check=False,
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    timeout=120,
  )
  assert run.returncode != 0
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith("ValueError: dist.coordinator=auto found no cluster environment")
  assert "launch/" in last


@pytest.mark.subprocess
def test_sbatch_script_runs_train_py_under_srun_with_auto(tmp_path):
  """The script, with a stand-in `srun` that records its argv: one task per GPU and every
  argument passed on to train.py after `--config.dist.coordinator=auto`."""
  text = _read(LAUNCH, "slurm.sbatch")
  directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.MULTILINE))
  assert directives["ntasks-per-node"] == directives["gpus-per-node"]
  fake = tmp_path / "bin"
  fake.mkdir()
  (fake / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
  (fake / "srun").chmod(0o755)
  env = {
    **os.environ,
    "PATH": f"{fake}:{os.environ['PATH']}",
    "SRUN_ARGS": str(tmp_path / "a"),
    "MMFREE_REPO": REPO,
    "MMFREE_PYTHON": "/opt/py/bin/python",
  }
  subprocess.run(
    ["bash", os.path.join(LAUNCH, "slurm.sbatch"), "--workdir=/shared/w", "--config.train.steps=5"],
    env=env,
    check=True,
    timeout=60,
  )
  argv = (tmp_path / "a").read_text().splitlines()
  assert argv == [
    "--kill-on-bad-exit=1",
    "/opt/py/bin/python",
    "train.py",
    "--config.dist.coordinator=auto",
    "--noprogress",
    "--workdir=/shared/w",
    "--config.train.steps=5",
  ]


# ---- GKE JobSet ----


def _pod_env(container, slice_id, host):
  """The container's environment in pod `host` of slice `slice_id`, as Kubernetes renders it:
  the JobSet/Job index annotations and `$(VAR)` references to earlier variables."""
  annotations = {
    "jobset.sigs.k8s.io/job-index": str(slice_id),
    "batch.kubernetes.io/job-completion-index": str(host),
  }
  env = {}
  for var in container["env"]:
    if "valueFrom" in var:
      path = var["valueFrom"]["fieldRef"]["fieldPath"]
      key = re.fullmatch(r"metadata\.annotations\['([^']+)'\]", path).group(1)
      env[var["name"]] = annotations[key]
    else:
      env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], var["value"])
  return env


@pytest.mark.tpu_compile
def test_jobset_sets_everything_auto_needs(monkeypatch):
  # what dist.coordinator=auto runs on GKE TPU
  from jax._src.clusters import cloud_tpu_cluster

  jobset = yaml.safe_load(_read(LAUNCH, "jobset.yaml"))
  assert jobset["kind"] == "JobSet" and jobset["spec"]["network"]["enableDNSHostnames"]
  name = jobset["metadata"]["name"]
  (rjob,) = jobset["spec"]["replicatedJobs"]
  job = rjob["template"]["spec"]
  assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"]
  pod = job["template"]["spec"]
  (container,) = pod["containers"]
  assert "--config.dist.coordinator=auto" in container["command"]
  assert any(a.startswith("--workdir=gs://") for a in container["command"])
  config = next(a for a in container["command"] if a.startswith("--config="))
  assert os.path.exists(os.path.join(REPO, config.split("=", 1)[1]))
  chips = int(container["resources"]["limits"]["google.com/tpu"])
  x, y = map(int, pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"].split("x"))
  assert job["completions"] * chips == x * y  # one pod per host of the slice

  slices, hosts = rjob["replicas"], job["completions"]
  ids = []
  for s in range(slices):
    for h in range(hosts):
      env = _pod_env(container, s, h)
      needed = distributed.AUTO_ENV["gke_tpu"] + distributed.AUTO_ENV["multislice"]
      assert set(needed) <= set(env), set(needed) - set(env)
      for k, v in env.items():
        monkeypatch.setenv(k, v)
      cluster = cloud_tpu_cluster.GkeTpuCluster
      own_name = f"{name}-{rjob['name']}-{s}-{h}.{name}"  # the pod's DNS name in the JobSet
      assert cluster._get_worker_list_in_slice()[h] == own_name
      assert cluster.get_process_count() == slices * hosts
      ids.append(cluster.get_process_id())
      assert env["MEGASCALE_COORDINATOR_ADDRESS"] == f"{name}-{rjob['name']}-0-0.{name}"
  assert ids == list(range(slices * hosts))


# ---- TPU VM ----


def _readme_block(marker):
  """The README's bash block whose first command line starts with `marker`: (command, output)."""
  readme = _read(REPO, "README.md")
  for block in re.findall(r"```bash\n(.*?)```", readme, re.DOTALL):
    if block.startswith(marker):
      command, output = block.split("\n", 1)
      return command, output.strip()
  raise AssertionError(f"README has no ```bash block starting with {marker!r}")


@pytest.mark.subprocess
def test_tpu_vm_command_is_the_readmes():
  command, shown = _readme_block("python launch/tpu_vm.py")
  argv = shlex.split(command)
  printed = subprocess.run(
    [sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True, check=True, timeout=60
  ).stdout.strip()
  assert printed == shown
  assert shown.startswith("gcloud compute tpus tpu-vm ssh ") and " --worker=all " in shown
  remote = shlex.split(shown)[-1].removeprefix("--command=")
  assert "train.py --config.dist.coordinator=auto" in remote


@pytest.mark.subprocess
def test_tpu_vm_refuses_dist_flags():
  run = subprocess.run(
    [
      sys.executable,
      os.path.join(LAUNCH, "tpu_vm.py"),
      "--name=a",
      "--zone=z",
      "--",
      "--config.dist.num_processes=4",
    ],
    check=False,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert run.returncode != 0
  assert "--config.dist.num_processes=4 is set by the launcher" in run.stderr


def test_s3_workdir_is_taken_by_one_process_without_a_local_s3_folder(tmp_path, monkeypatch):
  """One process stages an s3:// workdir's checkpoints locally (checkpoint/staging.py), so the
  scheme check passes it (a multi-process run is refused there); nothing is written yet."""
  from mmfree_jax.train import checks

  monkeypatch.chdir(tmp_path)
  checks.check_workdir_scheme("s3://bucket/run")
  assert not os.path.exists(tmp_path / "s3:")
