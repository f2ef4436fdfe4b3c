"""The README's main job: build the small datasets if missing (for Hopper: train SAC behaviour
policies first), then train BC (= π_ref), filtered BC and iw-SFT on the medium-replay dataset,
evaluate them, print a table and save a plot.

  python experiments/demo.py --workdir=runs/demo [--env=pendulum]

Settings are scaled for a 2-core CPU (a few minutes); the authors' GPU recipe is the default of
experiments/control.py. All three methods share one π_ref, trained once.
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from absl import flags  # noqa: E402

from iwsft import cli  # noqa: E402
from iwsft.control import datasets  # noqa: E402
from iwsft.control.config import get_cpu_config  # noqa: E402
from iwsft.control.run import run_control  # noqa: E402

flags.DEFINE_string("workdir", "runs/demo", "output directory (one sub-directory per method)")
flags.DEFINE_enum("env", "hopper", list(datasets.ENVS), "environment family (its small profile)")
flags.DEFINE_string("kind", "medium-replay", "dataset kind to train on")
flags.DEFINE_list("methods", ["bc", "filtered_bc", "iw_sft"], "methods to compare")
flags.DEFINE_integer("seed", 0, "seed of every run")
flags.DEFINE_bool("overwrite", False, "replace finished runs in --workdir")



def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  F = flags.FLAGS
  rows = datasets.build(F.env, "small", [F.kind], seed=0, force=False)
  print(datasets.table(rows))
  dataset = rows[0]["dataset"]
  workdir = os.path.abspath(F.workdir)
  results = []
  for method in F.methods:
    cfg = get_cpu_config()
    cfg.update(dataset=dataset, method=method, seed=F.seed)
    results.append(run_control(cfg, os.path.join(workdir, method), F.overwrite,
                               reference_dir=os.path.join(workdir, "reference")))
  lines = [f"\n{dataset}, seed {F.seed}, final evaluation over {results[0]['eval_episodes']} episodes:",
           "| method | normalised score | return | wall time (s) |", "|---|---|---|---|"]
  for r in results:
    lines.append(f"| {r['method']} | {r['normalised_score']:.1f} ± {r['normalised_score_std']:.1f} | "
                 f"{r['return_mean']:.1f} ± {r['return_std']:.1f} | {r['wall_time_s']:.0f} |")
  text = "\n".join(lines)
  print(text)
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(text.strip() + "\n")
  fig, ax = plt.subplots(figsize=(5, 3.5))
  names = [r["method"] for r in results]
  ax.bar(names, [r["normalised_score"] for r in results],
         yerr=[r["normalised_score_std"] for r in results], capsize=4, color="C0")
  ax.set(ylabel="normalised score ×100 (mean ± std over episodes)", title=f"{dataset} (seed {F.seed})")
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "scores.png"), dpi=120)
  print(f"table: {workdir}/table.md  plot: {workdir}/scores.png  curves: {workdir}/<method>/curve.png")


if __name__ == "__main__":
  cli.run(main)
