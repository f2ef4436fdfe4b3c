"""Clean stops on SIGTERM/SIGINT (cluster preemption, Ctrl-C): finish the dispatch, save, exit 75.

The signal handler only sets a flag; the training loop checks it between dispatches, writes a
checkpoint and raises `Preempted`, which the command line turns into exit status 75 (EX_TEMPFAIL,
"try again"). Running the same command again resumes from that checkpoint.
"""

from __future__ import annotations

import signal
import threading

EXIT_PREEMPTED = 75


class Preempted(Exception):
  """Training stopped on request at `step` after saving a checkpoint."""

  def __init__(self, stage: str, step: int, directory: str | None):
    where = (
      f"checkpoint saved in {directory}; run the same command again to resume"
      if directory
      else "checkpoints are off, nothing was saved"
    )
    super().__init__(f"{stage}: stopped by signal at step {step}; {where}")
    self.stage, self.step, self.directory = stage, step, directory


class PreemptionGuard:
  """Context manager: while active, SIGTERM and SIGINT set `requested` instead of killing the
  process.

  A second SIGINT while a stop is pending raises KeyboardInterrupt at once, for an impatient user.
  Outside the main thread (where handlers cannot be installed) it does nothing.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self._previous: dict = {}

  def _handle(self, signum, frame):
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = True

  def __enter__(self) -> PreemptionGuard:
    if threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()
