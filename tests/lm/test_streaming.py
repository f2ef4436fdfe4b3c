"""Pretrained checkpoints read tensor by tensor: sharded Hugging Face files in bfloat16, float16
or float32 load to the checkpoint's values (rounded in numpy), never more than one tensor on the
host at a time, and straight into FSDP shardings on 8 forced devices (a scanned model's stacked
leaves too, with tensor parallelism, exported back from there)."""

import json
import os
import shutil
import subprocess
import sys
import weakref

import jax
import ml_dtypes
import numpy as np
import pytest
from conftest import lm_command_error
from hf_files import reshard

from iwsft.lm import checkpoints, sources

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "hf", "tiny-qwen2")
HELPERS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "helpers")
LM_CONFIG = os.path.join(os.path.dirname(HELPERS), "..", "iwsft", "lm", "config.py")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_a_sharded_checkpoint_loads_to_its_rounded_values(tmp_path, dtype):
  """The fixture re-saved in `dtype` over two files with an index loads to the float32 fixture's
  parameters rounded to `dtype` (rounding commutes with the transposes and concatenations)."""
  _, _, whole = checkpoints.load_hf(FIXTURE, max_len=64)
  work = str(tmp_path / dtype)
  shutil.copytree(FIXTURE, work)
  reshard(work, dtype)
  assert not os.path.exists(os.path.join(work, "model.safetensors"))
  _, _, got = checkpoints.load_hf(work, max_len=64)
  cast = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}[dtype]
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(whole), strict=True):
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, np.asarray(b).astype(cast).astype(np.float32))


def test_tensors_are_read_one_at_a_time(tmp_path, monkeypatch):
  """Every tensor is read once, and when one is read no tensor read before is still alive."""
  work = str(tmp_path / "m")
  shutil.copytree(FIXTURE, work)
  reshard(work, "bfloat16")
  reads, alive = [], []
  real = sources.SafetensorsSource.get

  def get(self, name):
    alive.append(sum(r() is not None for _, r in reads))
    x = real(self, name)
    reads.append((name, weakref.ref(x)))
    return x

  monkeypatch.setattr(sources.SafetensorsSource, "get", get)
  checkpoints.load_hf(work, max_len=64)
  names = [n for n, _ in reads]
  index = json.load(open(os.path.join(work, "model.safetensors.index.json")))["weight_map"]
  assert sorted(names) == sorted(index) and len(set(names)) == len(names)
  assert max(alive) == 0


def test_a_quantised_tensor_is_one_line_exit_2(tmp_path):
  """A checkpoint with an int8 tensor (as quantised ones store them): refused by name, not cast."""
  from safetensors.numpy import load_file, save_file

  work = tmp_path / "m"
  shutil.copytree(FIXTURE, work)
  (path,) = work.glob("*.safetensors")
  tensors = load_file(str(path))
  tensors["model.norm.weight"] = np.ones_like(tensors["model.norm.weight"], np.int8)
  save_file(tensors, str(path))
  line = lm_command_error(
    tmp_path / "w", f"--config={LM_CONFIG}:smollm2", f"--config.model.path={work}"
  )
  assert "checkpoint tensor model.norm.weight is stored as I8" in line


def test_an_index_naming_a_missing_file_is_a_user_error(tmp_path):
  from iwsft.errors import UserError

  work = str(tmp_path / "m")
  shutil.copytree(FIXTURE, work)
  reshard(work, "float32")
  os.remove(os.path.join(work, "model-00002-of-00002.safetensors"))
  with pytest.raises(UserError, match="names files that are not in"):
    checkpoints.load_hf(work, max_len=64)


def test_a_checkpoint_is_placed_into_fsdp_shardings_on_eight_devices(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  script = os.path.join(HELPERS, "streaming_script.py")
  out = subprocess.run(
    [sys.executable, script, str(tmp_path / "ckpt")],
    capture_output=True, text=True, env=env, timeout=600,
  )  # fmt: skip
  assert out.returncode == 0, out.stderr[-2000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r["fsdp_shardings"] and r["max_diff"] == 0.0
  # params, q's copy and Adam's two moments of every large leaf, each in FSDP's sharding
  assert r["state_fsdp"] and r["state_large_leaves"] == 4 * r["split"]
  assert r["split"] >= 2 * 4 + 2  # every block's four matrices, the embedding and the output
  assert r["shard"][0] * 8 == r["shape"][0] or r["shard"][1] * 8 == r["shape"][1]
  # scanned onto 2 x 2 x 2: stacked leaves in their shardings, the same values, exported back
  assert r["scanned_shardings"] and r["scanned_split"] >= 4 + 2
  assert r["scanned_diff"] == 0.0 and r["scanned_export_diff"] == 0.0


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_an_export_in_several_files_reloads_to_its_rounded_values(tmp_path, dtype):
  """save_hf past shard_bytes: numbered files with an index naming every tensor and the total
  size; each parameter gathered once; read back (tensor by tensor) as the parameters rounded to
  `dtype` in numpy."""
  cfg, _, params = checkpoints.load_hf(FIXTURE, max_len=64)
  checkpoints.save_hf(str(tmp_path), cfg, params)  # an earlier export, one file: replaced whole
  gathered = []
  real = checkpoints.distributed.to_host
  with pytest.MonkeyPatch.context() as m:
    m.setattr(checkpoints.distributed, "to_host", lambda x: gathered.append(x.shape) or real(x))
    checkpoints.save_hf(str(tmp_path), cfg, params, dtype=dtype, shard_bytes=20_000)
  assert len(gathered) == len(jax.tree.leaves(params))  # a fused leaf is gathered once
  index = json.load(open(tmp_path / "model.safetensors.index.json"))
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
  assert sorted(os.listdir(tmp_path)) == sorted([*files, "config.json", sources.INDEX])
  from safetensors.numpy import load_file

  tensors = {k: v for f in files for k, v in load_file(str(tmp_path / f)).items()}
  assert set(tensors) == set(index["weight_map"])
  assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
  assert json.load(open(tmp_path / "config.json"))["torch_dtype"] == dtype
  _, _, back = checkpoints.load_hf(str(tmp_path), max_len=64)
  cast = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}[dtype]
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(a, np.asarray(b).astype(cast).astype(np.float32))


def test_a_bad_export_dtype_is_one_line_exit_2(tmp_path):
  line = lm_command_error(tmp_path / "w", "--config.export_dtype=float16")
  assert "export_dtype must be one of float32, bfloat16" in line
