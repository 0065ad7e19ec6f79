"""The CLIs' one log format (`mmfree_jax/cli_logging.py`): our messages as plain lines, the
libraries' at WARNING and up (or what `--verbosity` asks), absl's `I1208 …` header never.

The rule the subprocess tests also check on a CLI's whole stdout and stderr (`log_headers`):
no line starts with a log-record header, i.e. absl's `I1208 02:34:42.289378 139849 file.py:173]`
(also XLA's C++ lines), logging's asctime `2026-12-08 02:34:42,289` or its default
`INFO:name:`. Our info lines read like the lines the CLIs print; warnings start `warning:`."""

import logging
import re
import sys

import pytest
from absl import logging as absl_logging

from mmfree_jax import cli_logging

HEADER = re.compile(
  r"^([IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\]"  # absl (Python and C++)
  r"|\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d"  # logging's %(asctime)s
  r"|(DEBUG|INFO|WARNING|ERROR|CRITICAL):)"  # logging.basicConfig's default format
)


def log_headers(text: str) -> list[str]:
  """The lines of `text` that start with a log-record header (the rule above)."""
  return [line for line in text.splitlines() if HEADER.match(line)]


def test_the_rule_sees_each_header():
  absl_line = "I1208 02:34:42.289378 139849000983424 corpus.py:173] tokenizing"
  cpp_line = "E0000 00:00:1702001234.123456   12345 cuda_dnn.cc:8310] Unable to register"
  lines = [absl_line, cpp_line, "2026-12-08 02:34:42,289 INFO fresh start", "INFO:absl:x"]
  plain = ["fresh start in /w", "warning (orbax): x", "step 4: val loss 7.35", "note: I did"]
  assert log_headers("\n".join(lines + plain)) == lines


@pytest.fixture
def absl_app_logging():
  """The root logger as `absl.app.run` and importing orbax leave it, restored after."""
  root = logging.getLogger()
  saved = (list(root.handlers), root.level)
  root.addHandler(absl_logging.get_absl_handler())
  # what importing orbax adds (`WARNING:absl:...`); on fd 2, which capfd captures
  root.addHandler(logging.StreamHandler(sys.__stderr__))
  root.setLevel(logging.INFO)
  yield
  root.handlers[:] = saved[0]
  root.setLevel(saved[1])


def _log_all():
  logging.getLogger("mmfree_jax.train.run").info("fresh start in %s", "/w")
  logging.getLogger("__main__").info("tokenized 10 tokens")  # python -m mmfree_jax.data.prepare
  logging.getLogger("mmfree_jax").warning("taking over the lock")
  logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu'")
  logging.getLogger("jax._src.xla_bridge").warning("no GPU")
  absl_logging.get_absl_logger().info("orbax says info")
  absl_logging.get_absl_logger().warning("orbax says warning")
  logging.getLogger("orbax.checkpoint").warning("Given directory is read only=/w/checkpoints")


def test_default_is_our_info_and_library_warnings(absl_app_logging, capfd):
  del absl_app_logging
  with cli_logging.configured():
    assert absl_logging.get_absl_handler() not in logging.getLogger().handlers
    _log_all()
    sys.__stderr__.flush()
  out, err = capfd.readouterr()
  assert out == ""
  assert err.splitlines() == [
    "fresh start in /w",
    "tokenized 10 tokens",
    "warning: taking over the lock",
    "warning (jax): no GPU",
    "warning (absl): orbax says warning",  # logged from this test file, not site-packages
  ]
  assert absl_logging.get_absl_handler() in logging.getLogger().handlers  # restored


def test_verbosity_shows_the_libraries_info_too(capsys):
  with cli_logging.configured(0):
    _log_all()
  lines = capsys.readouterr().err.splitlines()
  assert "info (jax): Unable to initialize backend 'tpu'" in lines
  assert "info (absl): orbax says info" in lines
  assert "warning (orbax): Given directory is read only=/w/checkpoints" in lines
  assert log_headers("\n".join(lines)) == []
  with cli_logging.configured(-1):  # warnings only, ours too
    _log_all()
  lines = capsys.readouterr().err.splitlines()
  assert lines == [
    "warning: taking over the lock",
    "warning (jax): no GPU",
    "warning (absl): orbax says warning",
  ]


def test_a_library_logging_through_absl_is_named_by_its_package():
  record = logging.LogRecord(
    "absl", logging.WARNING, "/v/lib/site-packages/orbax/checkpoint/x.py", 1, "m", (), None
  )
  assert cli_logging.PlainFormatter().format(record) == "warning (orbax): m"


def test_verbosity_levels_are_absl_s():
  assert [cli_logging.level_of(v) for v in (-3, -2, -1, 0, 1, 2)] == [
    logging.CRITICAL,
    logging.ERROR,
    logging.WARNING,
    logging.INFO,
    logging.DEBUG,
    logging.DEBUG,
  ]


def test_a_library_exception_is_one_line_unless_verbose():
  try:
    raise ConnectionError("Cannot connect to host\nstorage.googleapis.com:443")
  except ConnectionError:
    record = logging.getLogger("gcsfs").makeRecord(
      "gcsfs", logging.ERROR, "retry.py", 1, "_request out of retries", (), sys.exc_info()
    )
  line = "error (gcsfs): _request out of retries: ConnectionError: Cannot connect to host "
  assert cli_logging.PlainFormatter().format(record) == line + "storage.googleapis.com:443"
  verbose = cli_logging.PlainFormatter(tracebacks=True).format(record)
  assert verbose.startswith("error (gcsfs): _request out of retries\nTraceback")


def test_a_library_with_its_own_handler_is_printed_once(capfd):
  hub = logging.getLogger("huggingface_hub")
  own = logging.StreamHandler(sys.__stderr__)  # as huggingface_hub adds when lm-eval imports it
  hub.addHandler(own)
  try:
    with cli_logging.configured():
      logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
      sys.__stderr__.flush()
  finally:
    hub.removeHandler(own)
  assert capfd.readouterr().err.splitlines() == ["Retrying in 1s [Retry 1/5]."]
