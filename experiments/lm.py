"""The language pipeline: base model π_ref -> samples -> curation -> SFT / iw-SFT / SFT(Q) -> pass@1.

  python experiments/lm.py --workdir=runs/lm --seeds=0,1,2

Each seed runs in <workdir>/seed_<s>; a stage whose outputs exist is reused (--overwrite redoes
it), and --stages runs a subset. An interrupted training stage resumes from its last checkpoint
when the command is run again; SIGTERM/SIGINT save one and exit with status 75. --data=FILE.jsonl fine-tunes on your own records
{"prompt", "completion", "score"?} instead of the sampled ones.
"""

import os

import numpy as np
from absl import flags

from iwsft import cli
from iwsft.lm.config import get_config
from iwsft.lm.run import run_lm

HELPS = {
    "num_devices": "devices of the mesh (0: all)",
    "fsdp": "FSDP: split each large parameter and its optimiser state over this many devices "
            "(a divisor of the device count; the rest of the mesh is data-parallel)",
    "stages": "comma-separated subset of base,sample,curate,finetune,evaluate",
    "methods": "comma-separated subset of sft,iw_sft,sft_q",
    "data": "JSON-lines records to fine-tune on instead of the sampled ones",
    "task_demos": "noisy demonstrations for the base model",
    "task_error_rate": "probability that a demonstration's column sum is randomly wrong",
    "task_carry_error_rate": "probability that a demonstration forgets an incoming carry",
    "task_samples_per_prompt": "completions sampled per training prompt",
    "weighting": "iw-SFT weight per 'sequence' or per 'step' (token)",
    "q_decay": "q <- decay*q + (1-decay)*theta each step (0: the current model, detached)",
    "quality_beta": "SFT(Q): sample ∝ exp(score / beta)",
    "checkpoint_every": "save the training state every this many updates (a rerun resumes from it)",
    "keep_checkpoints": "how many of the latest checkpoints to keep per stage",
    "skip_nonfinite": "skip batches whose loss or gradient is NaN/inf instead of stopping",
}

cli.define_flags_from_config(get_config(), HELPS)
cli.define_distributed_flags()
flags.DEFINE_string("workdir", "runs/lm", "output directory")
flags.DEFINE_list("seeds", ["0"], "seeds, each run in <workdir>/seed_<s>")
flags.DEFINE_bool("overwrite", False, "redo stages whose outputs exist (and replace a run made "
                  "with other settings)")


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.init_distributed()
  F = flags.FLAGS
  try:
    seeds = [int(s) for s in F.seeds]
  except ValueError:
    cli.fail(f"--seeds must be integers, got {','.join(F.seeds)}")
  results = []
  for seed in seeds:
    cfg = cli.config_from_flags(get_config())
    cfg.seed = seed
    print(f"== seed {seed}")
    res = run_lm(cfg, os.path.join(F.workdir, f"seed_{seed}"), F.overwrite)
    if res is not None:
      results.append(res)
  if len(results) > 1:
    names = list(results[0]["models"])
    lines = [f"pass@1 on {results[0]['eval_problems']} held-out problems, mean ± std over seeds {','.join(map(str, seeds))}:",
             "| model | greedy | sampled |", "|---|---|---|"]
    for n in names:
      g = np.array([100 * r["models"][n]["pass@1_greedy"] for r in results])
      s = np.array([100 * r["models"][n]["pass@1_sampled"] for r in results])
      lines.append(f"| {n} | {g.mean():.1f} ± {g.std():.1f} | {s.mean():.1f} ± {s.std():.1f} |")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(F.workdir, "table.md"), "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  cli.run(main)
