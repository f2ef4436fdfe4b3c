"""Command-line plumbing shared by the experiment scripts.

Bad input (a UserError, a misspelt or malformed flag) ends as one line on stderr and exit status 2,
with no traceback and nothing written to the workdir. A stop on SIGTERM/SIGINT after a checkpoint
exits with status 75 (preemption.EXIT_PREEMPTED); a non-finite loss or gradient with status 1.
Pipeline settings come from an ml_collections config file (`--config=iwsft/control/config.py:cpu`,
values overridden as `--config.finetune.steps=100`), so no flag is mirrored by hand.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from iwsft.errors import UserError
from iwsft.io import workdir
from iwsft.io.preemption import EXIT_PREEMPTED, Preempted

EXIT_BAD_INPUT = 2


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_BAD_INPUT)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parser, with parse errors (and a config file that fails to load) reported as one
  line and exit status 2."""
  try:
    rest = flags.FLAGS(argv)
    if "config" in flags.FLAGS:
      flags.FLAGS.config.to_dict  # noqa: B018  a config file that failed to load raises here
    return rest
  except Exception as e:  # noqa: BLE001  flags.Error, or a config file's own error
    fail(one_line(e))


def one_line(e: BaseException) -> str:
  """An exception as one line: its message's first line, plus the last line of its root cause."""
  lines = lambda x: [ln.strip() for ln in str(x).splitlines() if ln.strip()] or [type(x).__name__]
  root = e
  while root.__cause__ or root.__context__:
    root = root.__cause__ or root.__context__
  head, tail = lines(e)[0], lines(root)[-1]
  return head if tail in head else f"{head} {tail}"


ONE_XLA_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def use_one_xla_thread() -> None:
  """Runs XLA's CPU ops on one thread, so that jobs of small matmuls (SAC) can share the cores
  (benchmarks/sac_throughput.py). Must come before jax starts its backend."""
  from jax._src import xla_bridge  # no public way to ask whether the backend has started

  if getattr(xla_bridge, "backends_are_initialized", lambda: False)():
    raise RuntimeError("use_one_xla_thread() after jax started its backend has no effect")
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {ONE_XLA_THREAD}".strip()


def run(main) -> None:
  """app.run(main) that turns UserError into a one-line error and exit status 2; what the script
  records as its code (workdir.code_version) is the commit it started from."""

  def wrapped(argv):
    workdir.code_version()
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    sys.stdout.reconfigure(line_buffering=True)  # a log file gets stdout lines in order with stderr
    try:
      return main(argv)
    except UserError as e:
      fail(str(e))
    except Preempted as e:
      print(f"preempted: {e}", file=sys.stderr)
      sys.exit(EXIT_PREEMPTED)
    except FloatingPointError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)

  app.run(wrapped, flags_parser=parse_flags)


def define_distributed_flags() -> None:
  flags.DEFINE_string(
    "coordinator_address",
    "",
    "multi-process runs: host:port of process 0, or "
    "'auto' where jax detects the cluster (TPU pod slices, SLURM, Open MPI)",
  )
  flags.DEFINE_integer("num_processes", 0, "multi-process runs: number of processes (hosts)")
  flags.DEFINE_integer(
    "process_id", -1, "multi-process runs: this process's index, 0 writes the outputs"
  )


def init_distributed() -> None:
  """jax.distributed set-up from the flags of define_distributed_flags (a no-op for one process)."""
  from iwsft.io import distributed

  F = flags.FLAGS
  distributed.initialize(F.coordinator_address, F.num_processes, F.process_id)


def define_config(default_file: str, help_text: str) -> None:
  """--config: an ml_collections config file (`path.py` or `path.py:arg`), default_file if
  absent."""
  try:  # overrides (--config.a.b=...) are checked against the config as the flag is defined
    config_flags.DEFINE_config_file("config", default_file, help_text, lock_config=True)
  except Exception as e:  # noqa: BLE001
    given = [a.split("=")[0] for a in sys.argv[1:] if a.startswith("--config.")]
    fail(
      f"--config: cannot apply {', '.join(given) or 'the overrides'} ({one_line(e)}); "
      "the config file lists every setting"
    )


def config_file(module) -> str:
  """The path of a config module's file, for define_config's default."""
  return os.path.abspath(module.__file__)


def no_arguments(argv: list[str]) -> None:
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
