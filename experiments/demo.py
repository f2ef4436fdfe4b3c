"""The README's main job: BC (= π_ref), filtered BC and iw-SFT on the small Hopper medium-expert
dataset (medium and expert episodes mixed: something to curate), three seeds trained together
(vmapped), then a table of the score's mean ± std over seeds with a 95% Student-t CI of the mean,
a bar plot and a video of each final policy.

  python experiments/demo.py --workdir=runs/demo [--kind=medium-replay] [--seeds=0,1,2]

The small Hopper family ships with the project (iwsft/datasets/shipped), so every machine
trains on the same episodes; other families are built first when missing. Settings are the `cpu`
preset of iwsft/control/config.py (a 2-core CPU's scale), overridable as --config.<key>=<value>;
the authors' GPU recipe is the default of experiments/control.py. All methods share one π_ref per
seed, trained once.
"""

import os
import shutil

from absl import flags

from iwsft import datasets
from iwsft.control import config
from iwsft.control.pipeline import run_control_seeds
from iwsft.core.config import with_overrides
from iwsft.io import cli, plots, report

cli.define_config(
  cli.config_file(config) + ":cpu",
  "the recipe: a control config file[:preset]; override values with --config.<key>=<value>",
)
flags.DEFINE_string("workdir", "runs/demo", "output directory (one sub-directory per method)")
flags.DEFINE_enum("env", "hopper", list(datasets.ENVS), "environment family (its small profile)")
flags.DEFINE_string("kind", "medium-expert", "dataset kind to train on")
flags.DEFINE_list("methods", ["bc", "filtered_bc", "iw_sft"], "methods to compare")
flags.DEFINE_list("seeds", ["0", "1", "2"], "seeds, trained together")
flags.DEFINE_integer("video_episodes", 1, "final-policy episodes recorded per seed (video.gif)")
flags.DEFINE_bool("overwrite", False, "replace finished runs in --workdir")


def summary_table(results: dict[str, list[dict]]) -> tuple[str, list[dict]]:
  """{method: per-seed results} -> (Markdown table, report.summarise rows) of normalised scores."""
  records = [
    {"dataset": r["dataset"], "method": m, "seed": r["seed"], "score": r["normalised_score"]}
    for m, rs in results.items()
    for r in rs
  ]
  summary = report.summarise(records)
  returns = {m: [r["return_mean"] for r in rs] for m, rs in results.items()}
  rows = [
    [
      s["method"],
      report.cell_text(s),
      " / ".join(f"{r['normalised_score']:.1f}" for r in results[s["method"]]),
      f"{sum(returns[s['method']]) / len(returns[s['method']]):.1f}",
    ]
    for s in summary
  ]
  head = ["method", "score: mean ± std [95% CI]", "per seed", "mean return"]
  return report.format_table(head, rows), summary


def paired_table(results: dict) -> str:
  """Each curated method minus BC, and iw-SFT minus filtered BC, paired by seed ("" if none)."""
  records = [
    {"dataset": "score", "method": m, "seed": r["seed"], "score": r["normalised_score"]}
    for m, rs in results.items()
    for r in rs
  ]
  pairs = [(m, "bc") for m in results if m != "bc" and "bc" in results]
  if "iw_sft" in results and "filtered_bc" in results:
    pairs.append(("iw_sft", "filtered_bc"))
  rows = []
  for method, base in pairs:
    for row in report.paired_differences(records, {method: base}):
      cell = f"{row['mean']:+.1f} [{row['ci_low']:+.1f}, {row['ci_high']:+.1f}]"
      per_seed = " / ".join(f"{x:+.1f}" for x in row["per_seed"])
      rows.append([f"{method} − {base}", cell, per_seed])
  return report.format_table(["difference", "mean [95% CI]", "per seed"], rows) if rows else ""


def main(argv):
  cli.no_arguments(argv)
  F = flags.FLAGS
  seeds = [int(s) for s in F.seeds]
  rows = datasets.build(F.env, "small", [F.kind], seed=0, force=False)
  print(datasets.table(rows))
  dataset = rows[0]["dataset"]
  workdir = os.path.abspath(F.workdir)
  if F.overwrite:  # the methods' shared π_ref goes too (it may be of another dataset or recipe)
    shutil.rmtree(os.path.join(workdir, "reference"), ignore_errors=True)
  results = {}
  for method in F.methods:
    overrides = {"dataset": dataset, "method": method, "eval.video_episodes": F.video_episodes}
    cfg = with_overrides(F.config, overrides)
    results[method] = run_control_seeds(
      cfg,
      seeds,
      os.path.join(workdir, method),
      F.overwrite,
      reference_dir=os.path.join(workdir, "reference"),
    )
  table, summary = summary_table(results)
  first = next(iter(results.values()))[0]
  text = (
    f"{dataset}, seeds {', '.join(map(str, seeds))} (trained together), normalised score x100 of "
    f"the final evaluation over {first['eval_episodes']} episodes per seed:\n{table}"
  )
  paired = paired_table(results)
  if paired:
    text += (
      f"\n\nPaired by seed (same π_ref, same random stream), mean [95% Student-t CI]:\n{paired}"
    )
  print("\n" + text)
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(text + "\n")
  plots.score_bars(
    [s["method"] for s in summary],
    [s["mean"] for s in summary],
    [(s["mean"] - s["ci_low"], s["ci_high"] - s["mean"]) for s in summary],
    os.path.join(workdir, "scores.png"),
    "normalised score ×100",
    f"{dataset}\nmean over seeds {', '.join(map(str, seeds))}, 95% Student-t CI",
    points=[[r["normalised_score"] for r in results[s["method"]]] for s in summary],
  )
  print(
    f"table: {workdir}/table.md  plot: {workdir}/scores.png  "
    f"curves and videos: {workdir}/<method>/seed_<s>/{{curve.png,video.gif}}"
  )


if __name__ == "__main__":
  cli.run(main)
