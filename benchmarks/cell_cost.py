"""Cost of one control sweep cell at the authors' scale (preset 'paper'), before and after the
exact speed-ups, from update rates measured in one run.

  python benchmarks/cell_cost.py [--datasets=ID,...,fixed:1000] [--seeds=5]

A full-recipe cell is two stages: π_ref (BC, 10,000 updates on batches of 128 whole episodes) and
the method (iw-SFT, 2,000 updates on 256 episodes of the curated top percentiles, with q's and
π_ref's log-probs and the bound estimates). For each dataset this times a few dispatches of both
stages' real update (5 vmapped seeds), in two variants of the same objective:
  before  batches padded to the longest episode; π_ref's log-probs computed in every batch;
          episodes drawn by Gumbel-max (B × N random numbers a batch)
  after   packed batches (core/packing.py, pack_batches); π_ref's log-probs computed once over the
          data (pool_logprobs, precompute_ref), that one-off time added to the cell; episodes drawn
          by inverse-CDF sampling (step.draw_sequences)
and multiplies by the recipe's step counts. Data: a local Minari dataset's own episodes (their
lengths decide what unpadding saves), or fixed:L, synthetic episodes all L steps long (nothing to
unpad). Evaluation (the same in both variants) is costed with the env steps/s of
eval_throughput.py if its result file exists.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import iwsft  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.bc_throughput import synthetic_data  # noqa: E402
from iwsft.control import data as data_lib  # noqa: E402
from iwsft.control.config import get_config  # noqa: E402
from iwsft.control.policy import GaussianPolicy, PolicyConfig, make_logprob_fn, split_policy  # noqa: E402
from iwsft.control.settings import curation_for, validate  # noqa: E402
from iwsft.core import packing  # noqa: E402
from iwsft.core.config import make_optimizer  # noqa: E402

VARIANTS = {"before": False, "after": True}  # the exact speed-ups off / on


def load(spec: str, episodes: int) -> tuple[dict, np.ndarray]:
  """-> (pool arrays [N, T, ...], episode returns [N]) of a Minari id or fixed:L."""
  if spec.startswith("fixed:"):
    d = synthetic_data(episodes, int(spec.split(":")[1]), 11, 3)
    return d, np.random.default_rng(0).normal(size=episodes)
  eps = data_lib.episodes_from_minari(data_lib.load_dataset(spec))
  return eps.device_data(), eps.returns


def stage_cost(data, returns, cfg, stage_name: str, fast: bool, args) -> tuple[float, float]:
  """(seconds per update, one-off seconds) of a stage with `args.seeds` vmapped seeds."""
  settings = validate(cfg)
  stage = getattr(settings, stage_name)
  finetune = stage_name == "finetune"
  objective = settings.objective if finetune else settings.reference_objective
  method = cfg.method if finetune else "bc"
  obs, act = data["observations"].shape[-1], data["actions"].shape[-1]
  policies = [
    split_policy(
      GaussianPolicy(obs, act, PolicyConfig(hidden=settings.policy.hidden), rngs=nnx.Rngs(s))
    )
    for s in range(args.seeds)
  ]
  graphdef, _, consts = policies[0]
  vmapped = args.seeds > 1
  logprob_fn = make_logprob_fn(graphdef, consts)
  if fast:
    logprob_fn = packing.markov_logprob(logprob_fn)
  optimizer = make_optimizer(stage)
  update = iwsft.make_update(logprob_fn, optimizer, objective, track_bounds=finetune)
  ref = iwsft.stack_seeds([p for _, p, _ in policies])
  states = [iwsft.init_state(p, optimizer, s, p) for s, (_, p, _) in enumerate(policies)]
  mesh = iwsft.make_mesh()
  state = iwsft.core.sharding.put_replicated(iwsft.stack_seeds(states), mesh)
  pool = iwsft.core.sharding.shard_pool(data, mesh)
  logits, _ = curation_for(method, returns, settings.curation)
  capacity, seed_data, one_off = None, {}, 0.0
  if fast and stage.batch_level == "episode":  # as the pipeline: single steps have no padding
    lengths = data["mask"].sum(1).astype(np.int64)
    capacity = packing.capacity(lengths, logits, stage.batch_size, args.seeds)
  if fast and finetune:
    t0 = time.perf_counter()
    seed_data["logp_ref"] = jax.block_until_ready(
      iwsft.pool_logprobs(
        logprob_fn, iwsft.core.sharding.put_replicated(ref, mesh), pool, mesh, vmapped
      )
    )
    one_off = time.perf_counter() - t0  # includes its compilation: an upper bound
  sampling = iwsft.Sampling(
    stage.steps,
    stage.batch_size,
    step_level=stage.batch_level == "step",
    capacity=capacity,
    inverse_cdf=fast,
  )
  steps = iwsft.make_train_steps(update, mesh, sampling, args.steps_per_dispatch, vmapped=vmapped)
  logits = iwsft.core.sharding.put_replicated(logits, mesh)
  box = [state]

  def call():
    box[0], metrics = steps(box[0], pool, logits, seed_data)
    jax.block_until_ready(metrics["loss"])

  return common.median_seconds(call, args.repeats) / args.steps_per_dispatch, one_off


def cell(spec: str, args, cfg, eval_steps_per_s: float | None) -> list[dict]:
  data, returns = load(spec, args.episodes)
  mask = data["mask"]
  rows = []
  for variant, fast in VARIANTS.items():
    ref_s, ref_once = stage_cost(data, returns, cfg, "reference", fast, args)
    ft_s, ft_once = stage_cost(data, returns, cfg, "finetune", fast, args)
    train_h = (cfg.reference.steps * ref_s + cfg.finetune.steps * ft_s + ref_once + ft_once) / 3600
    evals = (cfg.reference.steps + cfg.finetune.steps) // cfg.eval.every + 2
    env_steps = (evals * cfg.eval.episodes + cfg.eval.final_episodes) * 1000 * args.seeds
    eval_h = None if eval_steps_per_s is None else env_steps / eval_steps_per_s / 3600
    rows.append(
      {
        "data": spec,
        "episodes": int(mask.shape[0]),
        "padded / real steps": float(mask.size / mask.sum()),
        "variant": variant,
        "π_ref s/update": ref_s,
        "iw-SFT s/update": ft_s,
        "one-off s": ref_once + ft_once,
        "training h": train_h,
        "evaluation h": "n/a" if eval_h is None else eval_h,
        f"cell h ({args.seeds} seeds)": train_h + (eval_h or 0.0),
      }
    )
  cell_h = f"cell h ({args.seeds} seeds)"
  rows[1]["vs before"] = rows[0][cell_h] / rows[1][cell_h]
  return rows


def _args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    "--datasets",
    default="iwsft/hopper-small/medium-replay-v1,iwsft/hopper-small/medium-expert-v1,fixed:1000",
    help="Minari ids (local or shipped) and/or fixed:L",
  )
  p.add_argument("--seeds", type=int, default=5)
  p.add_argument("--episodes", type=int, default=300, help="episodes of fixed:L data")
  p.add_argument("--steps_per_dispatch", type=int, default=4)
  p.add_argument("--repeats", type=int, default=2)
  return p.parse_args()


def main():
  args = _args()
  cfg = get_config()  # the paper preset
  eval_file = os.path.join(common.RESULTS, f"eval_throughput-{jax.devices()[0].platform}.json")
  eval_sps = None
  if os.path.exists(eval_file):
    eval_sps = max(r["env steps/s"] for r in json.load(open(eval_file))["rows"])
  rows = [r for spec in args.datasets.split(",") for r in cell(spec, args, cfg, eval_sps)]
  print(
    f"Full-recipe control cell (preset paper: π_ref {cfg.reference.steps:,} updates x "
    f"{cfg.reference.batch_size} episodes, iw-SFT {cfg.finetune.steps:,} x "
    f"{cfg.finetune.batch_size} episodes, MLP {tuple(cfg.policy.hidden)}, {args.seeds} seeds "
    f"vmapped) on {common.machine()['device']} x{jax.device_count()}"
    + ("" if eval_sps else "; evaluation not costed (run eval_throughput.py first)")
  )
  print(common.table(rows, list(rows[1])))
  print(f"-> {common.save('cell_cost', {'rows': rows})}")


if __name__ == "__main__":
  main()
