"""Train and evaluate one method on one Minari dataset.

  python experiments/control.py --config=iwsft/control/config.py:cpu \
      --config.dataset=iwsft/hopper-small/medium-replay-v1 --config.method=iw_sft \
      --workdir=runs/hopper-iw_sft

--config is an ml_collections config file (default: iwsft/control/config.py, the authors' recipe;
`:cpu` picks the 2-core preset) and any value is overridden as --config.<key>=<value>, e.g.
--config.finetune.steps=1000 or --config.policy.hidden=64,64. Writes metrics.jsonl, result.json
and curve.png to --workdir. Running the same command again resumes an interrupted run from its last
checkpoint; SIGTERM/SIGINT save one and exit with status 75.
"""

from absl import flags

from iwsft.control import config
from iwsft.control.pipeline import run_control
from iwsft.io import cli

cli.define_config(
  cli.config_file(config),
  "control settings: a config file[:preset], "
  "e.g. iwsft/control/config.py:cpu; override values with --config.<key>=<value>",
)
cli.define_distributed_flags()
flags.DEFINE_string("workdir", "runs/control", "output directory")
flags.DEFINE_bool(
  "overwrite",
  False,
  "replace a finished or unfinished run in --workdir "
  "(without it, an unfinished run there with the same settings resumes)",
)
flags.DEFINE_string(
  "reference_dir", "", "where π_ref is saved/reused (default: <workdir>/reference)"
)


def main(argv):
  cli.no_arguments(argv)
  cli.init_distributed()
  F = flags.FLAGS
  run_control(F.config, F.workdir, F.overwrite, F.reference_dir)


if __name__ == "__main__":
  cli.run(main)
