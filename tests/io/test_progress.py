"""Progress: a bar on a terminal, one plain line per event in a log file."""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

SCRIPT = """
import time
from iwsft.io import progress
with progress.bar(3, "runs", "run") as b:
  for i in range(3):
    progress.say(b, f"run {i}: score {i}.0")
    progress.note(b, f"note {i}")
    b.update()
    time.sleep(0.2)  # past tqdm's redraw interval
"""


def _stderr(tty: bool) -> str:
  """The script's stderr, written to a pipe (a log file's case) or to a pseudo-terminal."""
  if not tty:
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    return r.stderr
  leader, follower = pty.openpty()
  fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 x 100
  p = subprocess.Popen([sys.executable, "-c", SCRIPT], stderr=follower, stdout=subprocess.DEVNULL)
  os.close(follower)
  chunks = []
  while True:
    try:
      chunk = os.read(leader, 4096)
    except OSError:  # the terminal closes when the process exits
      break
    if not chunk:
      break
    chunks.append(chunk)
  assert p.wait() == 0
  os.close(leader)
  return b"".join(chunks).decode()


def test_a_log_file_gets_one_plain_line_per_event_and_no_bar():
  lines = _stderr(tty=False).splitlines()
  assert lines == [x for i in range(3) for x in (f"run {i}: score {i}.0", f"note {i}")]


def test_a_terminal_gets_the_bar_with_results_above_it_and_no_notes():
  out = _stderr(tty=True)
  assert "runs: 100%" in out and out.split("\r")[-1].strip() == ""  # drawn, then cleared
  for i in range(3):
    assert f"run {i}: score {i}.0" in out
  assert "note" not in out  # the bar's postfix says it on a terminal
