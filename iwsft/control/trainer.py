"""Control training loop: builds the method from a config and drives the shared update step.

Host work per dispatch is one call of `train_steps` (steps_per_dispatch updates, batches sampled in
the graph) and one transfer of the stacked metrics; evaluation runs every `eval_every` updates.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from iwsft import curation, distributed, train
from iwsft.optim import StageConfig, make_optimizer  # noqa: F401  (re-exported)
from iwsft.control.data import Episodes, Share
from iwsft.control.policy import GaussianPolicy, PolicyConfig, make_logprob_fn, split_policy
from iwsft.errors import UserError
from iwsft.objectives import ObjectiveConfig


def parse_ints(text: str, what: str) -> tuple[int, ...]:
  try:
    return tuple(int(x) for x in text.split(",") if x.strip())
  except ValueError:
    raise UserError(f"{what} must be comma-separated integers, got {text!r}") from None


def parse_floats(text: str, what: str) -> tuple[float, ...]:
  try:
    return tuple(float(x) for x in text.split(",") if x.strip())
  except ValueError:
    raise UserError(f"{what} must be comma-separated numbers, got {text!r}") from None


def objective_for(method: str, cfg) -> ObjectiveConfig:
  """The objective of a method: plain weighted NLL, or iw-SFT for iw_sft / iw_sft_q."""
  weighting = cfg.weighting if method in ("iw_sft", "iw_sft_q") else "none"
  if weighting not in ("none", "sequence", "step"):
    raise UserError(f"weighting must be 'sequence' or 'step', got {cfg.weighting!r}")
  try:
    return ObjectiveConfig(importance_weighting=weighting, temperature=cfg.temperature,
                           w_min=cfg.w_min, w_max=cfg.w_max, self_normalise=cfg.self_normalise,
                           step_w_min=cfg.step_w_min, step_w_max=cfg.step_w_max,
                           length_normalise=cfg.length_normalise)
  except ValueError as e:
    raise UserError(str(e)) from None


def curation_for(method: str, returns: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray]:
  """-> (sampling logits [N], data weights [N]) of a method over the episodes' returns [N]."""
  percentiles = parse_floats(cfg.percentiles, "percentiles")
  curation.check_top_fraction(cfg.top_fraction)
  logits = curation.sampling_logits(returns, method, top_fraction=cfg.top_fraction,
                                    percentiles=percentiles, quality_beta=cfg.quality_beta,
                                    quality_mode=cfg.quality_mode)
  weight = np.ones(len(returns), np.float32)
  if method in ("sft_q", "iw_sft_q") and cfg.quality_mode == "weight":
    weight = curation.quality_weights(returns, cfg.quality_beta).astype(np.float32)
  return logits, weight


def build_policy(obs_mean: np.ndarray, obs_std: np.ndarray, act_dim: int, action_low, action_high,
                 cfg, seed: int):
  """A fresh policy normalised with the data's observation statistics [O] -> (graphdef, params,
  constants)."""
  pcfg = PolicyConfig(hidden=parse_ints(cfg.hidden, "hidden"),
                      state_dependent_std=cfg.state_dependent_std)
  if not pcfg.hidden or min(pcfg.hidden) < 1:
    raise UserError(f"hidden must list positive layer widths, got {cfg.hidden!r}")
  policy = GaussianPolicy(len(obs_mean), act_dim, pcfg, rngs=nnx.Rngs(seed))
  policy.set_normalisation(obs_mean, obs_std, action_low, action_high)
  return split_policy(policy)


def sequence_nll_fn(logprob_fn):
  """Jitted mean per-episode NLL (length-normalised) of a dataset dict: for validation."""

  @jax.jit
  def nll(params, data):
    logp = logprob_fn(params, data)
    per_ep = jnp.sum(logp * data["mask"], 1) / jnp.maximum(data["mask"].sum(1), 1)
    return -jnp.mean(per_ep)

  return nll


def train_stage(*, name: str, graphdef, params: Sequence, constants, ref_params: Sequence | None,
                share: Share, logits: np.ndarray, weight: np.ndarray, stage: StageConfig,
                objective: ObjectiveConfig, q_decay: float, seeds: Sequence[int], mesh, eval_every: int,
                steps_per_dispatch: int, evaluate_fns: Sequence[Callable] | None,
                logs: Sequence[Callable[[dict], None]], val_episodes: Episodes | None = None,
                track_bounds: bool = False, skip_nonfinite: bool = False, checkpoints=None,
                on_resume=None, guard=None) -> list:
  """Runs one stage for every seed; returns the trained params, one per seed.

  share: this process's training episodes (data.read_share); logits, weight: [N] over all of them.
  params / ref_params / evaluate_fns / logs: one per seed. Several seeds train together in one
  vmapped program on the same data (train.stack_states); one seed trains as a plain state.
  evaluate_fns[i](params) -> dict of evaluation results, called every eval_every updates and at the
  end; logs[i] receives seed i's train/eval rows.
  checkpoints/on_resume/guard: periodic saves, resumption and clean stops (see train.fit).
  """
  logprob_fn = make_logprob_fn(graphdef, constants)
  optimizer = make_optimizer(stage)
  update = train.make_update(logprob_fn, optimizer, objective, q_decay, track_bounds, skip_nonfinite)
  refs = [None] * len(seeds) if ref_params is None else ref_params
  states = [train.init_state(p, optimizer, s, r) for p, s, r in zip(params, seeds, refs, strict=True)]
  state = train.stack_runs(states)
  val_nll = None
  if val_episodes is not None:
    val_data = jax.device_put(val_episodes.device_data())  # this process's default device
    nll_fn = sequence_nll_fn(logprob_fn)
    val_nll = lambda p: {"val_nll": float(nll_fn(p, val_data))}

  def on_eval(evaluate_fn):
    def run(p):
      row = {} if val_nll is None else val_nll(p)
      if evaluate_fn is not None:
        row.update(evaluate_fn(p))
      return row
    return run

  evaluate_fns = evaluate_fns or [None] * len(seeds)
  state = train.fit(update, state, share.pool(weight, mesh), logits, mesh=mesh, name=name,
                    steps=stage.steps, batch_size=stage.batch_size,
                    step_level=stage.batch_level == "step", steps_per_dispatch=steps_per_dispatch,
                    eval_every=eval_every,
                    on_eval=[on_eval(f) for f in evaluate_fns] if (any(evaluate_fns) or val_nll) else None,
                    log=list(logs), postfix_key="normalised_score", checkpoints=checkpoints,
                    best_key="return_mean", on_resume=on_resume, guard=guard)
  return train.unstack_runs(distributed.to_host(state.params), len(seeds))
