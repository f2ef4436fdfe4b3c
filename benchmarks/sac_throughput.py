"""SAC training throughput: updates per second of iwsft.datasets.sac's jitted update (the
full profile's networks, (256, 256), batch 256, 50 updates per dispatch) with XLA's default CPU
threading and on one thread, alone and as two jobs side by side, in one run.

  python benchmarks/sac_throughput.py [--env=Hopper-v5] [--dispatches=20]

Each measurement is a fresh subprocess (XLA's threading is fixed when jax starts); "2 jobs" runs
two of them at once, one per core, and reports their summed rate: what two dataset builds sharing
a 2-core machine get. Environment steps are left out (MuJoCo's are ~50x cheaper than an update).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from iwsft.io.cli import ONE_XLA_THREAD  # noqa: E402


def measure(env_id: str, dispatches: int) -> float:
  """Runs in the subprocess: updates/s of update_many on random minibatches."""
  import gymnasium as gym
  import jax
  import numpy as np

  from iwsft.datasets import sac

  env = gym.make(env_id)
  obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
  cfg = sac.SACConfig()
  init_state, update_many, _ = sac.make_sac(obs_dim, act_dim, cfg)
  rng, k, b = np.random.default_rng(0), cfg.chunk, cfg.batch_size
  f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  batches = {
    "obs": f32(k, b, obs_dim),
    "action": np.tanh(f32(k, b, act_dim)),
    "reward": f32(k, b),
    "next_obs": f32(k, b, obs_dim),
    "terminal": np.zeros((k, b), np.float32),
  }
  state, _ = update_many(init_state(), batches)  # compiles
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(dispatches):
    state, _ = update_many(state, batches)
  jax.block_until_ready(state)
  return dispatches * k / (time.perf_counter() - t0)


def _jobs(env_id: str, dispatches: int, xla_flags: str, cores: list[list[int] | None]) -> float:
  """Summed updates/s of len(cores) subprocesses started together (each pinned if cores given)."""
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, __file__, "--child", f"--env={env_id}", f"--dispatches={dispatches}"]
  procs = [
    subprocess.Popen(
      cmd,
      env=env,
      stdout=subprocess.PIPE,
      text=True,
      preexec_fn=(lambda c=c: os.sched_setaffinity(0, c)) if c else None,
    )
    for c in cores
  ]
  return sum(json.loads(p.communicate()[0].splitlines()[-1]) for p in procs)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--env", default="Hopper-v5")
  p.add_argument("--dispatches", type=int, default=20, help="timed dispatches of 50 updates")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    print(json.dumps(measure(args.env, args.dispatches)))
    return
  default = os.environ.get("XLA_FLAGS", "")
  one = f"{default} {ONE_XLA_THREAD}".strip()
  cases = [
    ("default threading, 1 job", default, [None]),
    ("one thread, 1 job", one, [None]),
    ("default threading, 2 jobs", default, [None, None]),
    ("one thread, 2 jobs (one per core)", one, [[0], [1]]),
  ]
  rows = [
    {"XLA CPU threading": name, "updates/s": _jobs(args.env, args.dispatches, flags, cores)}
    for name, flags, cores in cases
  ]
  for r in rows:
    r["vs default, 1 job"] = r["updates/s"] / rows[0]["updates/s"]
  print(f"{args.env}: SAC updates/s (batch 256, (256, 256)) on {os.cpu_count()} cores")
  print(common.table(rows, ["XLA CPU threading", "updates/s", "vs default, 1 job"]))
  print(f"-> {common.save('sac_throughput', {'env': args.env, 'rows': rows})}")


if __name__ == "__main__":
  main()
