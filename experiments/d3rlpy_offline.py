"""One offline RL run with d3rlpy (IQL, TD3+BC or BC), run by experiments/offline_rl.py inside
.venv-d3rlpy (d3rlpy pins gymnasium 1.0, so it cannot share the project's environment).

  .venv-d3rlpy/bin/python experiments/d3rlpy_offline.py DATA.npz ALGO SEED STEPS SNAPSHOTS OUT_DIR

DATA.npz holds iwsft's transitions of one Minari dataset (iwsft.control.peers.write_transitions).
The hyper-parameters are d3rlpy's own for D4RL locomotion (its reproductions/offline scripts),
except the update budget STEPS; IQL's cosine schedule spans STEPS, as it spans the published
budget there. After each of the comma-separated update counts SNAPSHOTS, the deterministic actor
is written as OUT_DIR/actor_<step>.npz (iwsft.control.peers.read_actor's layout): its layers, the
observation scaler, and d3rlpy's own `predict` on a sample of observations, which the evaluator
checks its forward pass against. Prints one JSON line: the wall time of each snapshot.
"""

import json
import os
import sys
import time

import d3rlpy
import numpy as np
import torch

ALGOS = ("iql", "td3_bc", "bc")


def make_algo(name: str, steps: int):
  """d3rlpy's published D4RL configuration of `name`, for a budget of `steps` updates."""
  if name == "iql":
    return d3rlpy.algos.IQLConfig(
      actor_learning_rate=3e-4,
      critic_learning_rate=3e-4,
      actor_optim_factory=d3rlpy.optimizers.AdamFactory(
        lr_scheduler_factory=d3rlpy.optimizers.CosineAnnealingLRFactory(T_max=steps)
      ),
      batch_size=256,
      weight_temp=3.0,
      max_weight=100.0,
      expectile=0.7,
      reward_scaler=d3rlpy.preprocessing.ReturnBasedRewardScaler(multiplier=1000.0),
    ).create(device="cpu:0")
  if name == "td3_bc":
    return d3rlpy.algos.TD3PlusBCConfig(
      actor_learning_rate=3e-4,
      critic_learning_rate=3e-4,
      batch_size=256,
      target_smoothing_sigma=0.2,
      target_smoothing_clip=0.5,
      alpha=2.5,
      update_actor_interval=2,
      observation_scaler=d3rlpy.preprocessing.StandardObservationScaler(),
    ).create(device="cpu:0")
  if name == "bc":  # d3rlpy's BC defaults (deterministic policy, lr 1e-3, batch 100)
    return d3rlpy.algos.BCConfig().create(device="cpu:0")
  raise SystemExit(f"unknown algorithm {name!r}; one of {', '.join(ALGOS)}")


def dataset_from(path: str):
  data = np.load(path)
  return d3rlpy.dataset.MDPDataset(
    data["observations"],
    data["actions"],
    data["rewards"],
    data["terminals"],
    data["timeouts"],
    action_space=d3rlpy.ActionSpace.CONTINUOUS,
  ), data["observations"]


def actor_arrays(algo, sample: np.ndarray) -> dict:
  """The deterministic actor as plain arrays: Linear layers (ReLU between, tanh after the last),
  the observation scaler's mean and denominator, and d3rlpy's predictions on `sample`."""
  policy = algo.impl.policy
  head = getattr(policy, "_fc", None) or policy._mu
  layers = []
  for module in policy._encoder._layers:
    if isinstance(module, torch.nn.Linear):
      layers.append(module)
    elif not isinstance(module, torch.nn.ReLU):
      raise SystemExit(f"unexpected encoder layer {module}")
  layers.append(head)
  out = {}
  for i, layer in enumerate(layers):
    out[f"w{i}"] = layer.weight.detach().cpu().numpy().T
    out[f"b{i}"] = layer.bias.detach().cpu().numpy()
  scaler = algo.config.observation_scaler
  dim = sample.shape[1]
  if scaler is None:
    out["obs_mean"], out["obs_scale"] = np.zeros(dim, np.float32), np.ones(dim, np.float32)
  else:
    out["obs_mean"] = np.asarray(scaler.mean, np.float32)
    out["obs_scale"] = np.asarray(scaler.std + scaler.eps, np.float32)
  out["check_observations"] = sample
  out["check_actions"] = algo.predict(sample).astype(np.float32)
  return out


def main(path, name, seed, steps, snapshots, out_dir):
  d3rlpy.seed(seed)
  torch.set_num_threads(1)
  dataset, observations = dataset_from(path)
  algo = make_algo(name, steps)
  sample = observations[np.random.default_rng(0).choice(len(observations), 256)]
  kw = dict(show_progress=False, logger_adapter=d3rlpy.logging.NoopAdapterFactory())
  os.makedirs(out_dir, exist_ok=True)
  done, walls, t0 = 0, {}, time.perf_counter()
  for step in snapshots:
    algo.fit(dataset, n_steps=step - done, n_steps_per_epoch=step - done, **kw)
    done = step
    walls[step] = time.perf_counter() - t0
    np.savez(os.path.join(out_dir, f"actor_{step}.npz"), **actor_arrays(algo, sample))
  print(
    json.dumps({"wall_time_s": walls, "d3rlpy": d3rlpy.__version__, "torch": torch.__version__})
  )


if __name__ == "__main__":
  path, name, seed, steps, snaps, out = sys.argv[1:7]
  points = sorted({int(s) for s in snaps.split(",")})
  if not points or points[0] <= 0 or points[-1] != int(steps):
    raise SystemExit(f"snapshots {snaps!r} must be positive and end at STEPS={steps}")
  main(path, name, int(seed), int(steps), points, out)
