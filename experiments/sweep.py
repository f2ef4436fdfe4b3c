"""Reproducibility sweeps: methods × datasets × seeds in one command, then paper-style tables and plots.

  python experiments/sweep.py --workdir=runs/sweep                  # the default CPU sweep (control)
  python experiments/sweep.py --pipeline=lm --workdir=runs/lm-sweep --seeds=0,1,2

Control: the seeds of each (dataset, method) train together in one vmapped program
(--seeds_per_group caps how many; 1 runs them one by one), and every method on a dataset shares the
π_ref of those seeds. Language: one run per seed (seeds do not share data). Rerunning the command
skips finished cells and resumes unfinished ones from their checkpoints; a sweep with other settings
in the same --workdir is refused unless --overwrite.

Settings: --preset gives the base config (control: 'cpu-sweep' = the 2-core scale with fine-tuning
batches of 8 episodes, 'cpu' = the demo's scale, 'paper' = the authors' GPU recipe), --set key=value (repeatable; nested keys as reference.steps) changes any
config value, and --config=FILE.json may hold any of these flags as keys ({"seeds": [0, 1], "set":
{"steps": 1000}}); flags given on the command line win.
Writes to --workdir: table.md, table.csv (mean, std, 95% bootstrap CI per dataset and method),
cells.csv (every cell), curves.png (evaluation score over training, mean and 95% CI over seeds),
bounds.png (SFT vs iw-SFT bound estimates while training iw-SFT), sweep.json (timings).
"""

import json
import os
import shutil
import time

from absl import flags

from iwsft import aggregate, cli, plots
from iwsft.errors import UserError

flags.DEFINE_enum("pipeline", "control", ["control", "lm"], "which pipeline to sweep")
flags.DEFINE_string("workdir", "runs/sweep", "output directory of the sweep")
flags.DEFINE_string("config", "", "JSON file with flag values (methods, datasets, seeds, set, ...)")
flags.DEFINE_list("methods", ["bc", "filtered_bc", "iw_sft", "sft_q", "iw_sft_q"],
                  "control methods (the language pipeline: sft, iw_sft, sft_q; base is always evaluated)")
flags.DEFINE_list("datasets", ["medium", "medium-replay", "medium-expert"],
                  "control: dataset kinds of --env/--profile (built when missing), or Minari ids")
flags.DEFINE_string("env", "hopper", "control: environment family of dataset kinds")
flags.DEFINE_enum("profile", "small", ["small", "full"], "control: dataset profile of dataset kinds")
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "seeds")
flags.DEFINE_integer("seeds_per_group", 0, "control: seeds trained together in one vmapped program "
                     "(0: all of a cell's seeds; 1: one by one)")
flags.DEFINE_enum("preset", "cpu-sweep", ["cpu", "cpu-sweep", "paper"],
                  "control: base config: 'cpu-sweep' (2-core scale, fine-tuning batches of 8 episodes), "
                  "'cpu' (the demo's: batches of 32), 'paper' (the authors' GPU recipe)")
flags.DEFINE_multi_string("set", [], "config override key=value (repeatable)")
flags.DEFINE_bool("overwrite", False, "replace a sweep in --workdir made with other settings")
flags.DEFINE_bool("dry_run", False, "print what would run and exit")
flags.DEFINE_integer("bootstrap_seed", 0, "seed of the bootstrap resampling of the CIs")

FROM_FILE = ("pipeline", "methods", "datasets", "env", "profile", "seeds", "seeds_per_group", "preset", "set")


def apply_config_file(F) -> dict:
  """Flag values from --config for flags not given on the command line; returns its 'set' dict."""
  if not F.config:
    return {}
  try:
    with open(F.config) as f:
      spec = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f"cannot read --config {F.config}: {e}") from None
  unknown = set(spec) - set(FROM_FILE)
  if unknown:
    raise UserError(f"--config {F.config}: unknown keys {sorted(unknown)} (allowed: {', '.join(FROM_FILE)})")
  sets = spec.pop("set", {})
  if not isinstance(sets, dict):
    raise UserError(f"--config {F.config}: 'set' must be an object of key: value")
  for key, value in spec.items():
    if not F[key].present:
      F[key].value = [str(v) for v in value] if isinstance(value, list) else value
  return sets


def apply_overrides(cfg, items: dict) -> None:
  """cfg[key] = value for dotted keys, converted to the type of the existing value."""
  for key, value in items.items():
    node = cfg
    parts = key.split(".")
    for p in parts[:-1]:
      if p not in node or not hasattr(node[p], "items"):
        raise UserError(f"--set {key}: no config section {p!r}")
      node = node[p]
    leaf = parts[-1]
    if leaf not in node or hasattr(node[leaf], "items"):
      raise UserError(f"--set {key}: no such setting (see the pipeline's --helpfull for names)")
    old = node[leaf]
    try:
      if isinstance(old, bool):
        if str(value).lower() not in ("true", "false", "1", "0"):
          raise ValueError
        new = str(value).lower() in ("true", "1")
      else:
        new = type(old)(value)
    except (TypeError, ValueError):
      raise UserError(f"--set {key}={value!r}: expected a value of type {type(old).__name__}") from None
    node[leaf] = new


def parse_sets(values) -> dict:
  out = {}
  for item in values:
    if "=" not in item:
      raise UserError(f"--set {item!r}: expected key=value")
    key, value = item.split("=", 1)
    out[key.strip()] = value.strip()
  return out


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  F = flags.FLAGS
  sets = {**apply_config_file(F), **parse_sets(F.set)}
  try:
    seeds = [int(s) for s in F.seeds]
  except ValueError:
    raise UserError(f"--seeds must be integers, got {','.join(map(str, F.seeds))}") from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise UserError(f"--seeds must be distinct and at least one, got {seeds}")
  if F.seeds_per_group < 0:
    raise UserError("--seeds_per_group must be >= 0")
  workdir = os.path.abspath(F.workdir)
  t0 = time.time()

  if F.pipeline == "control":
    from iwsft.control import datasets as ds_lib
    from iwsft.control import sweep
    from iwsft.control.config import METHODS, preset_config

    bad = [m for m in F.methods if m not in METHODS]
    if bad:
      raise UserError(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    base = preset_config(F.preset)
    apply_overrides(base, sets)
    kinds = [d for d in F.datasets if "/" not in d]
    if kinds and F.env not in ds_lib.ENVS:
      raise UserError(f"--env must be one of {', '.join(ds_lib.ENVS)}")
    bad = [k for k in kinds if k not in ds_lib.KINDS]
    if bad:
      raise UserError(f"--datasets: unknown kinds {bad}; choose from {', '.join(ds_lib.KINDS)} or give Minari ids")
    dataset_ids = [d if "/" in d else ds_lib.dataset_id(F.env, F.profile, d) for d in F.datasets]
    methods, score_label = list(F.methods), sweep.SCORE
    identity = {k: v for k, v in base.to_dict().items() if k not in ("dataset", "method", "seed", "num_devices")}
    make_plan = lambda: sweep.plan(workdir, dataset_ids, methods, seeds, F.seeds_per_group)
    describe = lambda todo: [f"{m} on {d}, seeds {','.join(map(str, g))}" for d, m, g in todo]
  else:
    from iwsft.lm import sweep
    from iwsft.lm.config import LM_METHODS, get_config

    bad = [m for m in F.methods if m not in LM_METHODS]
    if F["methods"].present and bad:
      raise UserError(f"--methods: unknown {bad}; choose from {', '.join(LM_METHODS)}")
    base = get_config()
    if F["methods"].present:
      base.methods = ",".join(F.methods)
    apply_overrides(base, sets)
    methods, dataset_ids, score_label = ["base", *base.methods.split(",")], [], sweep.SCORE
    identity = {k: v for k, v in base.to_dict().items() if k not in ("seed", "stages", "num_devices")}
    make_plan = lambda: sweep.plan(workdir, seeds)
    describe = lambda todo: [f"language pipeline, seed {s}" for s in todo]

  identity = {"pipeline": F.pipeline, "config": identity}
  if F.dry_run:
    todo = make_plan()
    print(f"{len(todo)} run(s) to do in {workdir}" + ("" if todo else " (all cells finished)"))
    print("\n".join(describe(todo)))
    return
  _, changed = cli.claim_workdir(workdir, identity, F.overwrite, marker="")
  if changed:  # only with --overwrite: the old cells were made with other settings
    for name in os.listdir(workdir):
      if name != "run.json":
        p = os.path.join(workdir, name)
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
  todo = make_plan()  # after any removal above
  print(f"{len(todo)} run(s) to do in {workdir}" + ("" if todo else " (all cells finished)"))
  if F.pipeline == "control":
    kinds_to_build = [d for d in F.datasets if "/" not in d]
    if kinds_to_build:
      ds_lib.build(F.env, F.profile, kinds_to_build, seed=0, force=False)
    sweep.run_grid(base, workdir, todo, quiet=True)
    recs = sweep.records(workdir, dataset_ids, methods, seeds)
  else:
    sweep.run_grid(base, workdir, todo, quiet=True)
    recs = sweep.records(workdir, seeds)
  wall = time.time() - t0

  summary = aggregate.summarise(recs, seed=F.bootstrap_seed)
  table = aggregate.markdown_table(summary, methods, dataset_ids)
  header = (f"{score_label}: mean ± std [95% bootstrap CI] over seeds {','.join(map(str, seeds))} "
            f"({F.pipeline} sweep, preset {F.preset if F.pipeline == 'control' else 'default'}"
            + (f", overrides {sets}" if sets else "") + ")")
  text = f"{header}\n\n{table}\n"
  print("\n" + text)
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(text)
  aggregate.write_csv(os.path.join(workdir, "table.csv"), summary,
                      ["dataset", "method", "n", "mean", "std", "ci_low", "ci_high", "seeds"])
  aggregate.write_csv(os.path.join(workdir, "cells.csv"), recs,
                      ["dataset", "method", "seed", "score", "return_mean", "wall_time_s",
                       "seeds_trained_together", "cell"])
  outputs = ["table.md", "table.csv", "cells.csv"]
  if F.pipeline == "control":
    short = {d: d.split("/", 1)[-1] for d in dataset_ids}
    curves = sweep.learning_curves(recs)
    if curves:
      plots.band_panels({short[d]: curves[d] for d in dataset_ids if d in curves},
                        os.path.join(workdir, "curves.png"), "update step of the method's stage",
                        score_label, f"evaluation during training, mean and 95% CI over {len(seeds)} seeds "
                        "(bc: the π_ref stage; the others start from π_ref)")
      outputs.append("curves.png")
    bounds = sweep.bound_curves(recs)
    if bounds:
      plots.band_panels({short[d]: bounds[d] for d in dataset_ids if d in bounds},
                        os.path.join(workdir, "bounds.png"), "update step", "bound estimate (per step)",
                        "SFT vs iw-SFT lower-bound estimates while training iw-SFT (mean, 95% CI)")
      outputs.append("bounds.png")
  info = {"wall_time_s": round(wall, 1), "runs_this_invocation": len(todo), "cells": len(recs),
          "seeds": seeds, "methods": methods, "datasets": dataset_ids or None, "overrides": sets}
  cli.write_json(os.path.join(workdir, "sweep.json"), info)
  print(f"{len(recs)} cells; this invocation ran {len(todo)} run(s) in {wall:.0f} s -> "
        f"{workdir}/{{{','.join(outputs)}}}")


if __name__ == "__main__":
  cli.run(main)
