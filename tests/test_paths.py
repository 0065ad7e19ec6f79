"""mmfree_jax.paths against a local folder, the GCS emulator and the S3 server (real processes,
tests/storage_emulators.py): the same calls mean the same thing on every backend."""

import os

import pytest

from mmfree_jax import paths


@pytest.fixture(params=["local", "gs", "s3"])
def root(request, tmp_path):
  if request.param == "local":
    return str(tmp_path / "root")
  return request.getfixturevalue(f"{'gcs' if request.param == 'gs' else 's3'}_root")


def test_write_read_list_remove(root):
  paths.makedirs(root)
  paths.write_atomic(paths.join(root, "a.json"), '{"x": 1}')
  paths.makedirs(paths.join(root, "sub"))
  with paths.open_file(paths.join(root, "sub", "b.txt"), "w") as f:
    f.write("one\ntwo\n")
  with paths.open_file(paths.join(root, "sub", "b.txt")) as f:
    assert f.read().splitlines() == ["one", "two"]
  assert paths.read_text(paths.join(root, "a.json")) == '{"x": 1}'
  assert paths.listdir(root) == ["a.json", "sub"]
  assert paths.glob(paths.join(root, "*.json")) == [paths.join(root, "a.json")]
  assert paths.isdir(paths.join(root, "sub")) and paths.isfile(paths.join(root, "a.json"))
  assert paths.size(paths.join(root, "a.json")) == 8
  with paths.local_copy(paths.join(root, "a.json")) as local:
    with open(local, encoding="utf-8") as f:
      assert f.read() == '{"x": 1}'
  paths.remove(paths.join(root, "a.json"))
  assert not paths.exists(paths.join(root, "a.json"))
  paths.rmtree(root)
  assert not paths.exists(paths.join(root, "sub", "b.txt"))


def test_local_dir_for_uploads_on_clean_exit_only(root):
  with paths.local_dir_for(paths.join(root, "out")) as local:
    with open(f"{local}/x.bin", "wb") as f:
      f.write(b"\x00\x01")
  assert paths.read_bytes(paths.join(root, "out", "x.bin")) == b"\x00\x01"
  with pytest.raises(RuntimeError), paths.local_dir_for(paths.join(root, "bad")) as local:
    with open(f"{local}/y.bin", "wb") as f:
      f.write(b"y")
    raise RuntimeError("writer failed")
  if not paths.is_remote(root):
    return  # locally the folder is written in place; the caller publishes it with a marker
  assert not paths.exists(paths.join(root, "bad", "y.bin"))


def test_create_exclusive_refuses_an_existing_object(root):
  """The precondition itself: a hard link locally, `ifGenerationMatch=0` on GCS,
  `If-None-Match: *` on S3."""
  paths.makedirs(root)
  lock = paths.join(root, ".lock")
  assert paths.create_exclusive(lock, b"first")
  assert not paths.create_exclusive(lock, b"second")
  assert paths.read_fresh(lock) == b"first"
  paths.remove(lock)
  assert paths.read_fresh(lock) is None


def test_join_dirname_keep_the_scheme():
  assert paths.join("gs://b/run", "ckpt", "1") == "gs://b/run/ckpt/1"
  assert paths.dirname("gs://b/run/config.json") == "gs://b/run"
  assert paths.basename("s3://b/run/") == "run"
  assert paths.scheme("s3://b/x") == "s3" and paths.scheme("/tmp/x") == "file"


def test_glob_double_star_spans_folders_and_user_paths_expand(root):
  for name in ("a.txt", "sub/b.txt", "sub/deeper/c.txt", "sub/d.json"):
    paths.makedirs(paths.dirname(paths.join(root, name)))
    paths.write_atomic(paths.join(root, name), b"x")
  want = [paths.join(root, n) for n in ("a.txt", "sub/b.txt", "sub/deeper/c.txt")]
  assert [p for p in paths.glob(paths.join(root, "**", "*.txt")) if paths.isfile(p)] == want
  assert paths.has_magic(paths.join(root, "*.txt")) and not paths.has_magic(root)
  want = ["a.txt", "sub/b.txt", "sub/d.json", "sub/deeper/c.txt"]
  assert paths.find(root) == want and paths.find(root + "/") == want
  assert paths.find(paths.join(root, "sub", "deeper")) == ["c.txt"]
  assert paths.file_sizes(paths.join(root, "sub")) == {"b.txt": 1, "d.json": 1}
  assert paths.expanduser(root) == root or not paths.is_remote(root)
  assert paths.expanduser("~/x") == os.path.join(os.path.expanduser("~"), "x")


def test_listings_are_never_stale(root):
  """A folder listed, then written to (through another client of the same store): every
  query sees the new file (no cached listing hides it)."""
  folder = paths.join(root, "out")
  paths.makedirs(folder)
  paths.write_atomic(paths.join(folder, "plan.json"), b"{}")
  assert paths.listdir(folder) == ["plan.json"] and paths.isdir(folder)
  paths.write_atomic(paths.join(folder, "manifest.json"), b"{}")
  with paths.local_dir_for(folder) as local:
    with open(f"{local}/shard.bin", "wb") as f:
      f.write(b"x")
  assert paths.listdir(folder) == ["manifest.json", "plan.json", "shard.bin"]
  assert paths.exists(paths.join(folder, "manifest.json"))
  assert paths.is_published(folder, "manifest.json") and paths.size(paths.join(folder, "shard.bin"))


def test_move_a_folder_keeps_its_files(root):
  paths.makedirs(paths.join(root, "ckpt", "7", "state"))
  paths.write_atomic(paths.join(root, "ckpt", "7", "state", "a"), b"a")
  paths.write_atomic(paths.join(root, "ckpt", "7", "marker"), b"m")
  paths.makedirs(paths.join(root, "aside"))
  paths.move(paths.join(root, "ckpt", "7"), paths.join(root, "aside", "7"))
  assert paths.read_bytes(paths.join(root, "aside", "7", "state", "a")) == b"a"
  assert paths.read_bytes(paths.join(root, "aside", "7", "marker")) == b"m"
  assert not paths.exists(paths.join(root, "ckpt", "7", "marker"))


def test_remove_empty_dir_keeps_a_folder_with_files(tmp_path):
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_bytes(b"x")
  (tmp_path / "empty").mkdir()
  assert not paths.remove_empty_dir(str(tmp_path / "full")) and (tmp_path / "full" / "x").exists()
  assert paths.remove_empty_dir(str(tmp_path / "empty")) and not (tmp_path / "empty").exists()
  assert not paths.remove_empty_dir("gs://bucket/never-empty")


def test_gcs_emulator_answers_tensorstore_as_gcs_does(gcs_root):
  """What tests/gcs_emulator_server.py adds to gcp-storage-emulator: a read carries the
  object's generation, so TensorStore's next conditional read and write of it (an OCDBT
  manifest during a checkpoint save) work; without it they fail with 'Malformed
  StorageGeneration'."""
  import tensorstore as ts  # pylint: disable=import-outside-toplevel

  bucket, prefix = gcs_root[len("gs://") :].split("/", 1)
  kv = ts.KvStore.open({"driver": "gcs", "bucket": bucket, "path": prefix + "/"}).result()
  written = kv.write("manifest", b"one").result()
  read = kv.read("manifest").result()
  assert read.stamp.generation == written.generation
  assert kv.read("manifest", if_not_equal=read.stamp.generation).result().state != "missing"
  kv.write("manifest", b"two", if_equal=read.stamp.generation).result()
  assert paths.read_bytes(paths.join(gcs_root, "manifest")) == b"two"
  # a conditional delete (DELETE with ifGenerationMatch) of a stale generation keeps the object
  assert not kv.write("manifest", None, if_equal=read.stamp.generation).result().generation
  assert paths.read_bytes(paths.join(gcs_root, "manifest")) == b"two"
  current = kv.read("manifest").result().stamp.generation
  kv.write("manifest", None, if_equal=current).result()
  assert not paths.exists(paths.join(gcs_root, "manifest"))


def test_remove_if_version_keeps_a_rewritten_file(root):
  """The conditional delete of the workdir lock's takeover: it deletes the version read, and
  keeps the file once it was rewritten after that read (in a bucket, the store checks it)."""
  path = paths.join(root, "lock")
  paths.makedirs(root)
  paths.write_atomic(path, b"old")
  data, old = paths.read_versioned(path)
  assert data == b"old"
  paths.write_atomic(path, b"new")
  assert not paths.remove_if_version(path, old)
  data, new = paths.read_versioned(path)
  assert data == b"new" and new != old
  assert paths.remove_if_version(path, new)
  assert paths.read_versioned(path) is None and not paths.remove_if_version(path, new)
