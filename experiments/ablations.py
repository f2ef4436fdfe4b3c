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
--family=curation asks instead whether importance weighting does more than sharper curation
would: the unweighted methods with their curation sharpened, each paired with its recipe, beside
the weighted methods at the recipe and π_ref trained on as long (bc_continued):
  filter           filtered BC on one --percentiles threshold (the recipe: 90/95/98 stratified)
  quality β        SFT(Q) at --betas, and sampling ∝ the normalised return (quality_mode=linear)
  batch            each method at a fine-tuning batch of --batch (weights self-normalised over
                   more episodes), the weighted ones paired with their unweighted counterpart
--family=length asks whether weighting matters more as θ moves away from π_ref: iw-SFT against
filtered BC and iw-SFT(Q) against SFT(Q) at --lengths times the recipe's fine-tuning steps, with
each run's final mean log θ/π_ref over the curated episodes (how far it moved), and the trend: each
seed's slope of the weights' gain on log10(length), averaged over seeds with a t-interval.
--weighted=iw_sft (or iw_sft_q) runs one of the two pairs only.
The variants are the columns of a control grid run by the sweep engine (iwsft/sweep.py: settings
validated before anything is written, finished cells skipped, unfinished ones resumed). All runs
share one π_ref per seed (trained once) and train their seeds together (vmapped), so --parts has one
piece to deal out: to use two processes, run pieces of the ablation (--weighted, --lengths) in
workdirs of their own, each training the same π_ref, and join their tables with
`experiments/report.py --ablation --dir=OUT --merge=DIR,DIR`. Per seed, a variant and filtered BC
differ only in the weighting, so the ablation table gives the paired difference (variant − filtered
BC, per seed) with its 95% Student-t CI next to each score, and the weights' diagnostics averaged
over fine-tuning (effective sample size as a fraction of the batch, largest weight, fraction
clipped, mean log q/π_ref per step). Writes to --workdir: table.md (the sweep engine's tables, then
the ablation's), ablations.csv, ablations.png, length.png where a method ran at two
lengths or more (score, paired difference and log θ/π_ref at the end against the length), the
engine's table.csv, cells.csv and paired.csv, and the cells (iwsft/control/grid.py's layout).
"""

from absl import flags

from iwsft import sweep
from iwsft.control import ablation_tables, config
from iwsft.control.grid import ControlGrid, Variant
from iwsft.io import cli, report

BASELINE = config.UNWEIGHTED  # each weighted method and the method it is without the weights

cli.define_config(
  cli.config_file(config) + ":cpu",
  "the recipe: a control config file[:preset]; override values with --config.<key>=<value>",
)
flags.DEFINE_string("workdir", "runs/ablations", "output directory")
flags.DEFINE_string("dataset", "iwsft/hopper-small/medium-replay-v1", "a mixed dataset (Minari id)")
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "seeds, trained together")
flags.DEFINE_list("temperatures", ["1", "3", "10", "30"], "iw-SFT temperatures")
flags.DEFINE_list("q_decays", ["0", "0.9", "0.99"], "iw-SFT q decays")
flags.DEFINE_integer("long", 5, "the long fine-tuning is this many times the recipe's steps")
flags.DEFINE_enum("family", "weighting", ["weighting", "curation", "length"], "which ablations")
flags.DEFINE_list(
  "lengths", ["1", "2", "5", "10"], "length family: multiples of the recipe's steps"
)
flags.DEFINE_list(
  "weighted",
  list(BASELINE),
  "length family: the weighted methods, each beside its unweighted counterpart",
)
flags.register_validator(
  "weighted",
  lambda ms: bool(ms) and set(ms) <= set(BASELINE),
  f"--weighted takes some of {', '.join(BASELINE)}",
)
flags.DEFINE_list("percentiles", ["95", "97.5", "99"], "curation family: filter thresholds")
flags.DEFINE_list("betas", ["0.05", "0.03", "0.02"], "curation family: SFT(Q) temperatures")
flags.DEFINE_integer("batch", 32, "curation family: the larger fine-tuning batch")
flags.DEFINE_enum(
  "method", "iw_sft", list(BASELINE), "the weighted method whose settings are ablated"
)
flags.DEFINE_integer("part", 0, "run only this part of the grid (see experiments/sweep.py)")
flags.DEFINE_integer("parts", 1, "split the grid into this many parts, one per process")
flags.DEFINE_bool("overwrite", False, "replace runs in --workdir made with other settings")


def variants(cfg, temperatures, q_decays, long: int, method: str = "iw_sft") -> dict:
  """{name: Variant} of every run, baselines first; every variant is `method` (iw_sft or
  iw_sft_q) with one setting moved, paired with BASELINE[method] at the same length."""
  steps = cfg.finetune.steps
  base_t, base_q = float(cfg.objective.temperature), float(cfg.objective.q_decay)
  base, base_long = BASELINE[method], f"{BASELINE[method]} x{long}"
  longer = {"finetune.steps": long * steps}
  warm = _warm(cfg)
  out = {
    "bc": Variant("bc", ablates="π_ref"),
    base: Variant(base, warm, ablates="baseline"),
    base_long: Variant(base, longer, ablates="baseline"),
    f"{method} (T={base_t:g}, q={base_q:g})": Variant(method, warm, base, "recipe"),
  }
  for t in temperatures:
    if t != base_t:
      out[f"{method} T={t:g}"] = Variant(
        method, {**warm, "objective.temperature": t}, base, "temperature"
      )
  for q in q_decays:
    if q != base_q:
      out[f"{method} q={q:g}"] = Variant(method, {**warm, "objective.q_decay": q}, base, "q_decay")
  out[f"{method} x{long}"] = Variant(method, longer, base_long, ablation_tables.LONGER)
  return out


def _warm(cfg) -> dict:
  """A warm-up the recipe's length leaves room for (its own, or a tenth of the steps)."""
  steps = cfg.finetune.steps
  return {"finetune.warmup_steps": steps // 10} if cfg.finetune.warmup_steps >= steps else {}


def length_variants(cfg, lengths, weighted=tuple(BASELINE)) -> dict:
  """{name: Variant}: the length family (module docstring), each of the `weighted` methods and
  its unweighted counterpart at every multiple of the recipe's fine-tuning steps."""
  out, warm = {"bc": Variant("bc", ablates="π_ref")}, _warm(cfg)
  for k in lengths:
    tag, longer = (
      ("", warm) if k == 1 else (f" x{k:g}", {"finetune.steps": int(k * cfg.finetune.steps)})
    )
    for m in weighted:
      out[BASELINE[m] + tag] = Variant(BASELINE[m], longer, ablates="baseline")
      out[m + tag] = Variant(m, longer, BASELINE[m] + tag, ablation_tables.length_label(k))
  return out


def curation_variants(cfg, percentiles, betas, batch: int) -> dict:
  """{name: Variant}: the curation family (module docstring), baselines first."""
  warm, beta = _warm(cfg), float(cfg.curation.quality_beta)
  sft_q = f"sft_q beta={beta:g}"
  out = {
    "bc": Variant("bc", ablates="π_ref"),
    "bc_continued": Variant("bc_continued", warm, ablates="more training"),
    "filtered_bc": Variant("filtered_bc", warm, ablates="baseline"),
    sft_q: Variant("sft_q", warm, ablates="baseline"),
    "iw_sft": Variant("iw_sft", warm, "filtered_bc", "weighting"),
    f"iw_sft_q beta={beta:g}": Variant("iw_sft_q", warm, sft_q, "weighting"),
  }
  for p in percentiles:
    out[f"filtered_bc p{p:g}"] = Variant(
      "filtered_bc", {**warm, "curation.percentiles": (p,)}, "filtered_bc", "filter"
    )
  for b in betas:
    if b != beta:
      out[f"sft_q beta={b:g}"] = Variant(
        "sft_q", {**warm, "curation.quality_beta": b}, sft_q, "quality β"
      )
  out["sft_q linear"] = Variant(
    "sft_q", {**warm, "curation.quality_mode": "linear"}, sft_q, "quality β"
  )
  big = {**warm, "finetune.batch_size": batch}
  for m in ("filtered_bc", "sft_q", "iw_sft", "iw_sft_q"):
    base = f"{BASELINE[m]} b{batch}" if m in BASELINE else ""
    out[f"{m} b{batch}"] = Variant(m, big, base, "batch")
  return out


class AblationGrid(ControlGrid):
  """One dataset's variants; its extra table is the ablation table (ablations.csv, .png)."""

  def extra_tables(self, recs: list[sweep.CellRecord], workdir: str) -> tuple[str, list[str]]:
    return ablation_tables.write(ablation_rows(self, recs), workdir, self.datasets[0])


def ablation_rows(grid: ControlGrid, recs: list[sweep.CellRecord]) -> list[dict]:
  """One row per variant (iwsft.control.ablation_tables.rows): its score, the paired difference
  to its baseline, the weights' diagnostics (per seed averaged over fine-tuning, then over
  seeds)."""
  steps = grid.cfg.finetune.steps
  runs = {
    name: {
      "method": v.method,
      "ablates": v.ablates,
      "baseline": v.baseline,
      "length": None
      if v.method == "bc"
      else dict(v.overrides).get("finetune.steps", steps) / steps,
    }
    for name, v in grid.variants.items()
  }
  weights = {
    name: report.mean_diagnostics([r.weights for r in recs if r.method == name])
    for name, v in grid.variants.items()
    if v.method in config.WEIGHTED
  }
  return ablation_tables.rows(sweep.score_rows(recs), runs, weights)


def main(argv):
  cli.no_arguments(argv)
  F = flags.FLAGS
  try:
    seeds = [int(s) for s in F.seeds]
    floats = lambda xs: [float(x) for x in xs]
    if F.family == "curation":
      todo = curation_variants(F.config, floats(F.percentiles), floats(F.betas), F.batch)
      header = f"curation sharpness against importance weighting on {F.dataset}"
    elif F.family == "length":
      todo = length_variants(F.config, floats(F.lengths), F.weighted)
      header = f"importance weighting against fine-tuning length on {F.dataset}"
    else:
      todo = variants(F.config, floats(F.temperatures), floats(F.q_decays), F.long, F.method)
      header = f"{F.method} ablations on {F.dataset}"
  except ValueError as e:
    cli.fail(f"seeds, percentiles, betas, temperatures and q decays must be numbers: {e}")
  grid = AblationGrid(F.config, todo, [F.dataset], seeds, seeds_per_group=0)
  sweep.run_sweep(grid, F.workdir, F.overwrite, header=header, part=(F.part, F.parts))


if __name__ == "__main__":
  cli.run(main)
