"""Reproducibility sweeps: methods × datasets × seeds in one command, then paper-style tables and
plots.

  python experiments/sweep.py --workdir=runs/sweep                    # the default CPU sweep
  (control)
  python experiments/sweep.py --config=iwsft/lm/config.py --workdir=runs/lm-sweep --seeds=0,1,2
  python experiments/sweep.py --dataset_configs=configs/control/hopper_medium_replay.py,...

--config picks the pipeline and its settings: the control config at a preset (default
iwsft/control/config.py:cpu-sweep, the 2-core scale with fine-tuning batches of 8 episodes; :cpu is
the demo's, :paper the authors' GPU recipe) or the language config; any value is overridden as
--config.<key>=<value>. Control: the seeds of each (dataset, method) train together in one vmapped
program (--seeds_per_group caps how many; 1 runs them one by one), and every method on a dataset
shares the π_ref of those seeds. Language: one run per seed. Rerunning the command skips finished
cells and resumes unfinished ones from their checkpoints; a sweep with other settings in the same
--workdir is refused unless --overwrite.
Writes to --workdir: table.md, table.csv (mean, std, 95% Student-t CI per dataset and method),
cells.csv (every cell), curves.png (evaluation score over training, mean and 95% CI over seeds),
bounds.png (SFT vs iw-SFT bound estimates while training iw-SFT), paired.csv and paired.png
(each weighted method minus its unweighted counterpart, seed by seed; also in table.md),
sweep.json (timings).
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

from iwsft import sweep
from iwsft.control import config as control_config
from iwsft.errors import UserError
from iwsft.io import cli

cli.define_config(
  cli.config_file(control_config) + ":cpu-sweep",
  "the pipeline's config file[:preset]; override values with --config.<key>=<value>",
)
flags.DEFINE_string("workdir", "runs/sweep", "output directory of the sweep")
flags.DEFINE_list(
  "methods",
  [],
  "methods (default: all of the pipeline's; the language pipeline's "
  "base model is always evaluated)",
)
flags.DEFINE_list(
  "datasets",
  ["medium", "medium-replay", "medium-expert"],
  "control: dataset kinds of --env/--profile (built when missing), or Minari ids",
)
flags.DEFINE_list(
  "dataset_configs",
  [],
  "control: per-dataset config files (configs/control/*.py[:preset]); each adds its dataset, "
  "trained with that file's settings (--datasets then defaults to none)",
)
flags.DEFINE_string("env", "hopper", "control: environment family of dataset kinds")
flags.DEFINE_enum(
  "profile", "small", ["small", "full"], "control: dataset profile of dataset kinds"
)
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "seeds")
flags.DEFINE_integer(
  "seeds_per_group",
  0,
  "control: seeds trained together in one vmapped program "
  "(0: all of a cell's seeds; 1: one by one)",
)
flags.DEFINE_integer("part", 0, "run only this part of the grid (0 .. --parts-1)")
flags.DEFINE_integer(
  "parts",
  1,
  "split the grid into this many parts, one per process (on one host or several sharing "
  "--workdir); the part that finishes last writes the tables",
)
flags.DEFINE_bool("overwrite", False, "replace a sweep in --workdir made with other settings")
flags.DEFINE_bool("dry_run", False, "print what would run and exit")
flags.DEFINE_integer(
  "bootstrap_seed", 0, "seed of the stratified bootstrap of the aggregate CIs (IQM, improvement)"
)


def _seeds(F) -> list[int]:
  try:
    seeds = [int(s) for s in F.seeds]
  except ValueError:
    raise UserError(f"--seeds must be integers, got {','.join(map(str, F.seeds))}") from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise UserError(f"--seeds must be distinct and at least one, got {seeds}")
  return seeds


def control_grid(F, cfg, seeds):
  from iwsft import datasets as ds  # the control extra only when its grid runs
  from iwsft.control.grid import ControlGrid

  if F.seeds_per_group < 0:
    raise UserError("--seeds_per_group must be >= 0")
  configs = {}
  for spec in F.dataset_configs:
    c = control_config.load_file(spec)
    if c.get("pipeline") != "control":
      raise UserError(f"--dataset_configs: {spec} is not a control config")
    configs[c.dataset] = c
  datasets = F.datasets if F["datasets"].present or not configs else []
  kinds = [d for d in datasets if "/" not in d]
  if kinds and F.env not in ds.ENVS:
    raise UserError(f"--env must be one of {', '.join(ds.ENVS)}")
  bad = [k for k in kinds if k not in ds.KINDS]
  if bad:
    raise UserError(
      f"--datasets: unknown kinds {bad}; choose from {', '.join(ds.KINDS)} or give Minari ids"
    )
  ids = [d if "/" in d else ds.dataset_id(F.env, F.profile, d) for d in datasets]
  return ControlGrid(
    cfg,
    F.methods or control_config.METHODS,
    ids,
    seeds,
    F.seeds_per_group,
    (F.env, F.profile, kinds) if kinds else None,
    configs,
  )


def main(argv):
  cli.no_arguments(argv)
  F = flags.FLAGS
  cfg, seeds = F.config, _seeds(F)
  if cfg.pipeline == "control":
    grid = control_grid(F, cfg, seeds)
  else:
    from iwsft.lm.grid import LMGrid  # the lm extra only when its grid runs

    grid = LMGrid(cfg, F.methods, seeds)
  overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
  config = os.path.relpath(config_flags.get_config_filename(F["config"]))
  sweep.run_sweep(
    grid,
    F.workdir,
    F.overwrite,
    F.dry_run,
    F.bootstrap_seed,
    header=f"{cfg.pipeline} sweep, {' '.join([config, *overrides])}",
    part=(F.part, F.parts),
  )


if __name__ == "__main__":
  cli.run(main)
