"""The README's main job: build the small datasets if missing (for Hopper: train SAC behaviour
policies first), then train BC (= π_ref), filtered BC and iw-SFT on the medium-replay dataset,
evaluate them, print a table and save a plot.

  python experiments/demo.py --workdir=runs/demo [--env=pendulum]

Settings are the `cpu` preset of iwsft/control/config.py, scaled for a 2-core CPU (a few minutes);
the authors' GPU recipe is the default of experiments/control.py. All three methods share one π_ref,
trained once.
"""

import os

from absl import flags

from iwsft.control import datasets
from iwsft.control.config import get_config
from iwsft.control.pipeline import run_control
from iwsft.io import cli, plots
from iwsft.io.report import format_table

flags.DEFINE_string("workdir", "runs/demo", "output directory (one sub-directory per method)")
flags.DEFINE_enum("env", "hopper", list(datasets.ENVS), "environment family (its small profile)")
flags.DEFINE_string("kind", "medium-replay", "dataset kind to train on")
flags.DEFINE_list("methods", ["bc", "filtered_bc", "iw_sft"], "methods to compare")
flags.DEFINE_integer("seed", 0, "seed of every run")
flags.DEFINE_bool("overwrite", False, "replace finished runs in --workdir")


def main(argv):
  cli.no_arguments(argv)
  F = flags.FLAGS
  rows = datasets.build(F.env, "small", [F.kind], seed=0, force=False)
  print(datasets.table(rows))
  dataset = rows[0]["dataset"]
  workdir = os.path.abspath(F.workdir)
  results = []
  for method in F.methods:
    cfg = get_config("cpu")
    cfg.update(dataset=dataset, method=method, seed=F.seed)
    results.append(
      run_control(
        cfg,
        os.path.join(workdir, method),
        F.overwrite,
        reference_dir=os.path.join(workdir, "reference"),
      )
    )
  table = format_table(
    ["method", "normalised score", "return", "wall time (s)"],
    [
      [
        r["method"],
        f"{r['normalised_score']:.1f} ± {r['normalised_score_std']:.1f}",
        f"{r['return_mean']:.1f} ± {r['return_std']:.1f}",
        f"{r['wall_time_s']:.0f}",
      ]
      for r in results
    ],
  )
  text = (
    f"{dataset}, seed {F.seed}, final evaluation over {results[0]['eval_episodes']} "
    f"episodes:\n{table}"
  )
  print("\n" + text)
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(text + "\n")
  plots.score_bars(
    [r["method"] for r in results],
    [r["normalised_score"] for r in results],
    [r["normalised_score_std"] for r in results],
    os.path.join(workdir, "scores.png"),
    "normalised score ×100",
    f"{dataset} (seed {F.seed}; mean ± std over episodes)",
  )
  print(
    f"table: {workdir}/table.md  plot: {workdir}/scores.png  curves: {workdir}/<method>/curve.png"
  )


if __name__ == "__main__":
  cli.run(main)
