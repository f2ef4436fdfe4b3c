"""One control run, end to end: validate -> prepare -> reference -> finetune -> evaluate -> write.

  validate    the config into frozen Settings (settings.py), before anything is read or written
  prepare     the data (this process's share, the method's curation) and the policies
  reference   π_ref = BC on all episodes (method "bc" is π_ref itself); saved for reuse
  finetune    the method from π_ref's weights: filtered BC, iw-SFT, SFT(Q), iw-SFT(Q)
  evaluate    the final policies in the dataset's environment, normalised scores
  write       result.json, curve.png and policy/ per seed
The stages are functions in stages.py; this module runs them and owns the workdir.

Every input is checked before anything is written to the workdir, so bad input leaves it as it was.
A finished run with the same settings is not repeated: its result.json is returned. An unfinished
run with the same settings (run.json) resumes: finished stages are reused and the running one
continues from its newest checkpoint, bit-identically to an uninterrupted run on the same devices.
Several seeds train together, vmapped over a leading seed axis, on the same data.
Writes to the workdir (per seed under seed_<s>/ when several train together):
  run.json        the settings, checked when resuming
  checkpoints/    periodic TrainState checkpoints of each stage (orbax), the last K and the best
  metrics.jsonl   train rows (loss, weight diagnostics, bound estimates) and eval rows
  result.json     method, dataset, seed, config, final normalised score and raw return, wall time,
                  the code (iwsft version and git commit), and for weighted methods how the final
                  weights order the curated episodes
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
import os
import time

import jax
import numpy as np
from flax import nnx

from iwsft.control import config as control_config
from iwsft.control import data as data_lib
from iwsft.control import stages
from iwsft.control.policy import GaussianPolicy, split_policy
from iwsft.control.settings import Settings, curation_for, validate
from iwsft.control.stages import Context, Data, Policies, Workspace
from iwsft.core import sharding
from iwsft.core.config import make_optimizer
from iwsft.core.state import init_state, stack_seeds
from iwsft.errors import UserError
from iwsft.io import checkpoint, distributed, plots, tracking
from iwsft.io import workdir as workdir_lib
from iwsft.io.preemption import PreemptionGuard

__all__ = ["Settings", "curation_for", "prepare", "run_control", "run_control_seeds", "validate"]

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


# ----------------------------------------------------------------------------- prepare


def prepare(s: Settings, seeds: list[int], quiet: bool = False) -> Context:
  """Reads this process's share of the data and builds one policy per seed (no workdir yet)."""
  mesh = sharding.make_mesh(s.num_devices or None)
  for st in (s.reference, s.finetune):
    if st is not None and not (s.seeds_over_devices and len(seeds) > 1):  # else whole batches
      sharding.check_batch_size(st.batch_size, mesh, s.micro_batches)
  dataset = data_lib.load_dataset(s.dataset, s.download)
  data_lib.check_spaces(dataset)
  env_spec, action_space = environment(dataset, s.dataset)
  # Each process reads only its share of the training episodes; validation episodes are read whole.
  train_idx, val_idx = data_lib.split_indices(dataset.total_episodes, s.val_fraction, seeds[0])
  share = data_lib.read_share(dataset, train_idx, mesh)
  val_eps = None if val_idx is None else data_lib.episodes_from_minari(dataset, val_idx)
  logits, weight = curation_for(s.method, share.returns, s.curation)
  data = Data(
    mesh, dataset, env_spec, data_lib.reference_scores(dataset), share, val_eps, logits, weight
  )
  return Context(s, seeds, data, _policies(s, seeds, share, action_space), quiet=quiet)


def _policies(s: Settings, seeds: list[int], share, action_space) -> Policies:
  """One Gaussian policy per seed; the normalisation comes from the data, not the seed."""
  built = []
  for seed in seeds:
    policy = GaussianPolicy(
      len(share.obs_mean), action_space.shape[0], s.policy, rngs=nnx.Rngs(seed)
    )
    mean, std = share.obs_mean, share.obs_std
    if not s.normalise_observations:
      mean, std = np.zeros_like(mean), np.ones_like(std)
    policy.set_normalisation(mean, std, action_space.low, action_space.high)
    built.append(split_policy(policy))
  return Policies(built[0][0], built[0][2], [b[1] for b in built])


def environment(dataset, name: str):
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


# ----------------------------------------------------------------------------- workdir


def _identity(s: Settings, seeds: list[int], reference_dir: str, per_seed_dirs: bool) -> dict:
  """The settings a resumed run must share (the device count may change: checkpoints reshard)."""
  config = {k: v for k, v in s.config.items() if k not in workdir_lib.EXECUTION_SETTINGS}
  identity = {"config": config, "reference_dir": reference_dir}
  if per_seed_dirs:
    config.pop("seed")
    identity["seeds"] = seeds
  return identity


def _check_checkpoints(ctx: Context, workdir: str) -> None:
  """Refuses checkpoints of another model before the workdir is touched."""
  s = ctx.settings
  stages_ = (("reference", s.reference, s.reference_objective, False),)
  stages_ += ((s.method, s.finetune, s.objective, True),)
  for name, st, objective, fine_tuning in stages_:
    if st is not None:
      opt = make_optimizer(st)
      parts = stages.lean_parts(s, objective, fine_tuning)
      template = jax.eval_shape(
        lambda: stack_seeds([init_state(p, opt, 0, **parts) for p in ctx.policies.init_params])
      )
      checkpoint.check_resumable(
        os.path.join(os.path.abspath(workdir), "checkpoints", name), template
      )


def _claim(
  ctx: Context, workdir: str, identity: dict, overwrite: bool, per_seed_dirs: bool
) -> Workspace:
  """Takes the workdir (process 0 writes), opens the per-seed metrics logs."""
  seed_dirs = [f"seed_{s}" for s in ctx.seeds] if per_seed_dirs else ["."]
  primary = distributed.is_primary()
  if primary:
    defaults = {"config": workdir_lib.result_settings(control_config.get_config())}
    workdir, _ = workdir_lib.claim_workdir(workdir, identity, overwrite, defaults=defaults)
    if overwrite:
      workdir_lib.remove_outputs(
        workdir, OUTPUTS + tuple(d for d in os.listdir(workdir) if d.startswith("seed_"))
      )
    for d in seed_dirs:
      os.makedirs(os.path.join(workdir, d), exist_ok=True)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  out_dirs = [os.path.normpath(os.path.join(workdir, d)) for d in seed_dirs]
  distributed.barrier("workdir")
  track = ctx.settings.tracking
  config = ctx.settings.config
  logs = [
    tracking.open_log(os.path.join(d, "metrics.jsonl"), track, config=config)
    if primary
    else workdir_lib.NullLog()
    for d in out_dirs
  ]
  return Workspace(workdir, out_dirs, logs, PreemptionGuard())


# ----------------------------------------------------------------------------- write


def _result(ctx: Context, seed: int, final: dict, order: dict | None, wall: float) -> dict:
  config = dict(ctx.settings.config, seed=seed)
  d = ctx.data
  return {
    "method": ctx.settings.method,
    "dataset": ctx.settings.dataset,
    "seed": seed,
    "normalised_score": final["normalised_score"],
    "normalised_score_std": final["normalised_score_std"],
    "return_mean": final["return_mean"],
    "return_std": final["return_std"],
    "eval_episodes": final["episodes"],
    "note": None
    if final["normalised_score"] is not None
    else "dataset has no ref_min_score/ref_max_score: only raw returns are reported",
    "dataset_episodes": int(d.dataset.total_episodes),
    "dataset_steps": int(d.dataset.total_steps),
    "curated_episodes": int(np.isfinite(d.logits).sum()),
    "final_log_ratio": order,  # stages.final_log_ratio
    "wall_time_s": wall,
    "seeds_trained_together": len(ctx.seeds),
    "devices": [str(x) for x in d.mesh.devices.flat],
    "config": config,
    "code": workdir_lib.code_version(),
  }


def write(ctx: Context, results: list[dict], per_seed_dirs: bool) -> None:
  """result.json and curve.png per seed (process 0 only); a summary line per seed."""
  if not distributed.is_primary():
    return
  s, space = ctx.settings, ctx.space
  for d, r in zip(space.out_dirs, results):
    workdir_lib.write_json(os.path.join(d, "result.json"), r)
    rows = workdir_lib.read_rows(os.path.join(d, "metrics.jsonl"))
    plots.learning_curve(
      [row for row in rows if row["stage"] != "final"],
      os.path.join(d, "curve.png"),
      f"{s.method} on {s.dataset} (seed {r['seed']})",
    )
  if per_seed_dirs:
    workdir_lib.write_json(
      os.path.join(space.workdir, "result.json"), {"seeds": ctx.seeds, "results": results}
    )
  for d, r in zip(space.out_dirs, results):
    score = (
      "n/a"
      if r["normalised_score"] is None
      else f"{r['normalised_score']:.1f} ± {r['normalised_score_std']:.1f}"
    )
    ctx.say(
      f"{s.method} on {s.dataset} (seed {r['seed']}): normalised score "
      f"{score}, return {r['return_mean']:.1f} ± {r['return_std']:.1f} over "
      f"{r['eval_episodes']} episodes ({r['wall_time_s']:.0f} s) -> {d}"
    )


def _finished(s: Settings, workdir: str, identity: dict, per_seed_dirs: bool, quiet: bool):
  """The finished run's results when workdir holds one with these settings, else None."""
  finished = workdir_lib.finished_result(workdir, identity)
  if finished is None:
    return None
  results = finished["results"] if per_seed_dirs else [finished]
  if not quiet and distributed.is_primary():
    scores = ", ".join(str(r["normalised_score"]) for r in results)
    print(
      f"{s.method} on {s.dataset}: finished earlier in {workdir} (normalised score "
      f"{scores}); --overwrite runs it again"
    )
  return results


def _run(cfg, seeds, workdir, overwrite, reference_dir, quiet, per_seed_dirs) -> list[dict]:
  t_start = time.time()
  settings = validate(cfg)
  identity = _identity(settings, seeds, reference_dir, per_seed_dirs)
  if not overwrite:
    finished = _finished(settings, workdir, identity, per_seed_dirs, quiet)
    if finished is not None:
      return finished
  ctx = prepare(settings, seeds, quiet)
  if not overwrite:
    _check_checkpoints(ctx, workdir)
  ctx = dataclasses.replace(ctx, space=_claim(ctx, workdir, identity, overwrite, per_seed_dirs))
  reference_dir = os.path.abspath(reference_dir or os.path.join(ctx.space.workdir, "reference"))
  all_episodes = curation_for("bc", ctx.data.share.returns, settings.curation)
  try:
    with ctx.space.guard:
      ref_params, constants = stages.reference(ctx, reference_dir, all_episodes)
      ctx = dataclasses.replace(
        ctx, policies=dataclasses.replace(ctx.policies, constants=constants)
      )
      params = stages.finetune(ctx, ref_params)
      finals = stages.final_evaluation(ctx, params)
      orders = stages.final_log_ratio(ctx, ref_params, params)
  finally:
    for log in ctx.space.logs:
      log.close()
  wall = round(time.time() - t_start, 2)
  results = [_result(ctx, *x, wall) for x in zip(seeds, finals, orders)]
  write(ctx, results, per_seed_dirs)
  return results
