"""A verifiable task: multi-digit addition with worked column steps.

  prompt:     "347+285="
  completion: "7+5+0=12 4+8+1=13 3+2+1=06 >632"

Each step adds one column (right to left) with the incoming carry and writes a two-digit sum; the
answer after '>' is read off the steps. Noisy demonstrations make two kinds of mistakes, each
propagating through the carry and the answer (a noisy demonstration is self-consistent but wrong):
  - systematic: with probability `carry_error_rate` a column with an incoming carry of 1 is
    written as if the carry were 0 ("forgets the carry"); above 0.5 this is the demonstrator's
    most likely behaviour, so even greedy decoding of a model cloned from it gets carries wrong;
  - random: with probability `error_rate` a column sum is off by a random amount.
Curation by the verifier keeps the demonstrations that do it right.
"""

from __future__ import annotations

import re

import numpy as np

_STEP = re.compile(r"^(\d)\+(\d)\+(\d)=(\d\d)$")


def make_problems(n: int, digits: int, rng: np.random.Generator) -> list[tuple[int, int]]:
  """n pairs of operands with exactly `digits` digits each."""
  lo, hi = 10 ** (digits - 1), 10**digits
  return [(int(a), int(b)) for a, b in rng.integers(lo, hi, (n, 2))]


def prompt_text(a: int, b: int) -> str:
  return f"{a}+{b}="


def worked_solution(
  a: int,
  b: int,
  digits: int,
  error_rate: float = 0.0,
  rng: np.random.Generator | None = None,
  carry_error_rate: float = 0.0,
) -> str:
  """The completion for a + b, with the demonstrator's mistakes (see the module docstring)."""
  da, db = str(a).zfill(digits)[::-1], str(b).zfill(digits)[::-1]
  steps, answer, carry = [], [], 0
  for i in range(digits):
    if carry and carry_error_rate and rng.random() < carry_error_rate:
      carry = 0
    s = int(da[i]) + int(db[i]) + carry
    if error_rate and rng.random() < error_rate:
      s = (s + int(rng.integers(1, 10))) % 20
    steps.append(f"{da[i]}+{db[i]}+{carry}={s:02d}")
    answer.append(str(s % 10))
    carry = s // 10
  total = int(str(carry) + "".join(reversed(answer)))
  return " ".join(steps) + f" >{total}"


def parse_prompt(prompt: str) -> tuple[int, int] | None:
  m = re.fullmatch(r"(\d+)\+(\d+)=", prompt)
  return (int(m.group(1)), int(m.group(2))) if m else None


def verify(prompt: str, completion: str) -> tuple[float, float]:
  """-> (correct ∈ {0, 1}, partial-credit score ∈ [0, 1]).

  correct: the answer after '>' equals the true sum. score: the fraction of the digits+1 checks
  passed: each column step names the right digits, the right incoming carry and their sum, and
  the final answer is right. A completion that does not parse scores 0.
  """
  ab = parse_prompt(prompt)
  if ab is None:
    return 0.0, 0.0
  a, b = ab
  digits = max(len(str(a)), len(str(b)))
  if ">" not in completion:
    return 0.0, 0.0
  body, _, answer = completion.rpartition(">")
  correct = float(answer.strip() == str(a + b))
  steps = body.split()
  da, db = str(a).zfill(digits)[::-1], str(b).zfill(digits)[::-1]
  good, carry = 0, 0
  for i in range(digits):
    m = _STEP.match(steps[i]) if i < len(steps) else None
    true = int(da[i]) + int(db[i]) + carry
    if (
      m
      and (m.group(1), m.group(2), int(m.group(3))) == (da[i], db[i], carry)
      and int(m.group(4)) == true
    ):
      good += 1
    carry = true // 10
  return correct, (good + correct) / (digits + 1)


_FIRST_INT = re.compile(r"-?\d+")


class ColumnAddition:
  """The task above, for the small byte-level model trained from scratch on its demonstrations."""

  name = "addition"
  pretrains = True  # the pipeline trains π_ref on noisy demonstrations first

  def __init__(self, digits: int, error_rate: float = 0.0, carry_error_rate: float = 0.0):
    self.digits, self.error_rate, self.carry_error_rate = digits, error_rate, carry_error_rate

  def problems(self, n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    return make_problems(n, self.digits, rng)

  def prompt(self, a: int, b: int) -> str:
    return prompt_text(a, b)

  def response_prefix(self, prompt: str) -> str:
    return ""

  def demonstration(self, a: int, b: int, rng: np.random.Generator) -> str:
    return worked_solution(a, b, self.digits, self.error_rate, rng, self.carry_error_rate)

  def longest_completion(self) -> str:
    top = 10**self.digits - 1
    return worked_solution(top, top, self.digits)

  def verify(self, prompt: str, completion: str) -> tuple[float, float]:
    return verify(prompt, completion)


class ChatSum:
  """Natural-language addition for a pretrained chat model.

  The user asks "What is 47 + 85?"; the assistant's reply starts with "47 + 85 = " (a response
  prefix, part of the prompt) and the model writes the rest. correct: the first integer of the
  completion is the sum. score (partial credit, for SFT(Q)): the fraction of the sum's digits that
  the first integer gets right, aligned from the last digit (0 without an integer).
  """

  name = "chat addition"
  pretrains = False

  def __init__(self, digits: int):
    self.digits = digits

  def problems(self, n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    return make_problems(n, self.digits, rng)

  def prompt(self, a: int, b: int) -> str:
    return f"What is {a} + {b}?"

  def response_prefix(self, prompt: str) -> str:
    m = re.fullmatch(r"What is (\d+) \+ (\d+)\?", prompt)
    return f"{m.group(1)} + {m.group(2)} = " if m else ""

  def verify(self, prompt: str, completion: str) -> tuple[float, float]:
    m = re.fullmatch(r"What is (\d+) \+ (\d+)\?", prompt)
    found = _FIRST_INT.search(completion.replace(",", ""))
    if m is None or found is None:
      return 0.0, 0.0
    truth, got = str(int(m.group(1)) + int(m.group(2))), found.group()
    right = sum(x == y for x, y in zip(reversed(truth), reversed(got)))
    return float(got == truth), right / max(len(truth), len(got))


def make_task(cfg):
  """The task a config names: cfg.kind "columns" (ColumnAddition) or "chat_sum" (ChatSum)."""
  from iwsft.errors import UserError

  if cfg.kind == "columns":
    return ColumnAddition(cfg.digits, cfg.error_rate, cfg.carry_error_rate)
  if cfg.kind == "chat_sum":
    return ChatSum(cfg.digits)
  raise UserError(f"task.kind must be 'columns' or 'chat_sum', got {cfg.kind!r}")
