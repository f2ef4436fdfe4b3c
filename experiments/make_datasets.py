"""Build D4RL-style Minari datasets locally (no internet): random, medium, medium-replay, expert,
medium-expert, each with ref_min_score (random) and ref_max_score (expert) for normalised scores.

  python experiments/make_datasets.py --env=pendulum --profile=small

Ids: iwsft/<env>-small/<kind>-v1 for the small profile, iwsft/<env>/<kind>-v1 for full. Existing
datasets are reused unless --force; the same --seed gives the same data. Behaviour policies of the
`pendulum` family are a scripted controller with a quality knob (iwsft.datasets.collect); those of
hopper, halfcheetah and walker2d are snapshots of a SAC learner trained first (iwsft.control.sac).
"""

from absl import flags

from iwsft.datasets import ENVS, KINDS, SAC_PROFILES, build, table
from iwsft.io import cli

flags.DEFINE_enum("env", "pendulum", list(ENVS), "environment family")
flags.DEFINE_enum("profile", "small", list(SAC_PROFILES), "dataset sizes")
flags.DEFINE_list("kinds", list(KINDS), "which kinds to build")
flags.DEFINE_integer("seed", 0, "data seed")
flags.DEFINE_bool("force", False, "rebuild datasets that exist")
flags.DEFINE_integer(
  "sac_max_steps",
  None,
  "SAC's step cap instead of the profile's; raised after a 'did not reach the target' error, the"
  " training resumes from its last checkpoint",
  lower_bound=1,
)
flags.DEFINE_bool(
  "one_xla_thread",
  True,
  "run XLA on one CPU thread: one build trains about as fast, two side by side 1.3-1.45x faster"
  " in total than with XLA's threads (benchmarks/sac_throughput.py)",
)


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  F = flags.FLAGS
  if F.one_xla_thread:
    cli.use_one_xla_thread()
  print(table(build(F.env, F.profile, F.kinds, F.seed, F.force, F.sac_max_steps)))


if __name__ == "__main__":
  cli.run(main)
