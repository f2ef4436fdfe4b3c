"""Random token records for the LM's multi-device helper scripts (imported beside them)."""

import numpy as np


def random_records(cfg, n: int) -> dict:
  """n rows of cfg.max_len random tokens (ids from 4), the first 4 positions a prompt outside the
  loss mask, every sequence weight 1 -> {tokens [n, T] int32, mask [n, T], weight [n]}."""
  rng = np.random.default_rng(0)
  return {
    "tokens": rng.integers(4, cfg.vocab_size, (n, cfg.max_len)).astype(np.int32),
    "mask": (np.arange(cfg.max_len)[None] >= 4).astype(np.float32).repeat(n, 0),
    "weight": np.ones(n, np.float32),
  }
