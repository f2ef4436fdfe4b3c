"""A math benchmark as JSON lines, scored with Hugging Face's math-verify: pass@1 of a model on
problems with reference answers (the s1K run's kind of evaluation: AIME-style problems whose
answer the model writes as \\boxed{...}).

A line is {"prompt": "...", "answer": "..."}; the answer is LaTeX or plain ("\\frac{1}{2}",
"0.5", "x^2+1"). A completion is correct when math-verify finds in it an expression equal to the
answer (its last \\boxed{...} first), mathematically: 1/2 = 0.5, x^2 + 1 = 1 + x^2.
"""

from __future__ import annotations

import json

from iwsft.errors import UserError, require_extra


def read_answers(path: str) -> list[tuple[str, str]]:
  """(prompt, answer) per line of a JSON-lines file; a UserError naming the line otherwise."""
  try:
    with open(path, "rb") as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise UserError(f"cannot read {path}: {e.strerror}") from None
  out, seen = [], {}
  for n, raw in enumerate(lines, 1):
    try:
      obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
      raise UserError(f"{path}:{n}: not a JSON object") from None
    ok = isinstance(obj, dict) and all(isinstance(obj.get(k), str) for k in ("prompt", "answer"))
    if not ok or not obj["answer"].strip():
      raise UserError(f"{path}:{n}: need an object with string fields 'prompt' and 'answer'")
    if obj["prompt"] in seen:
      raise UserError(f"{path}:{n}: the prompt of line {seen[obj['prompt']]} again")
    seen[obj["prompt"]] = n
    out.append((obj["prompt"], obj["answer"]))
  if not out:
    raise UserError(f"{path} holds no problems")
  return out


class MathAnswers:
  """The task interface's verify for a benchmark: (1, 1) when the completion's answer equals the
  prompt's reference answer, else (0, 0) (no partial credit)."""

  def __init__(self, problems: list[tuple[str, str]]):
    require_extra("lm", "math_verify")
    from math_verify import parse

    self._parse = parse
    self.gold = {p: parse(_as_math(a)) for p, a in problems}

  def verify(self, prompt: str, completion: str) -> tuple[float, float]:
    from math_verify import verify

    ok = float(bool(verify(self.gold[prompt], self._parse(completion))))
    return ok, ok


def _as_math(answer: str) -> str:
  """A reference answer as math-verify reads it best: in $...$ unless already LaTeX-delimited."""
  a = answer.strip()
  return a if a.startswith("$") or "\\boxed" in a else f"${a}$"
