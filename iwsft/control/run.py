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


def _reference_key(cfg, seeds) -> dict:
  return {"dataset": cfg.dataset, "seed": seeds[0] if len(seeds) == 1 else list(seeds),
          "val_fraction": cfg.val_fraction, "hidden": cfg.hidden,
          "state_dependent_std": cfg.state_dependent_std, "reference": cfg.reference.to_dict()}


def _stage(c, weight_decay=0.0) -> trainer.StageConfig:
  return trainer.StageConfig(steps=c.steps, batch_size=c.batch_size, learning_rate=c.learning_rate,
                             batch_level=c.batch_level, warmup_steps=c.warmup_steps,
                             schedule=c.schedule, weight_decay=weight_decay)


OUTPUTS = ("checkpoints", "metrics.jsonl", "result.json", "policy", "curve.png")


def run_control(cfg, workdir: str, overwrite: bool = False, reference_dir: str = "",
                quiet: bool = False) -> dict:
  """Trains and evaluates cfg.method on cfg.dataset with seed cfg.seed; returns the result dict
  (also result.json)."""
  return _run(cfg, [cfg.seed], workdir, overwrite, reference_dir, quiet)[0]


def run_control_seeds(cfg, seeds, workdir: str, overwrite: bool = False, reference_dir: str = "",
                      quiet: bool = False) -> list[dict]:
  """run_control for several seeds trained together (vmapped over seeds, one program, same data).

  Seed s writes metrics.jsonl, result.json, curve.png and policy/ to <workdir>/seed_<s>/; the
  workdir holds run.json, the stacked checkpoints, and result.json with every seed's result.
  Returns the per-seed results in the order of `seeds` (cfg.seed is ignored).
  """
  seeds = [int(s) for s in seeds]
  if not seeds or len(set(seeds)) != len(seeds):
    raise UserError(f"seeds must be distinct and at least one, got {seeds}")
  if len(seeds) > 1 and cfg.val_fraction > 0:
    raise UserError("seeds trained together share one data split: use val_fraction=0, or run the "
                    "seeds one by one")
  return _run(cfg, seeds, workdir, overwrite, reference_dir, quiet, per_seed_dirs=True)


def _run(cfg, seeds: list[int], workdir: str, overwrite: bool, reference_dir: str, quiet: bool,
         per_seed_dirs: bool = False) -> list[dict]:
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

  mesh = train.make_mesh(cfg.num_devices or None)
  for st in (ref_stage, fin_stage):
    if st is not None:
      train.check_batch_size(st.batch_size, mesh)
  dataset = data_lib.load_dataset(cfg.dataset, cfg.download)
  data_lib.check_spaces(dataset)
  try:
    env = dataset.recover_environment()
  except Exception as e:
    raise UserError(f"cannot create the environment of {cfg.dataset!r}: {type(e).__name__}: {e}") from None
  env_spec, action_space = env.spec, env.action_space
  data_lib.check_matches_env(dataset, env.action_space, env.observation_space, cfg.dataset)
  env.close()
  ref_min, ref_max = data_lib.reference_scores(dataset)
  # Each process reads only its share of the training episodes; validation episodes are read whole.
  train_idx, val_idx = data_lib.split_indices(dataset.total_episodes, cfg.val_fraction, seeds[0])
  share = data_lib.read_share(dataset, train_idx, mesh)
  val_eps = None if val_idx is None else data_lib.episodes_from_minari(dataset, val_idx)
  ref_logits, ref_weight = trainer.curation_for("bc", share.returns, cfg)
  logits, weight = trainer.curation_for(cfg.method, share.returns, cfg)
  built = [trainer.build_policy(share.obs_mean, share.obs_std, action_space.shape[0], action_space.low,
                                action_space.high, cfg, s) for s in seeds]
  graphdef, constants = built[0][0], built[0][2]  # normalisation comes from the data, not the seed
  init_params = [b[1] for b in built]

  # The device count may change between a run and its resumption (checkpoints are resharded).
  config = {k: v for k, v in cfg.to_dict().items() if k != "num_devices"}
  identity = {"config": config, "reference_dir": reference_dir}
  if per_seed_dirs:
    config.pop("seed")
    identity["seeds"] = seeds
  if not overwrite:
    finished = cli.finished_result(workdir, identity)
    if finished is not None:
      results = finished["results"] if per_seed_dirs else [finished]
      if not quiet:
        scores = ", ".join(str(r["normalised_score"]) for r in results)
        print(f"{cfg.method} on {cfg.dataset}: finished earlier in {workdir} (normalised score "
              f"{scores}); --overwrite runs it again")
      return results
    # Refuse checkpoints of another model before the workdir is touched.
    for name, st in (("reference", ref_stage), (cfg.method, fin_stage)):
      if st is not None:
        optimizer = trainer.make_optimizer(st)
        template = jax.eval_shape(lambda: train.stack_runs([train.init_state(p, optimizer, 0) for p in init_params]))
        checkpoint.check_resumable(os.path.join(os.path.abspath(workdir), "checkpoints", name), template)
  primary = distributed.is_primary()  # only process 0 writes; checkpoints are saved collectively
  seed_dirs = [f"seed_{s}" for s in seeds] if per_seed_dirs else ["."]
  if primary:
    workdir, _ = cli.claim_workdir(workdir, identity, overwrite)
    if overwrite:
      cli.remove_outputs(workdir, OUTPUTS + tuple(d for d in os.listdir(workdir) if d.startswith("seed_")))
    for d in seed_dirs:
      os.makedirs(os.path.join(workdir, d), exist_ok=True)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  out_dirs = [os.path.normpath(os.path.join(workdir, d)) for d in seed_dirs]
  distributed.barrier("workdir")
  reference_dir = os.path.abspath(reference_dir or os.path.join(workdir, "reference"))
  ref_json = os.path.join(reference_dir, "reference.json")
  ref_key = _reference_key(cfg, seeds)
  ref_saved = None
  if os.path.exists(ref_json):
    with open(ref_json) as f:
      ref_saved = json.load(f)
    if ref_saved["key"] != ref_key:
      raise UserError(f"{reference_dir} holds a reference policy trained with other settings; "
                      "choose another --reference_dir")

  logs = [cli.MetricsLog(os.path.join(d, "metrics.jsonl")) if primary else cli.NullLog() for d in out_dirs]

  def eval_fns(n, seed_offset):
    act = make_act_fn(graphdef, constants)
    return [lambda p, s=s: evaluate(lambda o: act(p, o), env_spec, n, s + seed_offset, ref_min, ref_max)
            for s in seeds]

  def common(stage, key_offset=0):
    ckpt = checkpoint.TrainCheckpoints(os.path.join(workdir, "checkpoints", stage), cfg.checkpoint_every,
                                       cfg.keep_checkpoints)

    def on_resume(step):
      for log in logs:
        log.drop_stage_after(stage, step)

    return dict(name=stage, graphdef=graphdef, constants=constants, mesh=mesh, eval_every=cfg.eval_every,
                steps_per_dispatch=cfg.steps_per_dispatch, logs=logs, val_episodes=val_eps,
                skip_nonfinite=cfg.skip_nonfinite, checkpoints=ckpt, guard=guard, on_resume=on_resume,
                seeds=[s + key_offset for s in seeds])

  guard = PreemptionGuard()
  try:
    with guard:
      if ref_saved is not None:
        ref_params = train.unstack_runs(checkpoint.restore_state(os.path.join(reference_dir, "params"),
                                                                 train.stack_runs(init_params)), len(seeds))
        constants = checkpoint.restore_state(os.path.join(reference_dir, "constants"), constants)
        if not quiet and primary:
          print(f"reference policy loaded from {reference_dir}")
      else:
        ref_params = trainer.train_stage(
            params=init_params, ref_params=None, share=share, logits=ref_logits,
            weight=ref_weight, stage=ref_stage, objective=trainer.objective_for("bc", cfg),
            q_decay=0.0, evaluate_fns=eval_fns(cfg.eval_episodes, 1000), **common("reference"))
        checkpoint.save_state(os.path.join(reference_dir, "params"), train.stack_runs(ref_params))
        checkpoint.save_state(os.path.join(reference_dir, "constants"), constants)
        if primary:
          cli.write_json(ref_json, {"key": ref_key})

      if fin_stage is None:
        final_params = ref_params
      else:
        final_params = trainer.train_stage(
            params=ref_params, ref_params=ref_params, share=share,
            logits=logits, weight=weight, stage=fin_stage, objective=objective,
            q_decay=cfg.q_decay, evaluate_fns=eval_fns(cfg.eval_episodes, 1000),
            track_bounds=True, **common(cfg.method, key_offset=1))
      finals = []
      for d, log, params, final_eval in zip(out_dirs, logs, final_params,
                                            eval_fns(cfg.final_eval_episodes, 10_000)):
        checkpoint.save_state(os.path.join(d, "policy", "params"), params)
        checkpoint.save_state(os.path.join(d, "policy", "constants"), constants)
        final = final_eval(params)
        log.drop(lambda r: r.get("stage") == "final")
        log({"kind": "eval", "stage": "final", "step": fin_stage.steps if fin_stage else ref_stage.steps,
             **final})
        finals.append(final)
  finally:
    for log in logs:
      log.close()

  wall = round(time.time() - t_start, 2)
  results = [_result(cfg, s, final, dataset, logits, wall, len(seeds), mesh) for s, final in zip(seeds, finals)]
  if not primary:
    return results
  for d, r in zip(out_dirs, results):
    cli.write_json(os.path.join(d, "result.json"), r)
    rows = cli.read_rows(os.path.join(d, "metrics.jsonl"))
    plots.learning_curve([row for row in rows if row["stage"] != "final"], os.path.join(d, "curve.png"),
                         f"{cfg.method} on {cfg.dataset} (seed {r['seed']})")
  if per_seed_dirs:
    cli.write_json(os.path.join(workdir, "result.json"), {"seeds": seeds, "results": results})
  if not quiet:
    for d, r in zip(out_dirs, results):
      score = "n/a" if r["normalised_score"] is None else \
          f"{r['normalised_score']:.1f} ± {r['normalised_score_std']:.1f}"
      print(f"{cfg.method} on {cfg.dataset} (seed {r['seed']}): normalised score {score}, return "
            f"{r['return_mean']:.1f} ± {r['return_std']:.1f} over {r['eval_episodes']} episodes "
            f"({wall:.0f} s) -> {d}")
  return results


def _result(cfg, seed, final, dataset, logits, wall, seeds_together, mesh) -> dict:
  config = cfg.to_dict()
  config["seed"] = seed
  return {
      "method": cfg.method,
      "dataset": cfg.dataset,
      "seed": seed,
      "normalised_score": final["normalised_score"],
      "normalised_score_std": final["normalised_score_std"],
      "return_mean": final["return_mean"],
      "return_std": final["return_std"],
      "eval_episodes": final["episodes"],
      "note": None if final["normalised_score"] is not None else
              "dataset has no ref_min_score/ref_max_score: only raw returns are reported",
      "dataset_episodes": int(dataset.total_episodes),
      "dataset_steps": int(dataset.total_steps),
      "curated_episodes": int(np.isfinite(logits).sum()),
      "wall_time_s": wall,
      "seeds_trained_together": seeds_together,
      "devices": [str(d) for d in mesh.devices.flat],
      "config": config,
  }
