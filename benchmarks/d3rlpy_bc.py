"""d3rlpy's BC on given transitions, timed; run by bc_throughput.py inside .venv-d3rlpy (d3rlpy pins
gymnasium 1.0, so it cannot share the project's environment).

  .venv-d3rlpy/bin/python benchmarks/d3rlpy_bc.py DATA.npz HIDDEN BATCH STEPS

Stochastic (Gaussian) policy with the same hidden widths, batch and Adam (lr 1e-3) as our benchmark;
the time covers d3rlpy's own `fit` loop (batch sampling from its replay buffer and the update) after
a warm-up fit, with logging switched off. Prints one JSON line.
"""

import json
import sys
import time

import d3rlpy
import numpy as np
import torch


def main(path, hidden, batch, steps):
  torch.manual_seed(0)
  data = np.load(path)
  obs, act = data["observations"], data["actions"]
  terminals = np.zeros(len(obs), np.float32)
  timeouts = np.zeros(len(obs), np.float32)
  timeouts[999::1000] = 1.0  # 1000-step episodes, as written by bc_throughput.py
  dataset = d3rlpy.dataset.MDPDataset(
    obs,
    act,
    np.zeros(len(obs), np.float32),
    terminals,
    timeouts,
    action_space=d3rlpy.ActionSpace.CONTINUOUS,
  )
  bc = d3rlpy.algos.BCConfig(
    batch_size=batch,
    learning_rate=1e-3,
    policy_type="stochastic",
    encoder_factory=d3rlpy.models.VectorEncoderFactory(hidden_units=hidden),
    optim_factory=d3rlpy.optimizers.AdamFactory(),
  ).create(device="cpu:0")
  kw = dict(show_progress=False, logger_adapter=d3rlpy.logging.NoopAdapterFactory())
  bc.fit(dataset, n_steps=100, n_steps_per_epoch=100, **kw)  # builds the networks, warms up
  t0 = time.perf_counter()
  bc.fit(dataset, n_steps=steps, n_steps_per_epoch=steps, **kw)
  sec = time.perf_counter() - t0
  print(
    json.dumps(
      {
        "steps_per_s": steps / sec,
        "steps": steps,
        "version": d3rlpy.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
      }
    )
  )


if __name__ == "__main__":
  main(sys.argv[1], [int(x) for x in sys.argv[2].split(",")], int(sys.argv[3]), int(sys.argv[4]))
