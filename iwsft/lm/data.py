"""JSON-lines records {"prompt", "completion", "score" (optional)} -> padded token arrays.

Users bring their own curated data in this format; the task stages write it too. Every bad line
is a UserError naming the file and line. Sequences are the tokenizer's prompt, the completion and
EOS, padded to the context; the loss mask covers completion tokens and EOS only (never prompt or
padding).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from iwsft.errors import UserError
from iwsft.lm.tokenizer import ByteTokenizer

BYTES = ByteTokenizer()


@dataclasses.dataclass
class Record:
  prompt: str
  completion: str
  score: float | None = None


def read_jsonl(path: str) -> list[Record]:
  """Reads and validates a JSON-lines file of records."""
  try:
    with open(path, "rb") as f:
      raw_lines = f.read().splitlines()
  except OSError as e:
    raise UserError(f"cannot read {path}: {e.strerror}") from None
  records = []
  for n, raw in enumerate(raw_lines, 1):
    where = f"{path}:{n}"
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError:
      raise UserError(f"{where}: not valid UTF-8") from None
    if not line.strip():
      raise UserError(f"{where}: empty line")
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"{where}: malformed JSON ({e.msg})") from None
    if (
      not isinstance(obj, dict)
      or not isinstance(obj.get("prompt"), str)
      or not isinstance(obj.get("completion"), str)
    ):
      raise UserError(f"{where}: need an object with string fields 'prompt' and 'completion'")
    score = obj.get("score")
    if score is not None:
      if isinstance(score, bool) or not isinstance(score, (int, float)) or not np.isfinite(score):
        raise UserError(f"{where}: score must be a finite number")
      if score < 0:
        raise UserError(f"{where}: negative score {score}")
      score = float(score)
    records.append(Record(obj["prompt"], obj["completion"], score))
  if not records:
    raise UserError(f"{path}: no records")
  return records


def write_jsonl(path: str, rows: list[dict]) -> None:
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")


def prompt_tokens(prompt: str, tokenizer=BYTES, prefix: str = "") -> list[int]:
  """A prompt's ids: the tokenizer's (chat) rendering of it, then the response prefix's tokens."""
  return tokenizer.prompt(prompt) + (tokenizer.encode(prefix) if prefix else [])


def encode_records(
  records: list[Record], max_len: int, source: str = "data", tokenizer=BYTES, prefix=None
) -> dict[str, np.ndarray]:
  """-> {"tokens": [N, max_len] int32, "mask": [N, max_len] float32, "weight": [N] float32 (1)}.

  Each row is the prompt's ids (prompt_tokens, with prefix(prompt) as the response prefix), the
  completion's and the tokenizer's EOS, then padding. A record longer than the context is a
  UserError naming its line (1-based) in `source`.
  """
  n = len(records)
  tokens = np.full((n, max_len), tokenizer.pad, np.int32)
  mask = np.zeros((n, max_len), np.float32)
  for i, r in enumerate(records):
    p = prompt_tokens(r.prompt, tokenizer, prefix(r.prompt) if prefix else "")
    c = tokenizer.encode(r.completion) + [tokenizer.eos]
    if len(p) >= max_len:
      raise UserError(
        f"{source}:{i + 1}: prompt of {len(p)} tokens does not fit the context of {max_len}"
      )
    if len(p) + len(c) > max_len:
      raise UserError(
        f"{source}:{i + 1}: prompt + completion of {len(p) + len(c)} tokens exceed "
        f"the context of {max_len}"
      )
    tokens[i, : len(p) + len(c)] = p + c
    mask[i, len(p) : len(p) + len(c)] = 1.0
  return {"tokens": tokens, "mask": mask, "weight": np.ones(n, np.float32)}
