"""The control pipeline's stages, each a function of the run's context and the previous output:

  reference(ctx, reference_dir) -> (params, constants)  π_ref = BC on all episodes, saved for reuse
  finetune(ctx, ref_params) -> params                   the method from π_ref ("bc": π_ref itself)
  final_log_ratio(ctx, ref_params, params)              log θ/π_ref on the curated episodes
  final_evaluation(ctx, params) -> evaluations          policies saved, exported, evaluated

Several seeds train together, vmapped over a leading seed axis: params are lists, one per seed.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from iwsft.control import data as data_lib
from iwsft.control import export, video
from iwsft.control.evaluate import evaluate
from iwsft.control.policy import make_act_fn, make_logprob_fn
from iwsft.control.settings import Settings
from iwsft.core import objectives, packing, sharding
from iwsft.core.config import StageConfig, make_optimizer
from iwsft.core.loop import Hooks, fit
from iwsft.core.objectives import ObjectiveConfig
from iwsft.core.state import init_state, stack_seeds, unstack_seeds
from iwsft.core.step import Sampling, make_update, pool_logprobs, state_parts
from iwsft.errors import UserError
from iwsft.io import checkpoint, distributed
from iwsft.io import workdir as workdir_lib
from iwsft.io.preemption import PreemptionGuard

TRAIN_EVAL_SEED, FINAL_EVAL_SEED = 1000, 10_000  # evaluation episodes' seed offsets


@dataclasses.dataclass(frozen=True)
class Data:
  """What was read: the mesh, this process's share of the episodes and the environment."""

  mesh: object
  dataset: object  # the MinariDataset
  env_spec: object  # its evaluation environment
  ref_scores: tuple[float | None, float | None]
  share: data_lib.Share
  val_episodes: data_lib.Episodes | None
  logits: object  # [N] the method's sampling logits over the training episodes
  weight: object  # [N] the method's data weights


@dataclasses.dataclass(frozen=True)
class Policies:
  """One graph and set of constants (observation / action normalisation) for all seeds."""

  graphdef: object
  constants: object
  init_params: list


@dataclasses.dataclass(frozen=True)
class Workspace:
  workdir: str
  out_dirs: list[str]  # one per seed (the workdir itself for a single run)
  logs: list  # one metrics log per seed
  guard: PreemptionGuard


@dataclasses.dataclass(frozen=True)
class Context:
  settings: Settings
  seeds: list[int]
  data: Data
  policies: Policies
  space: Workspace | None = None
  quiet: bool = False

  def say(self, text: str) -> None:
    if not self.quiet and distributed.is_primary():
      print(text)


def _evaluators(ctx: Context, episodes: int, seed_offset: int) -> list:
  """One `params -> evaluation dict` per seed, in the dataset's environment."""
  act = make_act_fn(ctx.policies.graphdef, ctx.policies.constants)
  return [
    lambda p, s=s: evaluate(
      lambda o: act(p, o), ctx.data.env_spec, episodes, s + seed_offset, *ctx.data.ref_scores
    )
    for s in ctx.seeds
  ]


def _with_validation(ctx: Context, logprob_fn, evaluators: list) -> list:
  """The evaluators, each adding the validation NLL when episodes are held out."""
  if ctx.data.val_episodes is None:
    return evaluators
  val_data = jax.device_put(ctx.data.val_episodes.device_data())  # this process's default device
  nll = jax.jit(lambda p, d: -objectives.sequence_logprob(logprob_fn(p, d), d["mask"]).mean())
  return [lambda p, ev=ev: {"val_nll": float(nll(p, val_data)), **ev(p)} for ev in evaluators]


def _hooks(ctx: Context, name: str, logprob_fn) -> Hooks:
  s, space = ctx.settings, ctx.space
  evaluators = _evaluators(ctx, s.eval.episodes, TRAIN_EVAL_SEED)
  return Hooks(
    logs=space.logs,
    eval_every=s.eval.every,
    checkpoints=checkpoint.TrainCheckpoints(
      os.path.join(space.workdir, "checkpoints", name), s.checkpoint_every, s.keep_checkpoints
    ),
    evaluate=_with_validation(ctx, logprob_fn, evaluators),
    best_key="return_mean",
    postfix_key="normalised_score",
    guard=space.guard,
    on_resume=lambda step: [log.drop_stage_after(name, step) for log in space.logs],
  )


def lean_parts(s: Settings, objective: ObjectiveConfig, fine_tuning: bool) -> dict:
  """init_state's keep_q / keep_ref for a stage (fine_tuning: from π_ref, whose log-probs are
  computed once when s.precompute_ref)."""
  return state_parts(objective, fine_tuning, fine_tuning and s.precompute_ref)


def train_stage(
  ctx: Context,
  name: str,
  params: list,
  ref_params: list | None,
  curated: tuple,
  stage: StageConfig,
  objective: ObjectiveConfig,
  key_offset: int,
) -> list:
  """One stage for every seed (vmapped when several) on the episodes drawn ∝ exp(logits) with
  data weights `weight` (curated = (logits, weight)); returns the trained params, one per seed."""
  s, mesh, share = ctx.settings, ctx.data.mesh, ctx.data.share
  logprob_fn = make_logprob_fn(ctx.policies.graphdef, ctx.policies.constants)
  if s.pack_batches:
    logprob_fn = packing.markov_logprob(logprob_fn)  # the policy is Markov: log π(a_t | s_t)
  optimizer = make_optimizer(stage)
  update = make_update(
    logprob_fn,
    optimizer,
    objective,
    ref_params is not None,
    skip_nonfinite=s.skip_nonfinite,
    micro_batches=s.micro_batches,
  )
  refs = ref_params or [None] * len(ctx.seeds)
  parts = lean_parts(s, objective, ref_params is not None)
  state = stack_seeds(
    [
      init_state(p, optimizer, seed + key_offset, r, **parts)
      for p, seed, r in zip(params, ctx.seeds, refs)
    ]
  )
  logits, weight = curated
  pool = share.pool(weight, mesh)
  seed_data = {}
  if ref_params is not None and s.precompute_ref:
    ref = sharding.put_replicated(stack_seeds(refs), mesh)
    seed_data["logp_ref"] = pool_logprobs(logprob_fn, ref, pool, mesh, len(ctx.seeds) > 1)
  capacity = None
  if s.pack_batches and stage.batch_level == "episode":  # single steps have no padding
    capacity = packing.capacity(share.lengths, logits, stage.batch_size, len(ctx.seeds))
  sampling = Sampling(
    stage.steps,
    stage.batch_size,
    step_level=stage.batch_level == "step",
    steps_per_dispatch=s.steps_per_dispatch,
    capacity=capacity,
    inverse_cdf=True,
  )
  hooks = _hooks(ctx, name, logprob_fn)
  by_seed = s.seeds_over_devices and len(ctx.seeds) > 1
  kw = dict(mesh=mesh, name=name, hooks=hooks, seed_data=seed_data, seeds_over_devices=by_seed)
  state = fit(update, state, pool, logits, sampling, **kw)
  return unstack_seeds(distributed.to_host(state.params), len(ctx.seeds))


def reference(ctx: Context, reference_dir: str, all_episodes: tuple) -> tuple[list, object]:
  """π_ref per seed and the policies' constants: loaded from reference_dir when trained there
  before, else trained (on all_episodes = (logits, weight)) and saved."""
  s = ctx.settings
  ref_json = os.path.join(reference_dir, "reference.json")
  key = workdir_lib.canonical(
    {
      "dataset": s.dataset,
      "val_fraction": s.val_fraction,
      "seed": ctx.seeds[0] if len(ctx.seeds) == 1 else ctx.seeds,
      "policy": s.config["policy"],
      "reference": s.config["reference"],
    }
  )
  if os.path.exists(ref_json):
    with open(ref_json) as f:
      if json.load(f)["key"] != key:
        raise UserError(
          f"{reference_dir} holds a reference policy trained with other settings; "
          "choose another --reference_dir"
        )
    params = checkpoint.restore_state(
      os.path.join(reference_dir, "params"), stack_seeds(ctx.policies.init_params)
    )
    constants = checkpoint.restore_state(
      os.path.join(reference_dir, "constants"), ctx.policies.constants
    )
    ctx.say(f"reference policy loaded from {reference_dir}")
    return unstack_seeds(params, len(ctx.seeds)), constants
  params = train_stage(
    ctx,
    "reference",
    ctx.policies.init_params,
    None,
    all_episodes,
    s.reference,
    s.reference_objective,
    key_offset=0,
  )
  checkpoint.save_state(os.path.join(reference_dir, "params"), stack_seeds(params))
  checkpoint.save_state(os.path.join(reference_dir, "constants"), ctx.policies.constants)
  if distributed.is_primary():
    workdir_lib.write_json(ref_json, {"key": key})
  return params, ctx.policies.constants


def finetune(ctx: Context, ref_params: list) -> list:
  """The method fine-tuned from π_ref on its curated episodes (π_ref itself for "bc")."""
  s = ctx.settings
  if s.finetune is None:
    return ref_params
  curated = (ctx.data.logits, ctx.data.weight)
  return train_stage(
    ctx, s.method, ref_params, ref_params, curated, s.finetune, s.objective, key_offset=1
  )


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
  """Spearman's rank correlation (scipy); None (undefined) for a constant input."""
  from scipy import stats

  if np.ptp(a) == 0 or np.ptp(b) == 0:
    return None
  return float(stats.spearmanr(a, b).statistic)


def final_log_ratio(ctx: Context, ref_params: list, params: list) -> list[dict | None]:
  """Per seed, how far the fine-tuned θ moved from π_ref on the curated episodes, and how its
  importance weights order them: the mean over them of log θ/π_ref (each episode's log-likelihood
  ratio, length-normalised as the weights are) and its Spearman correlation with the episode's
  return (for weighted methods; θ stands in for q, which lags it by ~1 / (1 − q_decay) updates at
  a learning rate annealed to 0). None without a fine-tuning stage."""
  s, d = ctx.settings, ctx.data
  if s.finetune is None:
    return [None] * len(ctx.seeds)
  logprob_fn = make_logprob_fn(ctx.policies.graphdef, ctx.policies.constants)
  pool = d.share.pool(d.weight, d.mesh)
  stacked = len(ctx.seeds) > 1
  ln = s.objective.length_normalise
  seq = jax.jit(lambda lp, m: objectives.sequence_logprob(lp, m, ln))
  ratio = []
  for p in (params, ref_params):
    placed = sharding.put_replicated(stack_seeds(p), d.mesh)
    lp = pool_logprobs(logprob_fn, placed, pool, d.mesh, stacked)
    ratio.append(np.asarray(distributed.to_host(seq(lp, pool["mask"])), np.float64))
  log_ratio = (ratio[0] - ratio[1]).reshape(len(ctx.seeds), -1)[:, : d.share.num_rows]
  curated = np.isfinite(np.asarray(d.logits))
  returns = np.asarray(d.share.returns, np.float64)[curated]
  out = []
  weighted = s.objective.uses_weights
  for row in log_ratio[:, curated]:
    out.append(
      {
        "mean_log_ratio": float(row.mean()),
        "spearman_log_ratio_return": _spearman(row, returns) if weighted else None,
        "episodes": int(curated.sum()),
      }
    )
  return out


def final_evaluation(ctx: Context, params: list) -> list[dict]:
  """Saves and exports each seed's policy and evaluates it over eval.final_episodes episodes."""
  s, space, pol = ctx.settings, ctx.space, ctx.policies
  steps = (s.finetune or s.reference).steps
  act = make_act_fn(pol.graphdef, pol.constants)  # for the videos: compiled once for all seeds
  evaluators = _evaluators(ctx, s.eval.final_episodes, FINAL_EVAL_SEED)
  finals = []
  for d, log, p, ev, seed in zip(space.out_dirs, space.logs, params, evaluators, ctx.seeds):
    checkpoint.save_state(os.path.join(d, "policy", "params"), p)
    checkpoint.save_state(os.path.join(d, "policy", "constants"), pol.constants)
    final = ev(p)
    if distributed.is_primary():
      export.export_policy(
        pol.graphdef, p, pol.constants, os.path.join(d, "policy"), ctx.data.env_spec
      )
      if s.eval.video_episodes > 0:
        final["video_returns"] = _video(ctx, lambda o, p=p: act(p, o), d, seed + FINAL_EVAL_SEED)
    log.drop_stage_after("final", 0)
    log({"kind": "eval", "stage": "final", "step": steps, **final})
    finals.append(final)
  return finals


def _video(ctx: Context, act, out_dir: str, seed: int) -> list[float]:
  """Records eval.video_episodes episodes of act(obs [1, O]) -> [1, A] (the final evaluation's
  first reset seeds) to video.gif and video_frames.png; returns their returns."""
  episodes = ctx.settings.eval.video_episodes
  frames, returns = video.record_episodes(act, ctx.data.env_spec, episodes, seed)
  video.write_video(
    frames, os.path.join(out_dir, "video.gif"), os.path.join(out_dir, "video_frames.png")
  )
  return returns
