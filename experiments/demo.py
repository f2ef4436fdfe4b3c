"""The README's main job: BC (= π_ref), filtered BC and iw-SFT on the small Hopper medium-expert
dataset (medium and expert episodes mixed: something to curate), three seeds trained together
(vmapped), then a table of the score's mean ± std over seeds with a 95% Student-t CI of the mean,
a bar plot and a video of each final policy.

  python experiments/demo.py --workdir=runs/demo [--kind=medium-replay] [--seeds=0,1,2]

The small Hopper family ships with the project (iwsft/datasets/shipped), so every machine
trains on the same episodes; other families are built first when missing. Settings are the `cpu`
preset of iwsft/control/config.py (a 2-core CPU's scale), overridable as --config.<key>=<value>;
the authors' GPU recipe is the default of experiments/control.py. All methods share one π_ref per
seed, trained once. The methods are a control grid run by the sweep engine (iwsft/sweep.py), so a
rerun reprints a finished demo and resumes an interrupted one; --overwrite trains it anew.
Writes to --workdir: table.md, scores.png, the engine's table.csv, cells.csv and curves.png, and
per method and seed <dataset>/<method>/group_<seeds>/seed_<s>/ (metrics.jsonl, curve.png,
video.gif, policy/).
"""

import os
import shutil

from absl import flags

from iwsft import datasets, sweep
from iwsft.control import config
from iwsft.control.grid import ControlGrid
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
flags.DEFINE_bool("overwrite", False, "train anew, replacing finished runs in --workdir")


def summary_table(records: list[sweep.CellRecord]) -> tuple[str, list[dict]]:
  """The grid's records (one dataset) -> (Markdown table, report.summarise rows) of normalised
  scores, with each method's per-seed scores and mean return."""
  summary = report.summarise(sweep.score_rows(records))
  of = lambda m: sorted((r for r in records if r.method == m), key=lambda r: r.seed)
  rows = [
    [
      s["method"],
      report.cell_text(s),
      " / ".join(f"{r.score:.1f}" for r in of(s["method"])),
      f"{sum(r.return_mean for r in of(s['method'])) / s['n']:.1f}",
    ]
    for s in summary
  ]
  head = ["method", "score: mean ± std [95% CI]", "per seed", "mean return"]
  return report.format_table(head, rows), summary


def paired_table(records: list[sweep.CellRecord]) -> str:
  """Each curated method minus BC, and iw-SFT minus filtered BC, paired by seed ("" if none)."""
  methods = list(dict.fromkeys(r.method for r in records))
  pairs = [(m, "bc") for m in methods if m != "bc" and "bc" in methods]
  if "iw_sft" in methods and "filtered_bc" in methods:
    pairs.append(("iw_sft", "filtered_bc"))
  scores, rows = sweep.score_rows(records), []
  for method, base in pairs:
    for row in report.paired_differences(scores, {method: base}):
      cell = f"{row['mean']:+.1f} [{row['ci_low']:+.1f}, {row['ci_high']:+.1f}]"
      per_seed = " / ".join(f"{x:+.1f}" for x in row["per_seed"])
      rows.append([f"{method} − {base}", cell, per_seed])
  return report.format_table(["difference", "mean [95% CI]", "per seed"], rows) if rows else ""


class DemoGrid(ControlGrid):
  """The demo's one dataset; its extra tables are the README's (per-seed scores, differences to
  BC) and the bar plot scores.png."""

  def extra_tables(self, recs: list[sweep.CellRecord], workdir: str) -> tuple[str, list[str]]:
    table, summary = summary_table(recs)
    seeds = ", ".join(map(str, self.seeds))
    text = (
      f"\n{self.datasets[0]}, seeds {seeds} (trained together), normalised score x100 of the final"
      f" evaluation over {self.cfg.eval.final_episodes} episodes per seed:\n\n{table}\n"
    )
    paired = paired_table(recs)
    if paired:
      text += "\nPaired by seed (same π_ref, same random stream), mean [95% Student-t CI]:\n\n"
      text += f"{paired}\n"
    plots.score_bars(
      summary,
      os.path.join(workdir, "scores.png"),
      "normalised score ×100",
      f"{self.datasets[0]}\nmean over seeds {seeds}, 95% Student-t CI",
      points=[[r.score for r in recs if r.method == s["method"]] for s in summary],
    )
    return text, ["scores.png"]


def main(argv):
  cli.no_arguments(argv)
  F = flags.FLAGS
  seeds = [int(s) for s in F.seeds]
  rows = datasets.build(F.env, "small", [F.kind], seed=0, force=False)
  print(datasets.table(rows))
  workdir = os.path.abspath(F.workdir)
  if F.overwrite:  # train anew: the demo is the main job, so --overwrite means a fresh run
    shutil.rmtree(workdir, ignore_errors=True)
  cfg = with_overrides(F.config, {"eval.video_episodes": F.video_episodes})
  grid = DemoGrid(cfg, F.methods, [rows[0]["dataset"]], seeds, seeds_per_group=0)
  sweep.run_sweep(grid, workdir, header=f"the main job on {rows[0]['dataset']}")
  print(
    f"table: {workdir}/table.md  plot: {workdir}/scores.png  curves and videos: "
    f"{workdir}/<dataset>/<method>/group_<seeds>/seed_<s>/{{curve.png,video.gif}}"
  )


if __name__ == "__main__":
  cli.run(main)
