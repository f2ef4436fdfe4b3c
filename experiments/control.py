"""Train and evaluate one method on one Minari dataset.

  python experiments/control.py --dataset=iwsft/hopper-small/medium-replay-v0 --method=iw_sft \
      --workdir=runs/hopper-iw_sft

Defaults are the authors' recipe (shared/paper.md); every setting is a flag (see --helpfull).
Writes metrics.jsonl, result.json and curve.png to --workdir. Running the same command again resumes
an interrupted run from its last checkpoint; SIGTERM/SIGINT save one and exit with status 75.
"""

from absl import flags

from iwsft import cli
from iwsft.control.config import METHODS, get_config
from iwsft.control.run import run_control

HELPS = {
    "dataset": "Minari dataset id (local; see experiments/make_datasets.py)",
    "method": "bc (π_ref itself), filtered_bc, iw_sft, sft_q or iw_sft_q",
    "download": "download the dataset from Minari's servers if it is not local",
    "num_devices": "devices of the data-parallel mesh (0: all)",
    "val_fraction": "fraction of episodes held out for a validation NLL",
    "steps": "fine-tuning updates (stage 2)",
    "batch_size": "fine-tuning batch: episodes (batch_level=episode) or steps",
    "batch_level": "episode: whole padded episodes; step: single steps",
    "learning_rate": "fine-tuning peak learning rate",
    "warmup_steps": "linear warm-up steps",
    "schedule": "constant or cosine (decay to 0)",
    "top_fraction": "filtered BC keeps this top fraction of episodes by return (if --percentiles is empty)",
    "percentiles": "stratified oversampling: comma-separated return percentiles, '' to use --top_fraction",
    "quality_beta": "SFT(Q) temperature: weight ∝ exp(normalised return / beta)",
    "quality_mode": "SFT(Q): 'sample' episodes ∝ weight, or 'weight' their losses",
    "weighting": "iw-SFT weight per 'sequence' (episode) or per 'step'",
    "temperature": "iw-SFT temperature on the log-ratio",
    "w_min": "lower clip of episode weights",
    "w_max": "upper clip of episode weights",
    "self_normalise": "divide episode weights by their batch mean",
    "step_w_min": "lower clip of per-step weights",
    "step_w_max": "upper clip of per-step weights",
    "length_normalise": "divide episode log-likelihoods and log-ratios by episode length",
    "q_decay": "q <- decay*q + (1-decay)*theta each step (0: q is the current policy)",
    "hidden": "comma-separated hidden widths of the policy MLP",
    "eval_every": "evaluate every this many updates (0: only at the end)",
    "eval_episodes": "episodes per evaluation during training",
    "final_eval_episodes": "episodes of the final evaluation",
    "steps_per_dispatch": "updates per jitted call (lax.scan)",
    "checkpoint_every": "save the training state every this many updates (a rerun resumes from it)",
    "keep_checkpoints": "how many of the latest checkpoints to keep (the best evaluated one is kept too)",
    "skip_nonfinite": "skip batches whose loss or gradient is NaN/inf instead of stopping",
}

cli.define_flags_from_config(get_config(), HELPS, enums={"method": METHODS})
cli.define_distributed_flags()
flags.DEFINE_string("workdir", "runs/control", "output directory")
flags.DEFINE_bool("overwrite", False, "replace a finished or unfinished run in --workdir "
                  "(without it, an unfinished run there with the same flags resumes)")
flags.DEFINE_string("reference_dir", "", "where π_ref is saved/reused (default: <workdir>/reference)")


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  cli.init_distributed()
  cfg = cli.config_from_flags(get_config())
  F = flags.FLAGS
  run_control(cfg, F.workdir, F.overwrite, F.reference_dir)


if __name__ == "__main__":
  cli.run(main)
