"""Rewrites a Hugging Face directory's model.safetensors as a sharded checkpoint: its tensors in
another dtype, split over two files named by model.safetensors.index.json, as large models ship."""

import json
import os

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}


def reshard(path: str, dtype: str) -> dict[str, np.ndarray]:
  """Replaces path/model.safetensors by two files and an index; returns the tensors written."""
  single = os.path.join(path, "model.safetensors")
  weights = {k: v.astype(DTYPES[dtype]) for k, v in load_file(single).items()}
  os.remove(single)
  names = sorted(weights)
  files = {}
  for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
    file = f"model-{i + 1:05d}-of-00002.safetensors"
    save_file({k: weights[k] for k in part}, os.path.join(path, file), metadata={"format": "pt"})
    files.update({k: file for k in part})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": files}, f)
  return weights
