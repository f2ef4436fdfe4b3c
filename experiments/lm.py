"""The language pipeline: base model π_ref -> samples -> curation -> SFT / iw-SFT / SFT(Q) ->
pass@1.

  python experiments/lm.py --workdir=runs/lm --seeds=0,1,2

Settings come from --config (default iwsft/lm/config.py), any value overridden as
--config.<key>=<value> (e.g. --config.finetune.steps=800; tuples by repeating the flag,
--config.methods=sft --config.methods=iw_sft). Each seed runs in <workdir>/seed_<s>; a stage whose
outputs exist is reused (--overwrite redoes it), and --config.stages runs a subset. An interrupted
training stage resumes from its last checkpoint when the command is run again; SIGTERM/SIGINT save
one and exit with status 75. --config.data=FILE.jsonl fine-tunes on your own records
{"prompt", "completion", "score"?} instead of the sampled ones.
"""

import os

import numpy as np
from absl import flags

from iwsft.core.config import with_overrides
from iwsft.io import cli
from iwsft.io.report import format_table
from iwsft.lm import config
from iwsft.lm.pipeline import run_lm

cli.define_config(
  cli.config_file(config),
  "language-pipeline settings (a config file); override values with --config.<key>=<value>",
)
cli.define_distributed_flags()
flags.DEFINE_string("workdir", "runs/lm", "output directory")
flags.DEFINE_list("seeds", ["0"], "seeds, each run in <workdir>/seed_<s>")
flags.DEFINE_bool(
  "overwrite", False, "redo stages whose outputs exist (and replace a run made with other settings)"
)


def main(argv):
  cli.no_arguments(argv)
  cli.init_distributed()
  F = flags.FLAGS
  try:
    seeds = [int(s) for s in F.seeds]
  except ValueError:
    cli.fail(f"--seeds must be integers, got {','.join(F.seeds)}")
  results = []
  for seed in seeds:
    cfg = with_overrides(F.config, {"seed": seed})
    print(f"== seed {seed}")
    res = run_lm(cfg, os.path.join(F.workdir, f"seed_{seed}"), F.overwrite)
    if res is not None:
      results.append(res)
  if len(results) > 1:
    rows = []
    for n in results[0]["models"]:
      g = np.array([100 * r["models"][n]["pass@1_greedy"] for r in results])
      s = np.array([100 * r["models"][n]["pass@1_sampled"] for r in results])
      rows.append([n, f"{g.mean():.1f} ± {g.std():.1f}", f"{s.mean():.1f} ± {s.std():.1f}"])
    text = (
      f"pass@1 on {results[0]['eval_problems']} held-out problems, mean ± std over seeds "
      f"{','.join(map(str, seeds))}:\n" + format_table(["model", "greedy", "sampled"], rows)
    )
    print(text)
    with open(os.path.join(F.workdir, "table.md"), "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  cli.run(main)
