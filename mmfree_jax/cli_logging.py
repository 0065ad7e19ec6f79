"""How every CLI logs (train.py, eval.py, `python -m mmfree_jax.{data.prepare,export,hf}`): one
format, plain lines, as MaxText's `max_logging.log` and nanoGPT print them.

- Our messages (loggers `mmfree_jax.*` and `__main__`): INFO as the bare message, like the
  lines the CLIs print; WARNING and above as `warning: message` / `error: message`, like their
  `note:` lines.
- Libraries' records (jax, orbax through absl, grain, fsspec, ...): WARNING and above only,
  as `warning (orbax): message`, naming the package. `--verbosity N` (absl's meaning: -1
  WARNING, 0 INFO, 1 DEBUG) sets both to that level.
- absl's handler (`I1208 02:34:42.289378 139849 corpus.py:173] ...`, which `absl.app.run`
  puts on the root logger) is taken off, so no line carries a log-record header.

Records go to stderr (looked up at each record, so a test's captured stream is honoured).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator

OURS = "mmfree_jax"
MAIN = "__main__"  # the module `python -m mmfree_jax.x` runs
# Library warnings that say nothing to a user, by the start of their message: orbax warns on
# every read-only CheckpointManager (eval, export, resume checks), which is how we read.
QUIET = ("Given directory is read only",)
_SITE = f"site-packages{os.sep}"


def _is_ours(name: str) -> bool:
  """A logger of the package, or of the module run as `python -m mmfree_jax.x`."""
  return name in (OURS, MAIN) or name.startswith(OURS + ".")


def _package(record: logging.LogRecord) -> str:
  """The top-level package that logged: orbax logs through absl's logger, so for `absl` the
  record's file says which library it was."""
  top = record.name.split(".")[0]
  if top == "absl" and _SITE in record.pathname:
    return record.pathname.rsplit(_SITE, 1)[1].split(os.sep)[0]
  return top


class PlainFormatter(logging.Formatter):
  """`message` for our INFO and below, `level: message` for our warnings and errors,
  `level (package): message` for a library's records. A library's exception is one line
  (`: Type: message`) unless `tracebacks` (--verbosity): gcsfs logs its retries' traceback
  before our one-line error says what failed."""

  def __init__(self, tracebacks: bool = False):
    super().__init__()
    self.tracebacks = tracebacks

  def format(self, record: logging.LogRecord) -> str:
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
      if self.tracebacks or _is_ours(record.name):
        text = f"{text}\n{self.formatException(record.exc_info)}"
      else:
        error = record.exc_info[1]
        text = f"{text}: {type(error).__name__}: {' '.join(str(error).split())}"
    level = record.levelname.lower()
    if _is_ours(record.name):
      return text if record.levelno < logging.WARNING else f"{level}: {text}"
    return f"{level} ({_package(record)}): {text}"


def _printed_by_its_library(name: str) -> bool:
  """Whether a logger on the record's way to the root has a handler of its own (huggingface_hub
  adds one when lm-eval imports it): that one prints the record already."""
  logger = logging.getLogger(name)
  while logger.parent is not None:  # stops below the root
    if logger.handlers:
      return True
    if not logger.propagate:
      return False
    logger = logger.parent
  return False


class _LevelFilter(logging.Filter):
  """Our records from `ours`, everyone else's from `libraries` up (a library may have set its
  own logger's level lower), less the QUIET ones unless --verbosity asked for INFO."""

  def __init__(self, ours: int, libraries: int):
    super().__init__()
    self.ours, self.libraries = ours, libraries

  def filter(self, record: logging.LogRecord) -> bool:
    if _is_ours(record.name):
      return record.levelno >= self.ours
    if _printed_by_its_library(record.name):
      return False
    if record.levelno < self.libraries:
      return False
    return self.libraries < logging.WARNING or not str(record.msg).startswith(QUIET)


class _StderrHandler(logging.StreamHandler):
  """A StreamHandler on whatever `sys.stderr` is when a record arrives."""

  def __init__(self):
    super().__init__(sys.stderr)

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, value):
    del value


def _is_basic_stderr(handler: logging.Handler) -> bool:
  """`logging.basicConfig`'s handler (`WARNING:absl:...`), which importing orbax installs."""
  return type(handler) is logging.StreamHandler and handler.stream in (sys.stderr, sys.__stderr__)


def level_of(verbosity: int) -> int:
  """absl's verbosity as a logging level: -1 WARNING, 0 INFO, 1 DEBUG (-2 ERROR, -3 FATAL)."""
  return logging.DEBUG if verbosity >= 1 else logging.INFO - 10 * verbosity


def add_verbosity_flag(parser: argparse.ArgumentParser) -> None:
  """`--verbosity N` for an argparse CLI, as absl's flag of the same name in train/eval.py."""
  parser.add_argument(
    "--verbosity",
    "-v",
    type=int,
    default=None,
    help="log level of ours and the libraries' messages: -1 warnings, 0 info, 1 debug "
    "(default: our info, the libraries' warnings)",
  )


def absl_verbosity() -> int | None:
  """absl's `--verbosity` when the command line set it, else None (absl turns its default
  into 0 once flags are parsed, which would show every library's INFO)."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  flag = flags.FLAGS["verbosity"]
  return flag.value if flag.present else None


def setup(verbosity: int | None = None) -> None:
  """Routes every log record through one plain-format stderr handler (see the module doc);
  replaces absl's handler, a `basicConfig` stderr handler and any an earlier call added."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  ours = logging.INFO if verbosity is None else level_of(verbosity)
  libraries = logging.WARNING if verbosity is None else ours
  root = logging.getLogger()
  for handler in list(root.handlers):
    if (
      handler is absl_logging.get_absl_handler()
      or isinstance(handler, _StderrHandler)
      or _is_basic_stderr(handler)
    ):
      root.removeHandler(handler)
  handler = _StderrHandler()
  handler.setFormatter(PlainFormatter(tracebacks=verbosity is not None))
  handler.addFilter(_LevelFilter(ours, libraries))
  root.addHandler(handler)
  root.setLevel(libraries)
  for name in (OURS, MAIN):
    logging.getLogger(name).setLevel(ours)
  absl_logging.get_absl_logger().setLevel(logging.NOTSET)  # absl's flags set it to INFO


@contextlib.contextmanager
def configured(verbosity: int | None = None) -> Iterator[None]:
  """`setup` for the duration of a CLI's `main`, then the logging state as it was (tests call
  the CLIs' `main` in their own process)."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  root = logging.getLogger()
  loggers = [logging.getLogger(OURS), logging.getLogger(MAIN), absl_logging.get_absl_logger()]
  handlers, levels = list(root.handlers), [root.level] + [lg.level for lg in loggers]
  setup(verbosity)
  try:
    yield
  finally:
    root.handlers[:] = handlers
    for logger, level in zip([root] + loggers, levels):
      logger.setLevel(level)
