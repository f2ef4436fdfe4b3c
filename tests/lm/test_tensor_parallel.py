"""Tensor parallelism: the mesh's model axis splits whole attention-head groups and MLP units."""

import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from conftest import lm_command_error
from flax import nnx

from iwsft.core.sharding import make_mesh
from iwsft.errors import UserError
from iwsft.lm.model import (
  LMConfig,
  Transformer,
  check_tensor_parallel,
  qkv_columns,
  tensor_parallel_dim,
  up_columns,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FORCED_8 = dict(
  os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
)


def test_grouped_columns_hold_each_kv_heads_queries_then_its_key_and_value():
  """H = 4 query heads over K = 2 key/value heads (G = 2), Dh = 3: qkv's columns are, per KV
  head j, query heads 2j and 2j + 1, then key j, then value j (in [q | k | v] numbering)."""
  cfg = LMConfig(d_model=12, n_heads=4, n_kv_heads=2, d_ff=8, mlp="swiglu")
  head = lambda i: list(range(3 * i, 3 * i + 3))  # [q0..q3 | k0 k1 | v0 v1] heads of width 3
  want = head(0) + head(1) + head(4) + head(6) + head(2) + head(3) + head(5) + head(7)
  assert qkv_columns(cfg).tolist() == want
  assert up_columns(cfg).tolist() == [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15]
  assert up_columns(LMConfig(d_ff=8)).tolist() == list(range(8))  # GELU: one projection


def test_which_dimension_each_leaf_splits_over_the_model_axis():
  model = Transformer(
    LMConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, qkv_bias=True, lora_rank=2),
    rngs=nnx.Rngs(0),
  )
  got = {}
  for path, x in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]:
    keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
    got["/".join(str(k) for k in keys if k is not None)] = tensor_parallel_dim(keys, x.shape)
  split = {k: v for k, v in got.items() if v is not None}
  assert split == {
    "blocks/0/qkv/kernel": 1,
    "blocks/0/qkv/bias": 0,
    "blocks/0/up/kernel": 1,
    "blocks/0/proj/kernel": 0,
    "blocks/0/down/kernel": 0,
  }
  assert "blocks/0/qkv_lora/lora_a" in got and "embed/embedding" in got  # present, not split
  # an optimiser moment's path ends the same way
  assert tensor_parallel_dim((0, "mu", "blocks", 3, "proj", "kernel", None), (8, 16)) == 0


@pytest.mark.parametrize(
  "cfg, ways, needle",
  [
    (LMConfig(n_heads=4, n_kv_heads=2, d_ff=256), 4, "must divide the model's 2 key/value heads"),
    (LMConfig(n_heads=4, d_ff=250), 4, "must divide the model's MLP width 250"),
  ],
)
def test_a_model_axis_that_does_not_divide_heads_or_mlp_is_a_user_error(cfg, ways, needle):
  with pytest.raises(UserError, match=needle):
    check_tensor_parallel(cfg, types.SimpleNamespace(shape={"model": ways}))
  check_tensor_parallel(cfg, types.SimpleNamespace(shape={"model": 2}))  # 2 divides both


def test_a_model_axis_that_does_not_divide_the_devices_is_a_user_error():
  with pytest.raises(UserError, match="tensor_parallel 3 must be a positive divisor of the 1"):
    make_mesh(1, model=3)


def test_the_command_refuses_a_model_axis_the_heads_do_not_split(tmp_path):
  """8 devices, tensor_parallel 8, the tiny model's 4 heads: one line, exit 2, nothing written."""
  line = lm_command_error(tmp_path / "w", "--config.tensor_parallel=8", devices=8)
  assert "tensor_parallel 8 must divide the model's 4 key/value heads" in line


def test_data_fsdp_model_meshes_train_as_one_device_with_whole_heads_per_shard():
  """On 8 forced devices, (data, fsdp, model) = (2, 2, 2), (1, 4, 2), (4, 1, 2): the same losses
  and parameters as one device (1e-4), and each model-axis shard of a block holds whole
  key/value-head groups (qkv's columns, proj's rows) and whole MLP units (up's columns, down's
  rows); the optimiser's momentum is sharded as its parameter, init_state(mesh=) makes every
  leaf in that sharding, and the embedding (which the model axis does not split) over fsdp and
  model together. The scanned model on (2, 2, 2) trains as the per-layer model on one device."""
  script = os.path.join(ROOT, "tests", "helpers", "tensor_parallel_script.py")
  out = subprocess.run(
    [sys.executable, script], env=FORCED_8, check=True, capture_output=True, text=True
  )
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["devices"] == 8
  d, h, kv, dh, d_ff = 128, 4, 2, 32, 256  # the script's model
  group = (h // kv + 2) * dh  # one key/value head's columns of qkv
  for mesh in ("2x2x2", "1x4x2", "4x1x2"):
    r = report[mesh]
    fsdp = int(mesh.split("x")[1])
    np.testing.assert_allclose(r["loss"], report["loss_one"], rtol=1e-4)
    assert r["max_param_diff"] < 1e-4
    halves = lambda n: [[0, n // 2], [n // 2, n]]
    assert r["qkv_columns"] == r["qkv_bias"] == halves(kv * group)
    assert all(a % group == 0 for a, _ in r["qkv_columns"])  # whole groups
    assert r["proj_rows"] == halves(h * dh)  # the query heads of the same groups
    assert r["up_columns"] == halves(2 * d_ff) and r["down_rows"] == halves(d_ff)  # whole units
    assert r["qkv_shard"] == [d // fsdp, kv * group // 2]  # fsdp splits the other dimension
    assert r["moment_specs_match"] and r["born_sharded"]
    assert r["embed_shard"] == [256 // (fsdp * 2), d]  # fsdp and model together
  r = report["scanned"]  # blocks stacked [layers, ...], on 2 x 2 x 2
  np.testing.assert_allclose(r["loss"], report["loss_one"], rtol=1e-4)
  assert r["max_param_diff"] < 1e-4
  assert r["qkv_columns"] == halves(kv * group) and r["proj_rows"] == halves(h * dh)
  assert r["layers"] == [[0, 2]]  # the scanned axis is never split
