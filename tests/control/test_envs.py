"""iwsft.envs: MuJoCo's warnings said once per process, not once per environment."""

import subprocess
import sys

MAKE_TWICE = """
import gymnasium as gym
from iwsft import envs
for _ in range(2):
  {make}("HalfCheetah-v5", 3).close()
"""
PLAIN = 'lambda e, n: gym.make_vec(e, num_envs=n, vectorization_mode="sync")'


def _stderr(make: str) -> str:
  code = MAKE_TWICE.format(make=make)
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-2000:]
  return r.stderr


def test_a_model_files_mujoco_warning_is_said_once_for_six_environments():
  # HalfCheetah's XML sets the compiler attribute settotalmass, deprecated in MuJoCo 4
  assert _stderr(f"({PLAIN})").count("settotalmass") == 6  # gymnasium alone: one per model
  routed = _stderr("envs.make_vec")
  assert routed.count("settotalmass") == 1, routed
  assert "RuntimeWarning: MuJoCo: compiler attribute 'settotalmass'" in routed
