"""Runs a script with minari's MinariDataset.iterate_episodes wrapped to record which episode
indices the process reads, written as JSON to $IWSFT_READS.<pid> at exit.

  IWSFT_READS=/tmp/reads python tests/helpers/record_reads.py experiments/control.py --flags...
"""

import atexit
import json
import os
import runpy
import sys

from minari.dataset.minari_dataset import MinariDataset

reads = []
_iterate = MinariDataset.iterate_episodes


def _recording(self, episode_indices=None):
  ids = range(self.total_episodes) if episode_indices is None else episode_indices
  reads.append({"dataset": self.spec.dataset_id, "episodes": [int(i) for i in ids]})
  return _iterate(self, episode_indices)


MinariDataset.iterate_episodes = _recording


@atexit.register
def _write():
  with open(f"{os.environ['IWSFT_READS']}.{os.getpid()}", "w") as f:
    json.dump(reads, f)


sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
