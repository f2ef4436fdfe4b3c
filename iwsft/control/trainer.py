"""Control training loop: builds the method from a config and drives the shared update step.

Host work per dispatch is one call of `train_steps` (steps_per_dispatch updates, batches sampled in
the graph) and one transfer of the stacked metrics; evaluation runs every `eval_every` updates.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from iwsft import curation, train
from iwsft.control.data import Episodes
from iwsft.control.policy import GaussianPolicy, PolicyConfig, make_logprob_fn, split_policy
from iwsft.errors import UserError
from iwsft.objectives import ObjectiveConfig


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """One training stage: steps, batch and optimiser."""

  steps: int
  batch_size: int
  learning_rate: float
  batch_level: str = "episode"
  warmup_steps: int = 0
  schedule: str = "constant"
  weight_decay: float = 0.0

  def __post_init__(self):
    if self.steps < 1:
      raise UserError(f"steps must be >= 1, got {self.steps}")
    if self.batch_size < 1:
      raise UserError(f"batch_size must be >= 1, got {self.batch_size}")
    if not self.learning_rate > 0:
      raise UserError(f"learning_rate must be > 0, got {self.learning_rate}")
    if self.batch_level not in ("episode", "step"):
      raise UserError(f"batch_level must be 'episode' or 'step', got {self.batch_level!r}")
    if self.schedule not in ("constant", "cosine"):
      raise UserError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
    if not 0 <= self.warmup_steps < self.steps:
      raise UserError(f"warmup_steps must be in [0, steps), got {self.warmup_steps}")


def make_optimizer(stage: StageConfig) -> optax.GradientTransformation:
  """Adam(W) with optional linear warm-up and cosine decay to 0 (the authors' fine-tuning schedule)."""
  if stage.schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, stage.learning_rate, stage.warmup_steps,
                                            stage.steps, end_value=0.0)
  elif stage.warmup_steps:
    lr = optax.join_schedules([optax.linear_schedule(0.0, stage.learning_rate, stage.warmup_steps),
                               optax.constant_schedule(stage.learning_rate)], [stage.warmup_steps])
  else:
    lr = stage.learning_rate
  if stage.weight_decay:
    return optax.adamw(lr, weight_decay=stage.weight_decay)
  return optax.adam(lr)


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


def curation_for(method: str, episodes: Episodes, cfg) -> tuple[np.ndarray, np.ndarray]:
  """-> (sampling logits [N], data weights [N]) of a method over the episodes' returns."""
  percentiles = parse_floats(cfg.percentiles, "percentiles")
  curation.check_top_fraction(cfg.top_fraction)
  logits = curation.sampling_logits(episodes.returns, method, top_fraction=cfg.top_fraction,
                                    percentiles=percentiles, quality_beta=cfg.quality_beta,
                                    quality_mode=cfg.quality_mode)
  weight = np.ones(episodes.num_episodes, np.float32)
  if method in ("sft_q", "iw_sft_q") and cfg.quality_mode == "weight":
    weight = curation.quality_weights(episodes.returns, cfg.quality_beta).astype(np.float32)
  return logits, weight


def build_policy(episodes: Episodes, action_low, action_high, cfg, seed: int):
  """A fresh policy with normalisation from the data -> (graphdef, params, constants)."""
  pcfg = PolicyConfig(hidden=parse_ints(cfg.hidden, "hidden"),
                      state_dependent_std=cfg.state_dependent_std)
  if not pcfg.hidden or min(pcfg.hidden) < 1:
    raise UserError(f"hidden must list positive layer widths, got {cfg.hidden!r}")
  policy = GaussianPolicy(episodes.observations.shape[-1], episodes.actions.shape[-1], pcfg,
                          rngs=nnx.Rngs(seed))
  mean, std = episodes.observation_stats()
  policy.set_normalisation(mean, std, action_low, action_high)
  return split_policy(policy)


def sequence_nll_fn(logprob_fn):
  """Jitted mean per-episode NLL (length-normalised) of a dataset dict: for validation."""

  @jax.jit
  def nll(params, data):
    logp = logprob_fn(params, data)
    per_ep = jnp.sum(logp * data["mask"], 1) / jnp.maximum(data["mask"].sum(1), 1)
    return -jnp.mean(per_ep)

  return nll


def train_stage(*, name: str, graphdef, params, constants, ref_params, episodes: Episodes,
                logits: np.ndarray, weight: np.ndarray, stage: StageConfig,
                objective: ObjectiveConfig, q_decay: float, seed: int, mesh, eval_every: int,
                steps_per_dispatch: int, evaluate_fn: Callable | None, log: Callable[[dict], None],
                val_episodes: Episodes | None = None, track_bounds: bool = False):
  """Runs one stage; returns the trained params. `log` receives train/eval rows as dicts.

  evaluate_fn(params) -> dict of evaluation results, called every eval_every updates and at the end.
  """
  logprob_fn = make_logprob_fn(graphdef, constants)
  optimizer = make_optimizer(stage)
  update = train.make_update(logprob_fn, optimizer, objective, q_decay, track_bounds)
  state = train.init_state(params, optimizer, seed, ref_params)
  state = train.put_replicated(state, mesh)
  data = train.put_replicated(episodes.device_data(weight), mesh)
  logits_dev = train.put_replicated(jnp.asarray(logits), mesh)
  val_data = None
  if val_episodes is not None:
    val_data = train.put_replicated(val_episodes.device_data(), mesh)
    val_nll = sequence_nll_fn(logprob_fn)

  chunk = max(1, min(steps_per_dispatch, eval_every if eval_every > 0 else stage.steps))
  fns = {}
  step_level = stage.batch_level == "step"

  def steps_fn(n):
    if n not in fns:
      fns[n] = train.make_train_steps(update, mesh, stage.batch_size, n, step_level)
    return fns[n]

  done, t0 = 0, time.time()
  if evaluate_fn is not None and eval_every > 0:
    log({"kind": "eval", "stage": name, "step": 0, "time_s": 0.0, **evaluate_fn(state.params)})
  with tqdm(total=stage.steps, desc=name, unit="step", dynamic_ncols=True, leave=False) as bar:
    while done < stage.steps:
      n = min(chunk, stage.steps - done)
      if eval_every > 0:
        n = min(n, eval_every - done % eval_every)
      state, metrics = steps_fn(n)(state, data, logits_dev)
      metrics = {k: float(np.mean(v)) for k, v in jax.device_get(metrics).items()}
      done += n
      if not np.isfinite(metrics["loss"]):
        raise FloatingPointError(f"{name}: non-finite loss at step {done}")
      row = {"kind": "train", "stage": name, "step": done, "time_s": round(time.time() - t0, 3), **metrics}
      log(row)
      bar.update(n)
      bar.set_postfix(loss=f"{metrics['loss']:.3f}")
      at_eval = eval_every > 0 and done % eval_every == 0
      if (at_eval or done == stage.steps) and (evaluate_fn or val_data is not None):
        ev = {"kind": "eval", "stage": name, "step": done, "time_s": round(time.time() - t0, 3)}
        if val_data is not None:
          ev["val_nll"] = float(val_nll(state.params, val_data))
        if evaluate_fn is not None and (at_eval or done == stage.steps):
          ev.update(evaluate_fn(state.params))
        log(ev)
        if ev.get("normalised_score") is not None:
          bar.set_postfix(loss=f"{metrics['loss']:.3f}", score=f"{ev['normalised_score']:.1f}")
  return jax.device_get(state.params)
