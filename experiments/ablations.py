"""Ablations of iw-SFT on one mixed dataset: does importance weighting change the result over
filtered BC, and when?

  python experiments/ablations.py --workdir=runs/ablations [--dataset=ID] [--seeds=0,1,2,3,4]

Every variant is iw-SFT with one setting moved from the recipe (--config, default the `cpu`
preset), compared with filtered BC of the same fine-tuning length, which trains on the same curated
episodes from the same π_ref (--method=iw_sft_q: iw-SFT(Q) against SFT(Q), its unweighted
counterpart on the same quality-sampled episodes):
  temperature      1, 3, 10 (the recipe), 30
  q_decay          0 (q is the current policy, detached), 0.9 (the recipe), 0.99
  fine-tuning      the recipe's steps, and --long times as many (iw-SFT and filtered BC)
All runs share one π_ref per seed (trained once) and train their seeds together (vmapped). Per
seed, a variant and filtered BC differ only in the weighting, so the table gives the paired
difference (variant − filtered BC, per seed) with its 95% Student-t CI next to each score, and
the weights' diagnostics averaged over fine-tuning (effective sample size as a fraction of the
batch, largest weight, fraction clipped, mean log q/π_ref per step). Rerunning skips finished runs.
Writes to --workdir: table.md, table.csv, ablations.png, and one run directory per variant.
"""

import os

from absl import flags

from iwsft.control import config
from iwsft.control.pipeline import run_control_seeds
from iwsft.core.config import with_overrides
from iwsft.io import cli, plots, report
from iwsft.io import workdir as workdir_lib

BASELINE = config.UNWEIGHTED  # each weighted method and the method it is without the weights

cli.define_config(
  cli.config_file(config) + ":cpu",
  "the recipe: a control config file[:preset]; override values with --config.<key>=<value>",
)
flags.DEFINE_string("workdir", "runs/ablations", "output directory (one sub-directory per run)")
flags.DEFINE_string("dataset", "iwsft/hopper-small/medium-replay-v1", "a mixed dataset (Minari id)")
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "seeds, trained together")
flags.DEFINE_list("temperatures", ["1", "3", "10", "30"], "iw-SFT temperatures")
flags.DEFINE_list("q_decays", ["0", "0.9", "0.99"], "iw-SFT q decays")
flags.DEFINE_integer("long", 5, "the long fine-tuning is this many times the recipe's steps")
flags.DEFINE_enum(
  "method", "iw_sft", list(BASELINE), "the weighted method whose settings are ablated"
)


def variants(
  cfg, temperatures, q_decays, long: int, method: str = "iw_sft"
) -> list[tuple[str, str, str, dict]]:
  """(name, ablated setting, baseline name, config overrides) of every run, baselines first;
  every variant is `method` (iw_sft or iw_sft_q), paired with BASELINE[method]."""
  steps = cfg.finetune.steps
  base_t, base_q = float(cfg.objective.temperature), float(cfg.objective.q_decay)
  base, base_long = BASELINE[method], f"{BASELINE[method]} x{long}"
  out = [
    ("bc", "π_ref", "", {"method": "bc"}),
    (base, "baseline", "", {"method": base}),
    (base_long, "baseline", "", {"method": base, "finetune.steps": long * steps}),
    (f"{method} (T={base_t:g}, q={base_q:g})", "recipe", base, {}),
  ]
  for t in temperatures:
    if t != base_t:
      out.append((f"{method} T={t:g}", "temperature", base, {"objective.temperature": t}))
  for q in q_decays:
    if q != base_q:
      out.append((f"{method} q={q:g}", "q_decay", base, {"objective.q_decay": q}))
  out.append(
    (f"{method} x{long}", "fine-tuning length", base_long, {"finetune.steps": long * steps})
  )
  return out


def _configure(cfg, dataset: str, method: str, overrides: dict):
  cfg = with_overrides(cfg, {"dataset": dataset, "method": method, **overrides})
  if cfg.finetune.warmup_steps >= cfg.finetune.steps:
    cfg.finetune.warmup_steps = cfg.finetune.steps // 10
  return cfg


def diagnostics(run_dir: str, seed: int, stage: str) -> dict[str, float]:
  """The weight diagnostics of one seed's fine-tuning, averaged over its train rows."""
  rows = workdir_lib.read_rows(os.path.join(run_dir, f"seed_{seed}", "metrics.jsonl"))
  return report.weight_diagnostics(rows, stage)


def _slug(name: str) -> str:
  return "".join(c if c.isalnum() or c in "=._" else "_" for c in name).strip("_")


def summarise(runs: dict[str, tuple[str, str, list[dict], list[dict]]]) -> list[dict]:
  """One row per run: report.summarise's score mean/std/CI, the paired difference to its
  baseline, the diagnostics."""
  records = [
    {"dataset": r["dataset"], "method": name, "seed": r["seed"], "score": r["normalised_score"]}
    for name, (_, _, results, _) in runs.items()
    for r in results
  ]
  summary = {s["method"]: s for s in report.summarise(records)}
  pairs = {name: base for name, (_, base, _, _) in runs.items() if base}
  paired = {p["method"]: p for p in report.paired_differences(records, pairs)}
  rows = []
  for name, (what, base, results, diags) in runs.items():
    scores = {r["seed"]: r["normalised_score"] for r in results}
    row = {"run": name, "ablates": what, **summary[name]}
    row["per_seed"] = [float(scores[s]) for s in row["seeds"]]  # unrounded: paired reprints
    if base:
      p = paired[name]
      row.update(baseline=base, diff=p["mean"], diff_low=p["ci_low"], diff_high=p["ci_high"])
    rows.append({**row, **report.mean_diagnostics(diags)})
  return rows


def table(rows: list[dict], baseline: str = "filtered_bc") -> str:
  body = [
    [
      r["run"],
      r["ablates"],
      report.cell_text(r),
      " / ".join(f"{s:.1f}" for s in r["per_seed"]),
      f"{r['diff']:+.1f} [{r['diff_low']:+.1f}, {r['diff_high']:+.1f}]" if "diff" in r else "–",
      *report.diagnostics_text(r),
    ]
    for r in rows
  ]
  head = [
    "run",
    "ablates",
    "score: mean ± std [95% CI]",
    "per seed",
    f"− {baseline}, paired [95% CI]",
    *report.DIAGNOSTICS_HEADER,
  ]
  return report.format_table(head, body)


def main(argv):
  cli.no_arguments(argv)
  F = flags.FLAGS
  seeds = [int(s) for s in F.seeds]
  workdir = os.path.abspath(F.workdir)
  todo = variants(
    F.config, [float(t) for t in F.temperatures], [float(q) for q in F.q_decays], F.long, F.method
  )
  runs = {}
  for name, what, base, overrides in todo:
    cfg = _configure(F.config, F.dataset, F.method, overrides)
    run_dir = os.path.join(workdir, _slug(name))
    results = run_control_seeds(
      cfg, seeds, run_dir, reference_dir=os.path.join(workdir, "reference")
    )
    weighted = cfg.method in config.WEIGHTED
    diags = [diagnostics(run_dir, s, cfg.method) for s in seeds] if weighted else []
    runs[name] = (what, base, results, diags)
  rows = summarise(runs)
  first = next(iter(runs.values()))[2][0]
  text = (
    f"{F.dataset}, seeds {', '.join(map(str, seeds))} (trained together, one π_ref per seed), "
    f"normalised score x100 of the final evaluation over {first['eval_episodes']} episodes per "
    f"seed; weight diagnostics averaged over fine-tuning:\n{table(rows, BASELINE[F.method])}"
  )
  print("\n" + text)
  with open(os.path.join(workdir, "table.md"), "w") as f:
    f.write(text + "\n")
  fields = ["run", "ablates", "mean", "std", "ci_low", "ci_high", "per_seed", "baseline", "diff"]
  report.write_csv(
    os.path.join(workdir, "table.csv"),
    rows,
    fields + ["diff_low", "diff_high", *report.WEIGHT_DIAGNOSTICS],
  )
  plots.score_bars(
    [r["run"] for r in rows],
    [r["mean"] for r in rows],
    [(r["mean"] - r["ci_low"], r["ci_high"] - r["mean"]) for r in rows],
    os.path.join(workdir, "ablations.png"),
    "normalised score ×100",
    f"{F.dataset}: {F.method} ablations\nmean over seeds, 95% Student-t CI",
    points=[r["per_seed"] for r in rows],
  )
  print(f"table: {workdir}/table.md  plot: {workdir}/ablations.png")


if __name__ == "__main__":
  cli.run(main)
