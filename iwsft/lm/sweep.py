"""The language pipeline's comparison as a sweep over seeds: one run_lm per seed, <workdir>/seed_<s>.

A seed with a result.json is finished and skipped; an unfinished one continues (finished stages are
reused, a training stage resumes from its checkpoint). Seeds are not vmapped here: each seed samples
its own curated data from its own base model, so the seeds do not share data.
Records: one per (metric, model, seed), with "dataset" naming the metric (pass@1 greedy/sampled).
"""

from __future__ import annotations

import json
import os

from iwsft.lm.run import run_lm

SCORE = "pass@1 ×100"


def _result_path(workdir: str, seed: int) -> str:
  return os.path.join(workdir, f"seed_{seed}", "result.json")


def plan(workdir: str, seeds) -> list[int]:
  return [s for s in seeds if not os.path.exists(_result_path(workdir, s))]


def run_grid(base_cfg, workdir: str, todo, quiet: bool = False, progress=print) -> None:
  """Runs the seeds of `plan`."""
  for i, seed in enumerate(todo):
    progress(f"[{i + 1}/{len(todo)}] language pipeline, seed {seed}")
    cfg = base_cfg.copy_and_resolve_references()
    cfg.seed = seed
    run_lm(cfg, os.path.join(workdir, f"seed_{seed}"), quiet=quiet)


def records(workdir: str, seeds, task_name: str = "addition") -> list[dict]:
  out = []
  for seed in seeds:
    path = _result_path(workdir, seed)
    if not os.path.exists(path):
      continue
    with open(path) as f:
      result = json.load(f)
    for mode in ("greedy", "sampled"):
      for model, r in result["models"].items():
        out.append({"dataset": f"{task_name} pass@1 ({mode})", "method": model, "seed": seed,
                    "score": 100.0 * r[f"pass@1_{mode}"], "cell": os.path.dirname(path)})
  return out
