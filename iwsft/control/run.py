"""One control run, end to end: data -> π_ref (BC on all data) -> method -> evaluation -> files.

Every input is checked before anything is written to the workdir, so bad input leaves it as it was.
A finished run with the same settings is not repeated: its result.json is returned.
An unfinished run in the workdir with the same settings (run.json) is resumed: finished stages are
reused and the running one continues from its newest checkpoint, so the end result is bit-identical
to an uninterrupted run on the same device count.
Writes to the workdir:
  run.json        the settings, checked when resuming
  checkpoints/    periodic TrainState checkpoints of each stage (orbax), the last K and the best
  metrics.jsonl   train rows (loss, weight diagnostics, bound estimates) and eval rows
  result.json     method, dataset, seed, config, final normalised score and raw return, wall time
  curve.png       learning curve
  policy/         the final policy: params and constants (observation/action normalisation), orbax
  reference/      π_ref the same way, plus reference.json; reused by later runs that share the
                  same --reference_dir, dataset and reference settings
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from iwsft import checkpoint, cli, distributed, plots, train
from iwsft.control import data as data_lib
from iwsft.control import trainer
from iwsft.control.config import METHODS
from iwsft.control.evaluate import evaluate
from iwsft.control.policy import make_act_fn
from iwsft.errors import UserError
from iwsft.preemption import PreemptionGuard


def _reference_key(cfg) -> dict:
  return {"dataset": cfg.dataset, "seed": cfg.seed, "val_fraction": cfg.val_fraction,
          "hidden": cfg.hidden, "state_dependent_std": cfg.state_dependent_std,
          "reference": cfg.reference.to_dict()}


def _stage(c, weight_decay=0.0) -> trainer.StageConfig:
  return trainer.StageConfig(steps=c.steps, batch_size=c.batch_size, learning_rate=c.learning_rate,
                             batch_level=c.batch_level, warmup_steps=c.warmup_steps,
                             schedule=c.schedule, weight_decay=weight_decay)


def run_control(cfg, workdir: str, overwrite: bool = False, reference_dir: str = "",
                quiet: bool = False) -> dict:
  """Trains and evaluates cfg.method on cfg.dataset; returns the result dict (also result.json)."""
  t_start = time.time()
  if cfg.method not in METHODS:
    raise UserError(f"method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
  if cfg.eval_episodes < 1 or cfg.final_eval_episodes < 1:
    raise UserError("eval_episodes and final_eval_episodes must be >= 1")
  checkpoint.check_checkpoint_settings(cfg.checkpoint_every, cfg.keep_checkpoints)
  ref_stage = _stage(cfg.reference)
  fin_stage = _stage(cfg, cfg.weight_decay) if cfg.method != "bc" else None
  objective = trainer.objective_for(cfg.method, cfg)
  if not 0.0 <= cfg.q_decay < 1.0:
    raise UserError(f"q_decay must be in [0, 1), got {cfg.q_decay}")
  if cfg.method in ("iw_sft", "iw_sft_q") and objective.importance_weighting == "sequence" \
      and fin_stage.batch_level == "step":
    raise UserError("per-episode importance weights need batch_level=episode (or use --weighting=step)")

  dataset = data_lib.load_dataset(cfg.dataset, cfg.download)
  episodes = data_lib.episodes_from_minari(dataset)
  try:
    env = dataset.recover_environment()
  except Exception as e:
    raise UserError(f"cannot create the environment of {cfg.dataset!r}: {type(e).__name__}: {e}") from None
  env_spec, action_space = env.spec, env.action_space
  data_lib.check_matches_env(episodes, env.action_space, env.observation_space, cfg.dataset)
  env.close()
  ref_min, ref_max = data_lib.reference_scores(dataset)
  train_eps, val_eps = data_lib.split_episodes(episodes, cfg.val_fraction, cfg.seed)
  ref_logits, ref_weight = trainer.curation_for("bc", train_eps, cfg)
  logits, weight = trainer.curation_for(cfg.method, train_eps, cfg)
  mesh = train.make_mesh(cfg.num_devices or None)
  for st in (ref_stage, fin_stage):
    if st is not None:
      train.check_batch_size(st.batch_size, mesh)
  graphdef, params, constants = trainer.build_policy(train_eps, action_space.low, action_space.high,
                                                     cfg, cfg.seed)

  # The device count may change between a run and its resumption (checkpoints are resharded).
  identity = {"config": {k: v for k, v in cfg.to_dict().items() if k != "num_devices"},
              "reference_dir": reference_dir}
  if not overwrite:
    finished = cli.finished_result(workdir, identity)
    if finished is not None:
      if not quiet:
        print(f"{cfg.method} on {cfg.dataset}: finished earlier in {workdir} (normalised score "
              f"{finished['normalised_score']}); --overwrite runs it again")
      return finished
    # Refuse checkpoints of another model before the workdir is touched.
    for name, st in (("reference", ref_stage), (cfg.method, fin_stage)):
      if st is not None:
        template = jax.eval_shape(lambda st=st: train.init_state(params, trainer.make_optimizer(st), 0))
        checkpoint.check_resumable(os.path.join(os.path.abspath(workdir), "checkpoints", name), template)
  primary = distributed.is_primary()  # only process 0 writes; checkpoints are saved collectively
  if primary:
    workdir, _ = cli.claim_workdir(workdir, identity, overwrite)
    if overwrite:
      cli.remove_outputs(workdir, ("checkpoints", "metrics.jsonl", "result.json", "policy", "curve.png"))
  workdir = os.path.abspath(os.path.expanduser(workdir))
  distributed.barrier("workdir")
  reference_dir = os.path.abspath(reference_dir or os.path.join(workdir, "reference"))
  ref_json = os.path.join(reference_dir, "reference.json")
  ref_saved = None
  if os.path.exists(ref_json):
    with open(ref_json) as f:
      ref_saved = json.load(f)
    if ref_saved["key"] != _reference_key(cfg):
      raise UserError(f"{reference_dir} holds a reference policy trained with other settings; "
                      "choose another --reference_dir")

  log = cli.MetricsLog(os.path.join(workdir, "metrics.jsonl")) if primary else cli.NullLog()

  def eval_fn(n, seed_offset):
    act = make_act_fn(graphdef, constants)
    return lambda p: evaluate(lambda o: act(p, o), env_spec, n, cfg.seed + seed_offset, ref_min, ref_max)

  def common(stage):
    ckpt = checkpoint.TrainCheckpoints(os.path.join(workdir, "checkpoints", stage), cfg.checkpoint_every,
                                       cfg.keep_checkpoints)
    return dict(name=stage, graphdef=graphdef, constants=constants, mesh=mesh, eval_every=cfg.eval_every,
                steps_per_dispatch=cfg.steps_per_dispatch, log=log, val_episodes=val_eps,
                skip_nonfinite=cfg.skip_nonfinite, checkpoints=ckpt, guard=guard,
                on_resume=lambda step: log.drop_stage_after(stage, step))

  guard = PreemptionGuard()
  try:
    with guard:
      if ref_saved is not None:
        ref_params = checkpoint.restore_state(os.path.join(reference_dir, "params"), params)
        constants = checkpoint.restore_state(os.path.join(reference_dir, "constants"), constants)
        if not quiet and primary:
          print(f"reference policy loaded from {reference_dir}")
      else:
        ref_params = trainer.train_stage(
            params=params, ref_params=None, episodes=train_eps, logits=ref_logits,
            weight=ref_weight, stage=ref_stage, objective=trainer.objective_for("bc", cfg),
            q_decay=0.0, seed=cfg.seed, evaluate_fn=eval_fn(cfg.eval_episodes, 1000), **common("reference"))
        checkpoint.save_state(os.path.join(reference_dir, "params"), ref_params)
        checkpoint.save_state(os.path.join(reference_dir, "constants"), constants)
        if primary:
          cli.write_json(ref_json, {"key": _reference_key(cfg)})

      if fin_stage is None:
        final_params = ref_params
      else:
        final_params = trainer.train_stage(
            params=ref_params, ref_params=ref_params, episodes=train_eps,
            logits=logits, weight=weight, stage=fin_stage, objective=objective,
            q_decay=cfg.q_decay, seed=cfg.seed + 1, evaluate_fn=eval_fn(cfg.eval_episodes, 1000),
            track_bounds=True, **common(cfg.method))
      checkpoint.save_state(os.path.join(workdir, "policy", "params"), final_params)
      checkpoint.save_state(os.path.join(workdir, "policy", "constants"), constants)
      final = eval_fn(cfg.final_eval_episodes, 10_000)(final_params)
      log.drop(lambda r: r.get("stage") == "final")
      log({"kind": "eval", "stage": "final", "step": fin_stage.steps if fin_stage else ref_stage.steps, **final})
  finally:
    log.close()

  result = {
      "method": cfg.method,
      "dataset": cfg.dataset,
      "seed": cfg.seed,
      "normalised_score": final["normalised_score"],
      "normalised_score_std": final["normalised_score_std"],
      "return_mean": final["return_mean"],
      "return_std": final["return_std"],
      "eval_episodes": final["episodes"],
      "note": None if final["normalised_score"] is not None else
              "dataset has no ref_min_score/ref_max_score: only raw returns are reported",
      "dataset_episodes": episodes.num_episodes,
      "dataset_steps": episodes.num_steps,
      "curated_episodes": int(np.isfinite(logits).sum()),
      "wall_time_s": round(time.time() - t_start, 2),
      "devices": [str(d) for d in mesh.devices.flat],
      "config": cfg.to_dict(),
  }
  if not primary:
    return result
  cli.write_json(os.path.join(workdir, "result.json"), result)
  rows = cli.read_rows(os.path.join(workdir, "metrics.jsonl"))
  plots.learning_curve([r for r in rows if r["stage"] != "final"], os.path.join(workdir, "curve.png"),
                       f"{cfg.method} on {cfg.dataset} (seed {cfg.seed})")
  if not quiet:
    score = "n/a" if final["normalised_score"] is None else \
        f"{final['normalised_score']:.1f} ± {final['normalised_score_std']:.1f}"
    print(f"{cfg.method} on {cfg.dataset}: normalised score {score}, return "
          f"{final['return_mean']:.1f} ± {final['return_std']:.1f} over {final['episodes']} episodes "
          f"({result['wall_time_s']:.0f} s) -> {workdir}")
  return result
