"""The core works without the pipelines' extras: the own-loop example runs with them blocked."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BLOCKED = ("gymnasium", "mujoco", "minari", "gguf", "tokenizers", "safetensors", "matplotlib")

# Runs a script with the extras' packages (and the pipelines) unimportable, as on a core install.
BLOCKER = """
import importlib.abc, runpy, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED or name.startswith(("iwsft.control", "iwsft.lm",
        "iwsft.datasets")):
      raise ModuleNotFoundError(f"blocked: {{name}}", name=name)
    return None
sys.meta_path.insert(0, Block())
sys.argv = {argv!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run_blocked(argv):
  code = BLOCKER.format(blocked=BLOCKED, argv=argv)
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)


def test_own_training_loop_runs_on_the_core_alone():
  """examples/own_training_loop.py: SFT and iw-SFT on curated bigram samples both raise the
  sampled success rate far above π_ref's, with no pipeline package importable."""
  out = _run_blocked([os.path.join(ROOT, "examples", "own_training_loop.py"), "--steps", "200"])
  assert out.returncode == 0, out.stderr[-2000:]
  j = {
    line.split(")")[0][2:]: float(line.split("=")[1].split()[0])
    for line in out.stdout.splitlines()
    if line.startswith("J(")
  }
  assert set(j) == {"π_ref", "sft", "iw_sft"}
  assert j["π_ref"] < 0.2
  assert j["sft"] > j["π_ref"] + 0.4 and j["iw_sft"] > j["π_ref"] + 0.4


def test_blocker_blocks(tmp_path):
  """The blocker really hides an extra: importing the control pipeline under it fails."""
  script = tmp_path / "import_control.py"
  script.write_text("import iwsft.control.pipeline\n")
  out = _run_blocked([str(script)])
  assert out.returncode != 0 and "blocked" in out.stderr


@pytest.mark.parametrize("extra,module", [("control", "iwsft.control"), ("lm", "iwsft.lm")])
def test_missing_extra_names_the_extra(extra, module):
  """A pipeline imported without its extra says which extra to install."""
  code = (
    "import importlib.util, sys\n"
    "real = importlib.util.find_spec\n"
    "importlib.util.find_spec = lambda n, *a: None if n in "
    f"{BLOCKED!r} else real(n, *a)\n"
    f"import {module}\n"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
  assert out.returncode != 0
  assert f"pip install 'iwsft[{extra}]'" in out.stderr
