"""The bound claim tested directly: J(θ), the SFT bound and the iw-SFT bound along fine-tuning of
the byte-level LM, whose π_ref is known exactly (iwsft/lm/tightness.py says what is estimated).

  python experiments/bound_vs_j.py --workdir=runs/bound-vs-j --seeds=0,1,2

Each seed runs the language pipeline's reference, sample and curate stages in
<workdir>/seed_<s> (reused when there), then fine-tunes each method from π_ref, stopping at
each of --points (updates) to estimate J(θ) from one sample per --j_prompts held-out prompt and
both bounds from fresh π_ref samples on --bound_prompts others. A finished (seed, method) is kept in
seed_<s>/bounds_<method>.json and reused. Writes <workdir>/bounds.csv, table.md and bounds.png.
Settings: --config (default iwsft/lm/config.py, the tiny preset) with --config.<key>=<value>.
"""

import json
import os

import numpy as np
from absl import flags

from iwsft.core.config import with_overrides
from iwsft.io import cli, plots
from iwsft.io.report import curve_band, format_table, t_interval, write_csv
from iwsft.lm import config, tightness
from iwsft.lm.pipeline import prepare, run_lm

cli.define_config(cli.config_file(config), "language-pipeline settings (the tiny preset)")
flags.DEFINE_string("workdir", "runs/bound-vs-j", "output directory")
flags.DEFINE_list("seeds", ["0"], "seeds, each run in <workdir>/seed_<s>")
flags.DEFINE_list("methods", ["sft", "iw_sft"], "fine-tuning methods traced")
flags.DEFINE_list(
  "points", ["0", "5", "10", "20", "30", "50", "100", "200", "400"], "updates at which to evaluate"
)
flags.DEFINE_integer("bound_prompts", 2000, "held-out prompts with one π_ref sample each (bounds)")
flags.DEFINE_integer("j_prompts", 1000, "held-out prompts with one π_θ sample each (J)")

QUANTITIES = ("J", "bound_sft", "bound_iw", "is_estimate", "iw_minus_sft", "kl_ref_theta")
GAPS = {"J_minus_sft": "bound_sft", "J_minus_iw": "bound_iw"}  # how loose each bound is


def _with_gaps(row: dict) -> dict:
  """J − each bound; J and the bounds come from independent samples, so their s.e. add in
  quadrature."""
  out = dict(row)
  for gap, bound in GAPS.items():
    out[gap] = row["J"] - row[bound]
    out[f"{gap}_se"] = float(np.hypot(row["J_se"], row[f"{bound}_se"]))
  return out


def _seed_rows(seed: int) -> list[dict]:
  F = flags.FLAGS
  cfg = with_overrides(F.config, {"seed": seed, "stages": ("reference", "sample", "curate")})
  wd = os.path.join(F.workdir, f"seed_{seed}")
  print(f"== seed {seed}")
  run_lm(cfg, wd)
  ctx, probe, rows = None, None, []
  for method in F.methods:
    path = os.path.join(wd, f"bounds_{method}.json")
    if not os.path.exists(path):
      if ctx is None:
        ctx = prepare(cfg, wd)
        probe = tightness.make_probe(ctx, ctx.load("reference"), F.bound_prompts, F.j_prompts, seed)
      trace = tightness.trace(ctx, method, probe, [int(p) for p in F.points], seed)
      with open(path, "w") as f:
        json.dump(trace, f, indent=1)
    rows += [_with_gaps({"seed": seed, **r}) for r in json.load(open(path))]
  return rows


def _panels(rows: list[dict], methods: list[str]) -> dict:
  """Per method: J and both bounds over steps, with t-intervals over seeds (±1.96 s.e. for one)."""
  panels = {}
  for m in methods:
    series = {}
    for key, label in (("J", "J(θ) sampled"), ("bound_sft", "SFT bound"), ("bound_iw", "iw bound")):
      seeds = sorted({r["seed"] for r in rows if r["method"] == m})
      curves = [
        ([r["step"] for r in rows if r["method"] == m and r["seed"] == s],
         [r[key] for r in rows if r["method"] == m and r["seed"] == s])
        for s in seeds
      ]  # fmt: skip
      if len(seeds) > 1:
        series[label] = curve_band(curves)
      else:
        own = [r for r in rows if r["method"] == m]
        x, y = np.array(curves[0][0]), np.array(curves[0][1])
        se = np.array([r[f"{key}_se"] for r in own])
        series[label] = (x, y, y - 1.96 * se, y + 1.96 * se)
    panels[f"trained by {m}"] = series
  return panels


def _table(rows: list[dict], methods: list[str]) -> str:
  """At each method's last step: every quantity's mean over seeds with its t-interval (a single
  seed: ± 1.96 s.e. over samples)."""
  out = []
  for m in methods:
    last = max(r["step"] for r in rows if r["method"] == m)
    at = [r for r in rows if r["method"] == m and r["step"] == last]
    cells = []
    for q in (*QUANTITIES, *GAPS):
      v = np.array([r[q] for r in at])
      if len(v) > 1:
        lo, hi = t_interval(v)
      else:
        se = at[0][f"{q}_se"]
        lo, hi = v[0] - 1.96 * se, v[0] + 1.96 * se
      cells.append(f"{v.mean():.3f} [{lo:.3f}, {hi:.3f}]")
    out.append([m, last, len(at), *cells])
  return format_table(["trained by", "step", "seeds", *QUANTITIES, *GAPS], out)


def main(argv):
  cli.no_arguments(argv)
  F = flags.FLAGS
  try:
    seeds, _ = [int(s) for s in F.seeds], [int(p) for p in F.points]
  except ValueError:
    cli.fail("--seeds and --points must be integers")
  rows = [r for s in seeds for r in _seed_rows(s)]
  os.makedirs(F.workdir, exist_ok=True)
  names = (*QUANTITIES, *GAPS)
  fields = ["seed", "method", "step", *(f"{q}{e}" for q in names for e in ("", "_se")), "ess"]
  write_csv(os.path.join(F.workdir, "bounds.csv"), rows, fields)
  text = _table(rows, F.methods)
  with open(os.path.join(F.workdir, "table.md"), "w") as f:
    f.write(text + "\n")
  print(text)
  title = "J(θ) and its lower bounds along fine-tuning (byte-level LM, π_ref exact)"
  plots.band_panels(
    _panels(rows, F.methods), os.path.join(F.workdir, "bounds.png"), "update", "J", title
  )


if __name__ == "__main__":
  cli.run(main)
