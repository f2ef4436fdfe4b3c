"""A run's directory: its identity (run.json), finished results, atomic JSON and the metrics log.

A workdir holds one run. run.json records the settings a resumed run must share; a rerun with other
settings is refused unless overwrite; a finished run (result.json) is reused, never silently redone.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from typing import Any

from iwsft.errors import UserError


def prepare_workdir(path: str, overwrite: bool, marker: str = "result.json") -> str:
  """Creates `path` if needed; refuses (UserError) a finished run unless overwrite, or an
  unwritable dir."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"workdir {path} exists and is not a directory")
  if marker and os.path.exists(os.path.join(path, marker)) and not overwrite:
    raise UserError(
      f"workdir {path} already holds a finished run ({marker}); "
      "pass --overwrite or choose another --workdir"
    )
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, ".write-test")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise UserError(f"cannot write to workdir {path}: {e.strerror}") from None
  return path


# How a run executes, not what it computes: the device count and sharding (checkpoints reshard)
# and where its metrics go. No identity holds them, so a run may resume with other values.
EXECUTION_SETTINGS = (
  "num_devices",
  "fsdp",
  "tensor_parallel",
  "seeds_over_devices",
  "micro_batches",
  "compute",
  "log",
)


def result_settings(cfg, *also: str) -> dict:
  """A ConfigDict's values that decide a result: all but EXECUTION_SETTINGS and the keys `also`
  (those the caller's identity records its own way, or lets vary between calls)."""
  skip = EXECUTION_SETTINGS + also
  return {k: v for k, v in cfg.to_dict().items() if k not in skip}


def claim_workdir(
  path: str, identity: dict, overwrite: bool, marker: str = "result.json", defaults=None
) -> tuple[str, bool]:
  """prepare_workdir, then records the run's identity in run.json -> (workdir, whether it changed).

  identity: the settings a resumed run must share (JSON-able). An unfinished run with other settings
  is refused unless overwrite; the caller removes what overwrite replaces (remove_outputs).
  defaults: the identity of the default settings (same shape): a setting that run.json lacks (a
  run recorded before the setting existed) matches when it is at its default here, the value
  that run computed with.
  """
  path = prepare_workdir(path, overwrite, marker)
  code_version()  # the commit the run starts from, before a later commit could be read instead
  identity = canonical(identity)
  previous = _read_identity(path)
  if previous is not None and defaults is not None:
    previous = _with_defaults(previous, identity, canonical(defaults))
  changed = previous is not None and previous != identity
  if changed and not overwrite:
    raise UserError(
      f"workdir {path} holds an unfinished run with other settings "
      f"({_first_difference(previous, identity)}); run it with the same flags to resume, "
      "or pass --overwrite, or choose another --workdir"
    )
  write_json(os.path.join(path, "run.json"), identity)
  return path, changed


def settings_difference(path: str, identity: dict, defaults=None) -> str | None:
  """The first setting in which `identity` differs from the run recorded in path/run.json (None
  when there is none, or no run.json); defaults as claim_workdir's."""
  identity = canonical(identity)
  previous = _read_identity(os.path.abspath(os.path.expanduser(path)))
  if previous is not None and defaults is not None:
    previous = _with_defaults(previous, identity, canonical(defaults))
  if previous is None or previous == identity:
    return None
  return _first_difference(previous, identity)


def finished_result(path: str, identity: dict) -> dict | None:
  """The result.json of a finished run in `path` made with exactly these settings, else None."""
  path = os.path.abspath(os.path.expanduser(path))
  result = os.path.join(path, "result.json")
  if not os.path.exists(result) or _read_identity(path) != canonical(identity):
    return None
  with open(result) as f:
    return json.load(f)


def canonical(identity):
  """identity (or any JSON-able value) as it reads back from run.json (tuples become lists, keys
  strings)."""
  return json.loads(json.dumps(identity, sort_keys=True, default=float))


def _read_identity(path: str) -> dict | None:
  run_json = os.path.join(path, "run.json")
  if not os.path.exists(run_json):
    return None
  try:
    with open(run_json) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(
      f"{run_json} is corrupt ({e}); remove it, or choose another --workdir"
    ) from None


def _with_defaults(previous, identity, defaults):
  """previous with each key it lacks that identity holds at its value in defaults added."""
  if not all(isinstance(x, dict) for x in (previous, identity, defaults)):
    return previous
  out = dict(previous)
  for k, v in identity.items():
    if k in previous:
      out[k] = _with_defaults(previous[k], v, defaults.get(k))
    elif k in defaults and defaults[k] == v:
      out[k] = v
  return out


def _first_difference(old, new, prefix: str = "") -> str:
  if isinstance(old, dict) and isinstance(new, dict):
    for k in sorted(set(old) | set(new)):
      if old.get(k) != new.get(k):
        return _first_difference(old.get(k), new.get(k), f"{prefix}{k}.")
  return f"{prefix.rstrip('.')}: was {old!r}, now {new!r}"


def remove_outputs(path: str, names) -> None:
  """Deletes the named files and directories of a workdir (the outputs a fresh run replaces)."""
  for name in names:
    p = os.path.join(path, name)
    if os.path.isdir(p):
      shutil.rmtree(p)
    elif os.path.exists(p):
      os.remove(p)


@functools.cache
def code_version() -> str:
  """'iwsft <version>', with the git commit (and '-dirty' for uncommitted changes) when the package
  runs from a git checkout: what a dataset or result records as the code that made it. Asked of
  git once per process, at its first call: cli.run and claim_workdir call it as a script or run
  starts, so a commit made while a long run goes on is not recorded as its code."""
  import iwsft

  here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if not os.path.exists(os.path.join(here, ".git")):  # an installed copy, not the checkout
    return f"iwsft {iwsft.__version__}"
  try:
    commit = subprocess.run(
      ["git", "describe", "--always", "--dirty", "--abbrev=12", "--exclude=*"],
      cwd=here, capture_output=True, text=True, timeout=10, check=True,
    ).stdout.strip()  # fmt: skip
  except (OSError, subprocess.SubprocessError):
    commit = ""
  return f"iwsft {iwsft.__version__}" + (f" (git {commit})" if commit else "")


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temp file + rename), so a crash never leaves a half-written file;
  the temp file is the process's own, so processes sharing a workdir do not collide."""
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=float)
    f.write("\n")
  os.replace(tmp, path)


class MetricsLog:
  """metrics.jsonl: one JSON object per line, appended and flushed, so a killed run keeps every row;
  `sinks` get every row too, and each stage's drop_stage_after as sink.purge(stage, step)
  (TensorBoard, W&B: io/tracking.py).

  Opening an existing file keeps its rows (a run resumes) but drops a torn last line left by a kill
  in the middle of a write. drop(pred) removes rows atomically, e.g. those logged after the
  checkpoint a stage resumes from.
  """

  def __init__(self, path: str, sinks=()):
    self.path = path
    self._rewrite(self.rows())
    self._f = open(path, "a")
    self._sinks = list(sinks)  # also called with every row, closed with the log (io/tracking.py)

  def rows(self) -> list[dict]:
    return read_rows(self.path)

  def _rewrite(self, rows: list[dict]) -> None:
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(_row_line(r) for r in rows)
    os.replace(tmp, self.path)

  def drop(self, pred) -> None:
    """Removes every row for which pred(row) is true."""
    self._f.close()
    self._rewrite([r for r in self.rows() if not pred(r)])
    self._f = open(self.path, "a")

  def drop_stage_after(self, stage: str, step: int) -> None:
    """Removes the rows of `stage` past `step` (all of them for step 0: the stage starts afresh),
    here and in the sinks (those that can hide rows, TensorBoard, do)."""
    self.drop(lambda r: r.get("stage") == stage and (step == 0 or r.get("step", 0) > step))
    for sink in self._sinks:
      sink.purge(stage, step)

  def __call__(self, row: dict) -> None:
    self._f.write(_row_line(row))
    self._f.flush()
    for sink in self._sinks:
      sink(row)

  def close(self) -> None:
    self._f.close()
    for sink in self._sinks:
      sink.close()


def read_rows(path: str) -> list[dict]:
  """The rows of a metrics file, up to a torn last line if there is one; [] if there is no file."""
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        break  # a torn write: the run was killed here
  return out


class NullLog(MetricsLog):
  """The metrics log of processes other than 0: accepts rows and writes nothing."""

  def __init__(self):
    self.path = ""
    self._sinks = []

  def rows(self) -> list[dict]:
    return []

  def drop(self, pred) -> None:
    pass

  def __call__(self, row: dict) -> None:
    pass

  def close(self) -> None:
    pass


def _row_line(row: dict) -> str:
  return json.dumps(row, sort_keys=True, default=float) + "\n"
