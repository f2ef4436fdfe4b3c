"""Offline RL baselines from d3rlpy (IQL, TD3+BC, and its BC as a cross-check) on iwsft's Minari
datasets, evaluated with iwsft's protocol, beside iwsft's own methods.

  make .venv-d3rlpy/.installed      # d3rlpy + torch (CPU) in their own venv
  python experiments/offline_rl.py --workdir=runs/offline-rl                       # small Hopper
  python experiments/offline_rl.py --datasets=iwsft/hopper/medium-replay-v1 \
    --workdir=runs/offline-rl-full
  python experiments/offline_rl.py --workdir=runs/offline-rl --compare=docs/sweep-avx2/cells.csv

Each (dataset, algorithm, seed) is one run: d3rlpy trains in a subprocess of .venv-d3rlpy
(experiments/d3rlpy_offline.py, d3rlpy's published D4RL hyper-parameters) for --steps updates
on the dataset's transitions, read by iwsft's own reader (iwsft.control.peers); its deterministic
actor is written at each of --snapshots and evaluated here exactly as iwsft evaluates its methods
(the dataset's evaluation environment, --eval_episodes episodes from seed + 10000, the
dataset's normalised score). A run is finished when its result.json exists: rerunning the command
does what is left. --compare adds iwsft's per-seed scores (a sweep's cells.csv) to the tables:
per-cell means with Student-t intervals, seed-paired differences (the seeds share evaluation
episodes), rliable aggregates, and a score-against-updates figure.
Writes to --workdir: cells.csv, table.md, table.csv, paired.csv, aggregate.csv (two datasets or
more), compute.png,
log.txt (one line per finished run), and per run <dataset>/<algo>/seed_<s>/result.json.
"""

import csv
import json
import os
import subprocess
import sys
import time

from absl import flags

from iwsft.errors import UserError
from iwsft.io import cli, progress, report
from iwsft.io.workdir import code_version
from iwsft.sweep import CELL_COLUMNS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_HOPPER = [f"iwsft/hopper-small/{k}-v1" for k in ("medium-replay", "medium", "medium-expert")]
METHOD = {"iql": "iql", "td3_bc": "td3_bc", "bc": "d3rlpy_bc"}  # algorithm -> table name

flags.DEFINE_list("datasets", SMALL_HOPPER, "Minari dataset ids (run in this order)")
flags.DEFINE_list("algos", ["iql", "td3_bc", "bc"], "d3rlpy algorithms: iql, td3_bc, bc")
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "seeds")
flags.DEFINE_integer("steps", 10_000, "updates per run (the same for every dataset)")
flags.DEFINE_list("snapshots", ["1000", "2500", "5000"], "also evaluate after these updates")
flags.DEFINE_integer("eval_episodes", 20, "episodes per evaluation (the cpu-sweep recipe's 20)")
flags.DEFINE_integer("workers", 1, "runs at once (each trains on one thread)")
flags.DEFINE_string("workdir", "runs/offline-rl", "output directory")
flags.DEFINE_string("python", ".venv-d3rlpy/bin/python", "the d3rlpy venv's interpreter")
flags.DEFINE_string("compare", "", "a sweep's cells.csv: iwsft's scores to put beside the peers'")
flags.DEFINE_bool("dry_run", False, "print the runs left to do and exit")
flags.DEFINE_bool("tables_only", False, "write the tables of the finished runs, run nothing")


def settings(F) -> dict:
  """The validated settings; the identity a resumed workdir must share."""
  try:
    seeds = [int(s) for s in F.seeds]
    snapshots = sorted({int(s) for s in F.snapshots} | {F.steps})
  except ValueError:
    raise UserError("--seeds and --snapshots must be integers") from None
  bad = [a for a in F.algos if a not in METHOD]
  if bad:
    raise UserError(f"--algos: unknown {bad}; choose from {', '.join(METHOD)}")
  if F.steps < 1 or snapshots[0] < 1 or snapshots[-1] > F.steps:
    raise UserError(f"--snapshots must lie in [1, --steps={F.steps}]")
  if F.eval_episodes < 1 or F.workers < 1 or len(set(seeds)) != len(seeds):
    raise UserError("--eval_episodes and --workers must be >= 1, --seeds distinct")
  if F.compare and not os.path.exists(F.compare):
    raise UserError(f"--compare: no file {F.compare}")
  return {"steps": F.steps, "snapshots": snapshots, "eval_episodes": F.eval_episodes}


def claim(workdir: str, identity: dict) -> None:
  path = os.path.join(workdir, "settings.json")
  if os.path.exists(path):
    with open(path) as f:
      held = json.load(f)
    if held != identity:
      raise UserError(f"{workdir} holds runs with other settings ({held}); use another --workdir")
    return
  os.makedirs(workdir, exist_ok=True)
  with open(path, "w") as f:
    json.dump(identity, f, indent=1)


def run_dir(workdir: str, dataset: str, algo: str, seed: int) -> str:
  return os.path.join(workdir, dataset.replace("/", "__"), algo, f"seed_{seed}")


def transitions_file(workdir: str, dataset: str) -> str:
  """The dataset's transitions for d3rlpy, written once (peers.write_transitions)."""
  from iwsft.control import data as data_lib
  from iwsft.control import peers

  path = os.path.join(workdir, dataset.replace("/", "__"), "transitions.npz")
  if not os.path.exists(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    peers.write_transitions(data_lib.load_dataset(dataset), path[: -len(".npz")] + ".tmp.npz")
    os.replace(path[: -len(".npz")] + ".tmp.npz", path)
  return path


def train(python: str, data: str, algo: str, seed: int, ident: dict, out: str) -> dict:
  """d3rlpy's training in its venv; returns its JSON line (wall time per snapshot)."""
  snaps = ",".join(map(str, ident["snapshots"]))
  script = os.path.join(ROOT, "experiments", "d3rlpy_offline.py")
  cmd = [python, script, data, algo, str(seed), str(ident["steps"]), snaps, out]
  done = subprocess.run(cmd, capture_output=True, text=True)
  if done.returncode != 0:
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
    raise RuntimeError(f"d3rlpy {algo} seed {seed} on {data} failed: {' '.join(tail)}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def evaluate_run(dataset: str, seed: int, ident: dict, out: str, trained: dict) -> dict:
  """Every snapshot's actor evaluated with iwsft's protocol; the last one is the run's score."""
  from iwsft.control import data as data_lib
  from iwsft.control import peers
  from iwsft.control.evaluate import evaluate
  from iwsft.control.pipeline import environment
  from iwsft.control.stages import FINAL_EVAL_SEED

  ds = data_lib.load_dataset(dataset)
  env_spec, _ = environment(ds, dataset)
  refs = data_lib.reference_scores(ds)
  points = []
  for step in ident["snapshots"]:
    act = peers.read_actor(os.path.join(out, f"actor_{step}.npz"))
    ev = evaluate(act, env_spec, ident["eval_episodes"], seed + FINAL_EVAL_SEED, *refs)
    points.append({"step": step, "wall_time_s": trained["wall_time_s"][str(step)], **ev})
  return {"snapshots": points, "d3rlpy": trained["d3rlpy"], "torch": trained["torch"]}


def do_run(F, ident: dict, dataset: str, algo: str, seed: int) -> dict:
  out = run_dir(F.workdir, dataset, algo, seed)
  t0 = time.time()
  trained = train(F.python, transitions_file(F.workdir, dataset), algo, seed, ident, out)
  result = evaluate_run(dataset, seed, ident, out, trained)
  last = result["snapshots"][-1]
  result.update(
    dataset=dataset,
    method=METHOD[algo],
    seed=seed,
    score=last["normalised_score"],
    return_mean=last["return_mean"],
    wall_time_s=last["wall_time_s"],
    run_time_s=time.time() - t0,
    seeds_trained_together=1,
    cell=os.path.relpath(out, F.workdir),
    code=code_version(),
  )
  with open(os.path.join(out, "result.json.tmp"), "w") as f:
    json.dump(result, f, indent=1)
  os.replace(os.path.join(out, "result.json.tmp"), os.path.join(out, "result.json"))
  return result


def todo(F) -> list[tuple[str, str, int]]:
  runs = [(d, a, int(s)) for d in F.datasets for s in F.seeds for a in F.algos]
  return [
    r for r in runs if not os.path.exists(os.path.join(run_dir(F.workdir, *r), "result.json"))
  ]


def main(argv):
  cli.no_arguments(argv)
  F = flags.FLAGS
  ident = settings(F)
  left = todo(F)
  if F.dry_run:
    print(f"{len(left)} run(s) to do in {F.workdir}")
    print("\n".join(f"  {d} {a} seed {s}" for d, a, s in left))
    return
  if F.tables_only:
    claim(F.workdir, ident)  # the finished runs' settings must be these
    for line in write_tables(F):
      print(line)
    return
  if left and not os.path.exists(F.python):
    raise UserError(f"no {F.python}: install d3rlpy's venv with `make .venv-d3rlpy/.installed`")
  claim(F.workdir, ident)
  log = open(os.path.join(F.workdir, "log.txt"), "a")
  from concurrent.futures import ThreadPoolExecutor

  with ThreadPoolExecutor(F.workers) as pool, progress.bar(len(left), "offline RL", "run") as bar:
    for r in pool.map(lambda run: do_run(F, ident, *run), left):
      line = (
        f"{r['dataset']} {r['method']} seed {r['seed']}: score {r['score']:.1f} "
        f"after {ident['steps']} updates, train {r['wall_time_s']:.0f}s"
      )
      log.write(line + "\n")
      log.flush()
      progress.say(bar, line)
      bar.update()
  log.close()
  for line in write_tables(F):
    print(line)


def peer_records(F) -> list[dict]:
  """The finished runs' result.json of --datasets × --algos × --seeds."""
  out = []
  for d in F.datasets:
    for a in F.algos:
      for s in F.seeds:
        path = os.path.join(run_dir(F.workdir, d, a, int(s)), "result.json")
        if os.path.exists(path):
          with open(path) as f:
            out.append(json.load(f))
  return out


def compared_records(path: str, datasets: list[str]) -> list[dict]:
  """iwsft's per-seed scores (a sweep's cells.csv) on `datasets`."""
  if not path:
    return []
  with open(path) as f:
    rows = list(csv.DictReader(f))
  return [
    {**r, "seed": int(r["seed"]), "score": float(r["score"])}
    for r in rows
    if r["dataset"] in datasets
  ]


def pairs_against(methods: list[str], peer: str) -> dict[str, str]:
  return {m: peer for m in methods if m not in METHOD.values()}


def write_tables(F) -> list[str]:
  """table.md/.csv, cells.csv, paired.csv, aggregate.csv and compute.png from what is finished."""
  peers = peer_records(F)
  ours = compared_records(F.compare, F.datasets)
  records = ours + peers
  if not records:
    return []
  methods = list(dict.fromkeys(r["method"] for r in records))
  summary = report.summarise(records)
  report.write_csv(os.path.join(F.workdir, "table.csv"), summary, report.SUMMARY_COLUMNS)
  report.write_csv(os.path.join(F.workdir, "cells.csv"), peers, CELL_COLUMNS)
  paired = {
    peer: report.paired_differences(records, pairs_against(methods, peer))
    for peer in ("iql", "td3_bc")
  }
  if "bc" in methods:
    paired["d3rlpy_bc"] = report.paired_differences(records, {"bc": "d3rlpy_bc"})
  rows = [r for rs in paired.values() for r in rs]
  report.write_csv(os.path.join(F.workdir, "paired.csv"), rows, report.PAIRED_COLUMNS)
  iqm, poi = report.aggregate(records, methods, pairs_against(methods, "iql"))
  poi += report.aggregate(records, methods, pairs_against(methods, "td3_bc"))[1]
  if iqm:  # across datasets: nothing to aggregate over one
    report.write_aggregate(os.path.join(F.workdir, "aggregate.csv"), iqm, poi)
  text = [
    f"# Offline RL baselines (d3rlpy) beside iwsft, {F.steps} updates per peer run",
    "",
    "Normalised score ×100: mean ± std [95% Student-t CI] over seeds.",
    "",
    report.markdown_table(summary, methods, F.datasets),
  ]
  if rows:
    text += [
      "",
      "Seed-paired differences (a seed shares its evaluation episodes), 95% Student-t CIs:",
    ]
  text += ["\n" + report.paired_table(rs, F.datasets) for rs in paired.values() if rs]
  text += ["", "The peers' scores after each number of updates (mean [95% Student-t CI]):", ""]
  text += [snapshot_table(peers, F.datasets)]
  if iqm:
    text += ["", report.aggregate_text(iqm, poi)]
  with open(os.path.join(F.workdir, "table.md"), "w") as f:
    f.write("\n".join(text) + "\n")
  compute_figure(F, peers, summary)
  return text


def snapshot_table(peers: list[dict], datasets: list[str]) -> str:
  """Per dataset and peer, its score after each snapshot's updates over the seeds."""
  steps = sorted({p["step"] for r in peers for p in r["snapshots"]})
  rows = []
  for d in datasets:
    for m in dict.fromkeys(r["method"] for r in peers if r["dataset"] == d):
      runs = [r for r in peers if r["dataset"] == d and r["method"] == m]
      cells = []
      for t in steps:
        x = [p["normalised_score"] for r in runs for p in r["snapshots"] if p["step"] == t]
        lo, hi = report.t_interval(x)
        cells.append(f"{sum(x) / len(x):.1f} [{lo:.1f}, {hi:.1f}]" if len(x) > 1 else "–")
      rows.append([d.split("/", 1)[-1], m, len(runs), *cells])
  return report.format_table(["dataset", "peer", "seeds", *(f"{t:,} updates" for t in steps)], rows)


def compute_figure(F, peers: list[dict], summary: list[dict]) -> None:
  """Per dataset: each peer's score against its updates (mean and 95% t-band over seeds), iwsft's
  methods' final scores as dashed lines, and iwsft's own update count (the cpu-sweep recipe's
  π_ref and fine-tuning updates) as a dotted line."""
  from iwsft.control.config import get_config
  from iwsft.io import plots

  curves, levels = {}, {}
  for d in F.datasets:
    name = d.split("/", 1)[-1]
    for m in dict.fromkeys(r["method"] for r in peers if r["dataset"] == d):
      runs = [r for r in peers if r["dataset"] == d and r["method"] == m]
      points = [
        ([p["step"] for p in r["snapshots"]], [p["normalised_score"] for p in r["snapshots"]])
        for r in runs
      ]
      curves.setdefault(name, {})[m] = report.curve_band(points)
    for row in summary:
      if row["dataset"] == d and row["method"] not in METHOD.values() and name in curves:
        levels.setdefault(name, {})[f"iwsft {row['method']}"] = row["mean"]
  if not curves:
    return
  recipe = get_config("cpu-sweep")
  steps = recipe.reference.steps + recipe.finetune.steps
  plots.curves_and_levels(
    curves,
    levels,
    os.path.join(F.workdir, "compute.png"),
    "peer's updates (batches of 256 transitions)",
    "normalised score ×100",
    "d3rlpy's IQL, TD3+BC and BC against their updates (mean, 95% t-band over seeds); "
    "iwsft's methods at the cpu-sweep recipe (dashed: their final mean score)",
    marker=(steps, f"iwsft's {steps:,} updates"),
  )


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  cli.run(main)
