"""Progress on a terminal, summary lines in a log file.

A bar redraws itself with carriage returns, which a log file keeps as one endless line; so bars are
drawn only when stderr is a terminal, and `note` writes one line per event (an evaluation, a
snapshot) when it is not.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def bar(total: int, desc: str, unit: str = "step", initial: int = 0, enabled: bool = True) -> tqdm:
  """A tqdm bar, drawn only on a terminal (and when `enabled`)."""
  return tqdm(
    total=total,
    initial=initial,
    desc=desc,
    unit=unit,
    dynamic_ncols=True,
    leave=False,
    disable=not (enabled and sys.stderr.isatty()),
  )


def note(b: tqdm, text: str) -> None:
  """One summary line on stderr where the bar is not drawn (a log file); nothing on a terminal,
  where the bar's postfix shows the same."""
  if b.disable:
    print(text, file=sys.stderr, flush=True)


def say(b: tqdm, text: str) -> None:
  """A result line: above the bar on a terminal, one plain line on stderr in a log file."""
  if b.disable:
    note(b, text)
  else:
    b.write(text, file=sys.stderr)
