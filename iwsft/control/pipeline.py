"""One control run, end to end: prepare -> reference -> fine-tune -> evaluate -> write.

  prepare     check the config and the data, read this process's share, build the policies
  reference   π_ref = BC on all episodes (method "bc" is π_ref itself); saved for reuse
  finetune    the method from π_ref's weights: filtered BC, iw-SFT, SFT(Q), iw-SFT(Q)
  evaluate    the final policies in the dataset's environment, normalised scores
  write       result.json, curve.png and policy/ per seed

Every input is checked before anything is written to the workdir, so bad input leaves it as it was.
A finished run with the same settings is not repeated: its result.json is returned. An unfinished
run with the same settings (run.json) resumes: finished stages are reused and the running one
continues from its newest checkpoint, bit-identically to an uninterrupted run on the same devices.
Several seeds train together, vmapped over a leading seed axis, on the same data.
Writes to the workdir (per seed under seed_<s>/ when several train together):
  run.json        the settings, checked when resuming
  checkpoints/    periodic TrainState checkpoints of each stage (orbax), the last K and the best
  metrics.jsonl   train rows (loss, weight diagnostics, bound estimates) and eval rows
  result.json     method, dataset, seed, config, final normalised score and raw return, wall time
  curve.png       learning curve
  tensorboard/    the metrics rows as TensorBoard event files, one directory per stage
  policy/         the final policy: params and constants (observation/action normalisation), orbax,
                  and policy.jaxexport + policy.json, the policy as StableHLO (control/export.py)
  video.gif       with eval.video_episodes > 0: those episodes of the final policy, and
  video_frames.png  six frames of them side by side
  reference/      π_ref the same way, plus reference.json; reused by runs that share the same
                  reference_dir, dataset and reference settings
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np
from flax import nnx

from iwsft.control import data as data_lib
from iwsft.control import export, video
from iwsft.control.config import METHODS, WEIGHTED
from iwsft.control.evaluate import evaluate
from iwsft.control.policy import (
  GaussianPolicy,
  PolicyConfig,
  make_act_fn,
  make_logprob_fn,
  split_policy,
)
from iwsft.core import curation, objectives, packing, sharding
from iwsft.core.config import StageConfig, make_optimizer, objective_config, stage_config
from iwsft.core.loop import Hooks, fit
from iwsft.core.objectives import ObjectiveConfig
from iwsft.core.state import init_state, stack_seeds, unstack_seeds
from iwsft.core.step import make_update, pool_logprobs
from iwsft.errors import UserError
from iwsft.io import checkpoint, distributed, plots, tracking
from iwsft.io import workdir as workdir_lib
from iwsft.io.preemption import PreemptionGuard

OUTPUTS = (
  "checkpoints",
  "metrics.jsonl",
  "tensorboard",
  "result.json",
  "policy",
  "curve.png",
  "video.gif",
  "video_frames.png",
)
TRAIN_EVAL_SEED, FINAL_EVAL_SEED = 1000, 10_000  # evaluation episodes' seed offsets


def run_control(
  cfg, workdir: str, overwrite: bool = False, reference_dir: str = "", quiet: bool = False
) -> dict:
  """Trains and evaluates cfg.method on cfg.dataset with seed cfg.seed; returns the result dict
  (also result.json)."""
  return _run(cfg, [cfg.seed], workdir, overwrite, reference_dir, quiet, per_seed_dirs=False)[0]


def run_control_seeds(
  cfg, seeds, workdir: str, overwrite: bool = False, reference_dir: str = "", quiet: bool = False
) -> list[dict]:
  """run_control for several seeds trained together (vmapped over seeds, one program, same data).

  Seed s writes metrics.jsonl, result.json, curve.png and policy/ to <workdir>/seed_<s>/; the
  workdir holds run.json, the stacked checkpoints, and result.json with every seed's result.
  Returns the per-seed results in the order of `seeds` (cfg.seed is ignored).
  """
  seeds = [int(s) for s in seeds]
  if not seeds or len(set(seeds)) != len(seeds):
    raise UserError(f"seeds must be distinct and at least one, got {seeds}")
  if len(seeds) > 1 and cfg.val_fraction > 0:
    raise UserError(
      "seeds trained together share one data split: use val_fraction=0, or run the seeds one by one"
    )
  return _run(cfg, seeds, workdir, overwrite, reference_dir, quiet, per_seed_dirs=True)


# ----------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Settings:
  """A control config, validated once."""

  reference: StageConfig
  finetune: StageConfig | None  # None for method "bc" (π_ref itself)
  reference_objective: ObjectiveConfig
  objective: ObjectiveConfig
  policy: PolicyConfig
  tracking: tracking.TrackingConfig


def validate(cfg) -> Settings:
  """Checks every setting of a control config; a UserError names the first bad one."""
  if cfg.method not in METHODS:
    raise UserError(f"method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
  if cfg.eval.episodes < 1 or cfg.eval.final_episodes < 1 or cfg.eval.every < 0:
    raise UserError("eval.episodes and eval.final_episodes must be >= 1, eval.every >= 0")
  if cfg.eval.video_episodes < 0:
    raise UserError(f"eval.video_episodes must be >= 0, got {cfg.eval.video_episodes}")
  checkpoint.check_checkpoint_settings(cfg.checkpoint_every, cfg.keep_checkpoints)
  try:
    curation.check_top_fraction(cfg.curation.top_fraction)
    curation.check_percentiles(tuple(float(p) for p in cfg.curation.percentiles))
    curation.check_quality(cfg.curation.quality_beta, cfg.curation.quality_mode)
  except UserError as e:
    raise UserError(f"curation.{e}") from None
  hidden = tuple(cfg.policy.hidden)
  if not hidden or not all(isinstance(h, int) and h >= 1 for h in hidden):
    raise UserError(f"policy.hidden must list positive layer widths, got {cfg.policy.hidden!r}")
  finetune = None if cfg.method == "bc" else stage_config(cfg.finetune, "finetune")
  objective = objective_config(cfg.objective, weighted=cfg.method in WEIGHTED)
  if objective.importance_weighting == "sequence" and finetune.batch_level == "step":
    raise UserError(
      "per-episode importance weights need finetune.batch_level=episode "
      "(or objective.importance_weighting=step)"
    )
  reference_objective = dataclasses.replace(
    objective_config(cfg.objective, weighted=False), q_decay=0.0
  )
  return Settings(
    stage_config(cfg.reference, "reference"),
    finetune,
    reference_objective,
    objective,
    PolicyConfig(hidden=hidden, state_dependent_std=cfg.policy.state_dependent_std),
    tracking.tracking_config(cfg.log),
  )


def curation_for(method: str, returns: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray]:
  """-> (sampling logits [N], data weights [N]) of a method over the episodes' returns [N]."""
  c = cfg.curation
  logits = curation.sampling_logits(
    returns,
    method,
    top_fraction=c.top_fraction,
    percentiles=tuple(float(p) for p in c.percentiles),
    quality_beta=c.quality_beta,
    quality_mode=c.quality_mode,
  )
  weight = np.ones(len(returns), np.float32)
  if method in ("sft_q", "iw_sft_q") and c.quality_mode == "weight":
    weight = curation.quality_weights(returns, c.quality_beta).astype(np.float32)
  return logits, weight


# ----------------------------------------------------------------------------- prepare


@dataclasses.dataclass
class Run:
  """What the steps of one run share (nothing here is written to disk)."""

  cfg: object
  settings: Settings
  seeds: list[int]
  mesh: object
  dataset: object
  env_spec: object
  ref_scores: tuple[float | None, float | None]
  share: data_lib.Share
  val_episodes: data_lib.Episodes | None
  graphdef: object
  constants: object
  init_params: list
  quiet: bool
  workdir: str = ""
  out_dirs: list[str] = dataclasses.field(default_factory=list)
  logs: list = dataclasses.field(default_factory=list)
  guard: PreemptionGuard = dataclasses.field(default_factory=PreemptionGuard)


def prepare(cfg, seeds: list[int], quiet: bool) -> Run:
  """Validates the config, reads this process's share of the data and builds one policy per seed."""
  settings = validate(cfg)
  mesh = sharding.make_mesh(cfg.num_devices or None)
  for st in (settings.reference, settings.finetune):
    if st is not None:
      sharding.check_batch_size(st.batch_size, mesh)
  dataset = data_lib.load_dataset(cfg.dataset, cfg.download)
  data_lib.check_spaces(dataset)
  env_spec, action_space = _environment(dataset, cfg.dataset)
  # Each process reads only its share of the training episodes; validation episodes are read whole.
  train_idx, val_idx = data_lib.split_indices(dataset.total_episodes, cfg.val_fraction, seeds[0])
  share = data_lib.read_share(dataset, train_idx, mesh)
  val_eps = None if val_idx is None else data_lib.episodes_from_minari(dataset, val_idx)
  built = []
  for s in seeds:
    policy = GaussianPolicy(
      len(share.obs_mean), action_space.shape[0], settings.policy, rngs=nnx.Rngs(s)
    )
    mean, std = share.obs_mean, share.obs_std
    if not cfg.policy.normalise_observations:
      mean, std = np.zeros_like(mean), np.ones_like(std)
    policy.set_normalisation(mean, std, action_space.low, action_space.high)
    built.append(split_policy(policy))
  # The normalisation comes from the data, not the seed: one graphdef and constants for all.
  return Run(
    cfg,
    settings,
    seeds,
    mesh,
    dataset,
    env_spec,
    data_lib.reference_scores(dataset),
    share,
    val_eps,
    built[0][0],
    built[0][2],
    [b[1] for b in built],
    quiet,
  )


def _environment(dataset, name: str):
  """(the spec of the dataset's evaluation environment, its action space), checked against the
  data. Minari's evaluation environment is the one the dataset names for evaluation, or the one
  that recorded it where it names none."""
  try:
    env = dataset.recover_environment(eval_env=True)
  except Exception as e:
    raise UserError(f"cannot create the environment of {name!r}: {type(e).__name__}: {e}") from None
  data_lib.check_matches_env(dataset, env.action_space, env.observation_space, name)
  env.close()
  return env.spec, env.action_space


def _identity(run: Run, reference_dir: str, per_seed_dirs: bool) -> dict:
  """The settings a resumed run must share (the device count may change: checkpoints reshard)."""
  config = workdir_lib.result_settings(run.cfg)
  identity = {"config": config, "reference_dir": reference_dir}
  if per_seed_dirs:
    config.pop("seed")
    identity["seeds"] = run.seeds
  return identity


def _check_checkpoints(run: Run, workdir: str) -> None:
  """Refuses checkpoints of another model before the workdir is touched."""
  for name, st in (("reference", run.settings.reference), (run.cfg.method, run.settings.finetune)):
    if st is not None:
      opt = make_optimizer(st)
      template = jax.eval_shape(
        lambda: stack_seeds([init_state(p, opt, 0) for p in run.init_params])
      )
      checkpoint.check_resumable(
        os.path.join(os.path.abspath(workdir), "checkpoints", name), template
      )


def _claim(run: Run, workdir: str, identity: dict, overwrite: bool, per_seed_dirs: bool) -> None:
  """Takes the workdir (process 0 writes), opens the per-seed metrics logs."""
  seed_dirs = [f"seed_{s}" for s in run.seeds] if per_seed_dirs else ["."]
  primary = distributed.is_primary()
  if primary:
    workdir, _ = workdir_lib.claim_workdir(workdir, identity, overwrite)
    if overwrite:
      workdir_lib.remove_outputs(
        workdir, OUTPUTS + tuple(d for d in os.listdir(workdir) if d.startswith("seed_"))
      )
    for d in seed_dirs:
      os.makedirs(os.path.join(workdir, d), exist_ok=True)
  run.workdir = os.path.abspath(os.path.expanduser(workdir))
  run.out_dirs = [os.path.normpath(os.path.join(run.workdir, d)) for d in seed_dirs]
  distributed.barrier("workdir")
  config = run.cfg.to_dict()
  run.logs = [
    tracking.open_log(os.path.join(d, "metrics.jsonl"), run.settings.tracking, config=config)
    if primary
    else workdir_lib.NullLog()
    for d in run.out_dirs
  ]


# ----------------------------------------------------------------------------- train


def _evaluators(run: Run, episodes: int, seed_offset: int) -> list:
  """One `params -> evaluation dict` per seed, in the dataset's environment."""
  act = make_act_fn(run.graphdef, run.constants)
  return [
    lambda p, s=s: evaluate(
      lambda o: act(p, o), run.env_spec, episodes, s + seed_offset, *run.ref_scores
    )
    for s in run.seeds
  ]


def _with_validation(run: Run, logprob_fn, evaluators: list) -> list:
  """The evaluators, each adding the validation NLL when episodes are held out."""
  if run.val_episodes is None:
    return evaluators
  val_data = jax.device_put(run.val_episodes.device_data())  # this process's default device
  nll = jax.jit(lambda p, d: -objectives.sequence_logprob(logprob_fn(p, d), d["mask"]).mean())
  return [lambda p, ev=ev: {"val_nll": float(nll(p, val_data)), **ev(p)} for ev in evaluators]


def train_stage(
  run: Run,
  name: str,
  params: list,
  ref_params: list | None,
  method: str,
  stage: StageConfig,
  objective: ObjectiveConfig,
  key_offset: int,
) -> list:
  """One stage for every seed (vmapped when several); returns the trained params, one per seed."""
  logprob_fn = make_logprob_fn(run.graphdef, run.constants)
  if run.cfg.pack_batches:
    logprob_fn = packing.markov_logprob(logprob_fn)  # the policy is Markov: log π(a_t | s_t)
  optimizer = make_optimizer(stage)
  update = make_update(
    logprob_fn,
    optimizer,
    objective,
    track_bounds=ref_params is not None,
    skip_nonfinite=run.cfg.skip_nonfinite,
  )
  refs = ref_params or [None] * len(run.seeds)
  state = stack_seeds(
    [
      init_state(p, optimizer, s + key_offset, r)
      for p, s, r in zip(params, run.seeds, refs, strict=True)
    ]
  )
  logits, weight = curation_for(method, run.share.returns, run.cfg)
  ckpt = checkpoint.TrainCheckpoints(
    os.path.join(run.workdir, "checkpoints", name),
    run.cfg.checkpoint_every,
    run.cfg.keep_checkpoints,
  )
  hooks = Hooks(
    logs=run.logs,
    eval_every=run.cfg.eval.every,
    checkpoints=ckpt,
    evaluate=_with_validation(
      run, logprob_fn, _evaluators(run, run.cfg.eval.episodes, TRAIN_EVAL_SEED)
    ),
    best_key="return_mean",
    postfix_key="normalised_score",
    guard=run.guard,
    on_resume=lambda step: [log.drop_stage_after(name, step) for log in run.logs],
  )
  pool = run.share.pool(weight, run.mesh)
  seed_data = {}
  if ref_params is not None and run.cfg.precompute_ref:
    ref = sharding.put_replicated(stack_seeds(refs), run.mesh)
    seed_data["logp_ref"] = pool_logprobs(logprob_fn, ref, pool, run.mesh, len(run.seeds) > 1)
  capacity = None
  if run.cfg.pack_batches and stage.batch_level == "episode":  # single steps have no padding
    capacity = packing.capacity(run.share.lengths, logits, stage.batch_size, len(run.seeds))
  state = fit(
    update,
    state,
    pool,
    logits,
    mesh=run.mesh,
    name=name,
    steps=stage.steps,
    batch_size=stage.batch_size,
    step_level=stage.batch_level == "step",
    steps_per_dispatch=run.cfg.steps_per_dispatch,
    hooks=hooks,
    seed_data=seed_data,
    capacity=capacity,
    inverse_cdf=True,
  )
  return unstack_seeds(distributed.to_host(state.params), len(run.seeds))


def reference(run: Run, reference_dir: str) -> list:
  """π_ref per seed: loaded from reference_dir when trained there before, else trained and saved."""
  ref_json = os.path.join(reference_dir, "reference.json")
  key = workdir_lib.canonical(
    {
      "dataset": run.cfg.dataset,
      "val_fraction": run.cfg.val_fraction,
      "seed": run.seeds[0] if len(run.seeds) == 1 else run.seeds,
      "policy": run.cfg.policy.to_dict(),
      "reference": run.cfg.reference.to_dict(),
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
      os.path.join(reference_dir, "params"), stack_seeds(run.init_params)
    )
    run.constants = checkpoint.restore_state(
      os.path.join(reference_dir, "constants"), run.constants
    )
    _say(run, f"reference policy loaded from {reference_dir}")
    return unstack_seeds(params, len(run.seeds))
  s = run.settings
  params = train_stage(
    run, "reference", run.init_params, None, "bc", s.reference, s.reference_objective, key_offset=0
  )
  checkpoint.save_state(os.path.join(reference_dir, "params"), stack_seeds(params))
  checkpoint.save_state(os.path.join(reference_dir, "constants"), run.constants)
  if distributed.is_primary():
    workdir_lib.write_json(ref_json, {"key": key})
  return params


def finetune(run: Run, ref_params: list) -> list:
  """The method fine-tuned from π_ref (π_ref itself for "bc")."""
  s = run.settings
  if s.finetune is None:
    return ref_params
  return train_stage(
    run,
    run.cfg.method,
    ref_params,
    ref_params,
    run.cfg.method,
    s.finetune,
    s.objective,
    key_offset=1,
  )


def final_evaluation(run: Run, params: list) -> list[dict]:
  """Saves each seed's policy and evaluates it over eval.final_episodes episodes."""
  steps = (run.settings.finetune or run.settings.reference).steps
  act = make_act_fn(run.graphdef, run.constants)  # for the videos: compiled once for all seeds
  finals = []
  for d, log, p, ev, seed in zip(
    run.out_dirs,
    run.logs,
    params,
    _evaluators(run, run.cfg.eval.final_episodes, FINAL_EVAL_SEED),
    run.seeds,
  ):
    checkpoint.save_state(os.path.join(d, "policy", "params"), p)
    checkpoint.save_state(os.path.join(d, "policy", "constants"), run.constants)
    final = ev(p)
    if distributed.is_primary():
      export.export_policy(run.graphdef, p, run.constants, os.path.join(d, "policy"), run.env_spec)
      if run.cfg.eval.video_episodes > 0:
        final["video_returns"] = _video(run, lambda o, p=p: act(p, o), d, seed + FINAL_EVAL_SEED)
    log.drop_stage_after("final", 0)
    log({"kind": "eval", "stage": "final", "step": steps, **final})
    finals.append(final)
  return finals


def _video(run: Run, act, out_dir: str, seed: int) -> list[float]:
  """Records eval.video_episodes episodes of act(obs [1, O]) -> [1, A] (the final evaluation's
  first reset seeds) to video.gif and video_frames.png; returns their returns."""
  frames, returns = video.record_episodes(act, run.env_spec, run.cfg.eval.video_episodes, seed)
  video.write_video(
    frames, os.path.join(out_dir, "video.gif"), os.path.join(out_dir, "video_frames.png")
  )
  return returns


# ----------------------------------------------------------------------------- write


def _result(run: Run, seed: int, final: dict, wall: float) -> dict:
  config = workdir_lib.canonical(run.cfg.to_dict())  # as result.json reads back: tuples as lists
  config["seed"] = seed
  logits, _ = curation_for(run.cfg.method, run.share.returns, run.cfg)
  return {
    "method": run.cfg.method,
    "dataset": run.cfg.dataset,
    "seed": seed,
    "normalised_score": final["normalised_score"],
    "normalised_score_std": final["normalised_score_std"],
    "return_mean": final["return_mean"],
    "return_std": final["return_std"],
    "eval_episodes": final["episodes"],
    "note": None
    if final["normalised_score"] is not None
    else "dataset has no ref_min_score/ref_max_score: only raw returns are reported",
    "dataset_episodes": int(run.dataset.total_episodes),
    "dataset_steps": int(run.dataset.total_steps),
    "curated_episodes": int(np.isfinite(logits).sum()),
    "wall_time_s": wall,
    "seeds_trained_together": len(run.seeds),
    "devices": [str(d) for d in run.mesh.devices.flat],
    "config": config,
  }


def write(run: Run, results: list[dict], per_seed_dirs: bool) -> None:
  """result.json and curve.png per seed (process 0 only); a summary line per seed."""
  if not distributed.is_primary():
    return
  for d, r in zip(run.out_dirs, results):
    workdir_lib.write_json(os.path.join(d, "result.json"), r)
    rows = workdir_lib.read_rows(os.path.join(d, "metrics.jsonl"))
    plots.learning_curve(
      [row for row in rows if row["stage"] != "final"],
      os.path.join(d, "curve.png"),
      f"{run.cfg.method} on {run.cfg.dataset} (seed {r['seed']})",
    )
  if per_seed_dirs:
    workdir_lib.write_json(
      os.path.join(run.workdir, "result.json"), {"seeds": run.seeds, "results": results}
    )
  for d, r in zip(run.out_dirs, results):
    score = (
      "n/a"
      if r["normalised_score"] is None
      else f"{r['normalised_score']:.1f} ± {r['normalised_score_std']:.1f}"
    )
    _say(
      run,
      f"{run.cfg.method} on {run.cfg.dataset} (seed {r['seed']}): normalised score "
      f"{score}, return {r['return_mean']:.1f} ± {r['return_std']:.1f} over "
      f"{r['eval_episodes']} episodes ({r['wall_time_s']:.0f} s) -> {d}",
    )


def _say(run: Run, text: str) -> None:
  if not run.quiet and distributed.is_primary():
    print(text)


def _run(
  cfg,
  seeds: list[int],
  workdir: str,
  overwrite: bool,
  reference_dir: str,
  quiet: bool,
  per_seed_dirs: bool,
) -> list[dict]:
  t_start = time.time()
  run = prepare(cfg, seeds, quiet)
  identity = _identity(run, reference_dir, per_seed_dirs)
  if not overwrite:
    finished = workdir_lib.finished_result(workdir, identity)
    if finished is not None:
      results = finished["results"] if per_seed_dirs else [finished]
      _say(
        run,
        f"{cfg.method} on {cfg.dataset}: finished earlier in {workdir} (normalised score "
        f"{', '.join(str(r['normalised_score']) for r in results)}); --overwrite runs it again",
      )
      return results
    _check_checkpoints(run, workdir)
  _claim(run, workdir, identity, overwrite, per_seed_dirs)
  reference_dir = os.path.abspath(reference_dir or os.path.join(run.workdir, "reference"))
  try:
    with run.guard:
      finals = final_evaluation(run, finetune(run, reference(run, reference_dir)))
  finally:
    for log in run.logs:
      log.close()
  wall = round(time.time() - t_start, 2)
  results = [_result(run, s, final, wall) for s, final in zip(seeds, finals)]
  write(run, results, per_seed_dirs)
  return results
