"""A pretrained model's tensors, one at a time: `get(name)` reads one tensor, in Hugging Face's
name and layout ([out, in] for a linear layer), and nothing else.

  SafetensorsSource  a Hugging Face directory: one or several *.safetensors files, with or without
                     model.safetensors.index.json; float32, float16 or bfloat16 (memory-mapped)
  GGUFSource         a GGUF file (llama or qwen2, any quantisation `gguf` dequantises; memory-
                     mapped), its q and k rows permuted back from llama.cpp's interleaved RoPE
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from iwsft.errors import UserError

INDEX = "model.safetensors.index.json"
READ_DTYPES = ("F32", "F16", "BF16")  # safetensors' names of the types a checkpoint is read in


class SafetensorsSource:
  def __init__(self, path: str):
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    self._open = {f: safe_open(f, framework="numpy") for f in files}
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      self.where = {name: os.path.join(path, file) for name, file in weight_map.items()}
      missing = sorted({f for f in self.where.values() if f not in self._open})
      if missing:
        raise UserError(f"{INDEX} names files that are not in {path}: {', '.join(missing)}")
    else:
      self.where = {name: f for f, h in self._open.items() for name in h.keys()}

  def get(self, name: str) -> np.ndarray:
    """The tensor `name` (a KeyError when the checkpoint has none; a UserError when it is stored
    in a type other than READ_DTYPES, such as a quantised model's int8 or float8)."""
    handle = self._open[self.where[name]]
    dtype = handle.get_slice(name).get_dtype()
    if dtype not in READ_DTYPES:
      raise UserError(
        f"checkpoint tensor {name} is stored as {dtype}; iwsft reads {', '.join(READ_DTYPES)} "
        "(a quantised checkpoint: use its unquantised weights)"
      )
    return handle.get_tensor(name)


GGUF_NAMES = {
  "attn_norm": "input_layernorm",
  "ffn_norm": "post_attention_layernorm",
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
}
GGUF_FIXED = {
  "token_embd.weight": "model.embed_tokens.weight",
  "output_norm.weight": "model.norm.weight",
  "output.weight": "lm_head.weight",
}


def hf_name(name: str) -> str:
  """A GGUF tensor name -> the Hugging Face one."""
  if name in GGUF_FIXED:
    return GGUF_FIXED[name]
  _, i, part, kind = name.split(".")
  return f"model.layers.{i}.{GGUF_NAMES[part]}.{kind}"


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation (interleaved-pair RoPE -> rotate-half): w [out, in]."""
  return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
  def __init__(self, reader, n_heads: int, kv_heads: int):
    self.tensors = {hf_name(t.name): t for t in reader.tensors}
    self.heads = {"q_proj": n_heads, "k_proj": kv_heads}

  def get(self, name: str) -> np.ndarray:
    import gguf

    t = self.tensors[name]
    x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    x = x.reshape(tuple(int(n) for n in reversed(t.shape)))
    proj, kind = name.split(".")[-2:]
    return unpermute(x, self.heads[proj]) if proj in self.heads and kind == "weight" else x
