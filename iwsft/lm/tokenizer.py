"""Byte-level tokenizer: UTF-8 bytes 0-255 plus BOS, EOS and PAD."""

from __future__ import annotations

import numpy as np

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259


def encode(text: str) -> list[int]:
  """Text -> byte ids (no special tokens)."""
  return list(text.encode("utf-8"))


def decode(ids) -> str:
  """Ids -> text, stopping at the first EOS and skipping BOS/PAD; invalid UTF-8 is replaced."""
  out = bytearray()
  for i in np.asarray(ids).tolist():
    if i == EOS:
      break
    if i < 256:
      out.append(i)
  return out.decode("utf-8", errors="replace")
