"""Cost of one control sweep cell at the authors' scale (preset 'paper'), from measured update
rates.

  python benchmarks/cell_cost.py [--seeds=5] [--length=1000]

A full-recipe cell is two stages: π_ref (BC, config.reference: whole-episode batches) and the method
(iw-SFT, with its extra π_ref and q forward passes). This times a few dispatches of each stage's
real
update on Hopper-shaped episodes of `--length` steps, with `--seeds` vmapped seeds, and multiplies
by the recipe's step counts. Evaluation (eval_every / eval_episodes / final_eval_episodes of full
Hopper episodes) is costed with the env steps/s measured by eval_throughput.py if its result file
exists, else left out (and said so).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import iwsft  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.bc_throughput import synthetic_data  # noqa: E402
from iwsft.control.config import get_config  # noqa: E402
from iwsft.control.pipeline import validate  # noqa: E402
from iwsft.control.policy import GaussianPolicy, PolicyConfig, make_logprob_fn, split_policy  # noqa: E402
from iwsft.core.config import make_optimizer  # noqa: E402
from iwsft.core.objectives import ObjectiveConfig  # noqa: E402


def stage_seconds_per_update(
  data,
  hidden,
  stage,
  objective: ObjectiveConfig,
  seeds: int,
  bounds: bool,
  steps_per_dispatch: int,
  repeats: int,
) -> float:
  obs, act = data["observations"].shape[-1], data["actions"].shape[-1]
  policies = [
    split_policy(GaussianPolicy(obs, act, PolicyConfig(hidden=hidden), rngs=nnx.Rngs(s)))
    for s in range(seeds)
  ]
  graphdef, _, consts = policies[0]
  optimizer = make_optimizer(stage)
  update = iwsft.make_update(
    make_logprob_fn(graphdef, consts), optimizer, objective, track_bounds=bounds
  )  # as the pipeline: bounds tracked while fine-tuning
  states = [iwsft.init_state(p, optimizer, s) for s, (_, p, _) in enumerate(policies)]
  mesh = iwsft.make_mesh()
  state = iwsft.put_replicated(states[0] if seeds == 1 else iwsft.stack_seeds(states), mesh)
  pool = iwsft.shard_pool(data, mesh)
  logits = iwsft.put_replicated(np.zeros(len(data["mask"]), np.float32), mesh)
  steps = iwsft.make_train_steps(
    update,
    mesh,
    stage.batch_size,
    steps_per_dispatch,
    step_level=stage.batch_level == "step",
    vmapped=seeds > 1,
  )
  box = [state]

  def call():
    box[0], metrics = steps(box[0], pool, logits)
    jax.block_until_ready(metrics["loss"])

  return common.median_seconds(call, repeats) / steps_per_dispatch


def _args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seeds", type=int, default=5)
  p.add_argument("--length", type=int, default=1000, help="episode length of the synthetic data")
  p.add_argument("--episodes", type=int, default=300)
  p.add_argument("--steps_per_dispatch", type=int, default=2)
  p.add_argument("--repeats", type=int, default=2)
  return p.parse_args()


def main():
  args = _args()
  cfg = get_config()
  settings = validate(cfg)
  hidden = settings.policy.hidden
  data = synthetic_data(args.episodes, args.length, 11, 3)
  ref_stage, ft_stage = settings.reference, settings.finetune
  ref_s = stage_seconds_per_update(
    data,
    hidden,
    ref_stage,
    settings.reference_objective,
    args.seeds,
    False,
    args.steps_per_dispatch,
    args.repeats,
  )
  ft_s = stage_seconds_per_update(
    data,
    hidden,
    ft_stage,
    settings.objective,
    args.seeds,
    True,
    args.steps_per_dispatch,
    args.repeats,
  )
  train_h = (cfg.reference.steps * ref_s + ft_stage.steps * ft_s) / 3600
  evals = (
    cfg.reference.steps // cfg.eval.every + ft_stage.steps // cfg.eval.every + 2
  ) * cfg.eval.episodes + cfg.eval.final_episodes
  env_steps = evals * args.length * args.seeds
  eval_file = os.path.join(common.RESULTS, f"eval_throughput-{jax.devices()[0].platform}.json")
  eval_h = None
  if os.path.exists(eval_file):
    rows = json.load(open(eval_file))["rows"]
    eval_h = env_steps / max(r["env steps/s"] for r in rows) / 3600
  row = {
    "seeds (vmapped)": args.seeds,
    "π_ref s/update": ref_s,
    "iw-SFT s/update": ft_s,
    "π_ref steps": cfg.reference.steps,
    "iw-SFT steps": ft_stage.steps,
    "training h": train_h,
    "evaluation h": "n/a" if eval_h is None else eval_h,
    "cell h (all seeds)": train_h + (eval_h or 0.0),
  }
  print(
    f"Full-recipe control cell (preset paper: π_ref batch {cfg.reference.batch_size} episodes, "
    f"iw-SFT batch {ft_stage.batch_size} episodes of {args.length} steps, MLP {hidden}) on "
    f"{common.machine()['device']} x{jax.device_count()}; evaluation: {env_steps:,} env steps"
    + ("" if eval_h is not None else " (not costed: run eval_throughput.py first)")
  )
  print(common.table([row], list(row)))
  print(f"-> {common.save('cell_cost', {'row': row, 'env_steps': env_steps})}")


if __name__ == "__main__":
  main()
