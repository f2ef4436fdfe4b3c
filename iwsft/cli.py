"""Command-line plumbing shared by the experiment scripts.

Bad input (a UserError, a misspelt or malformed flag) ends as one line on stderr and exit status 2,
with no traceback and nothing written to the workdir.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from absl import app, flags, logging

from iwsft.errors import UserError

EXIT_BAD_INPUT = 2


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_BAD_INPUT)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parser, with parse errors reported as one line and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0])


def run(main) -> None:
  """app.run(main) that turns UserError into a one-line error and exit status 2."""

  def wrapped(argv):
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
      return main(argv)
    except UserError as e:
      fail(str(e))

  app.run(wrapped, flags_parser=parse_flags)


def prepare_workdir(path: str, overwrite: bool, marker: str = "result.json") -> str:
  """Creates `path` if needed; refuses (UserError) a finished run unless overwrite, or an unwritable dir."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"workdir {path} exists and is not a directory")
  if marker and os.path.exists(os.path.join(path, marker)) and not overwrite:
    raise UserError(f"workdir {path} already holds a finished run ({marker}); pass --overwrite or choose another --workdir")
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, ".write-test")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise UserError(f"workdir {path} is not writable: {e.strerror}") from None
  return path


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temp file + rename), so a crash never leaves a half-written file."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=float)
    f.write("\n")
  os.replace(tmp, path)


class JsonlWriter:
  """Appends one JSON object per line and flushes, so a killed run keeps every row it logged."""

  def __init__(self, path: str, mode: str = "w"):
    self._f = open(path, mode)

  def __call__(self, row: dict) -> None:
    self._f.write(json.dumps(row, sort_keys=True, default=float) + "\n")
    self._f.flush()

  def close(self) -> None:
    self._f.close()


def _flat_items(cfg, prefix: str = ""):
  for key, value in cfg.items():
    if hasattr(value, "items"):
      yield from _flat_items(value, f"{prefix}{key}_")
    else:
      yield f"{prefix}{key}", (key, value)


def define_flags_from_config(cfg, helps: dict[str, str], enums: dict[str, tuple] | None = None) -> None:
  """One absl flag per config leaf (nested `a.b` becomes `--a_b`), with the config's default."""
  enums = enums or {}
  for name, (_, value) in _flat_items(cfg):
    help_text = helps.get(name, name.replace("_", " "))
    if name in enums:
      flags.DEFINE_enum(name, value, list(enums[name]), help_text)
    elif isinstance(value, bool):
      flags.DEFINE_bool(name, value, help_text)
    elif isinstance(value, int):
      flags.DEFINE_integer(name, value, help_text)
    elif isinstance(value, float):
      flags.DEFINE_float(name, value, help_text)
    else:
      flags.DEFINE_string(name, value, help_text)


def config_from_flags(cfg):
  """A copy of cfg with every leaf set from the flags that define_flags_from_config made."""
  cfg = cfg.copy_and_resolve_references()

  def fill(node, prefix):
    for key, value in node.items():
      if hasattr(value, "items"):
        fill(value, f"{prefix}{key}_")
      else:
        node[key] = flags.FLAGS[f"{prefix}{key}"].value

  fill(cfg, "")
  return cfg
