"""A JSON-lines math benchmark scored with math-verify (lm/answers.py), and the evaluate stage on
it."""

import json
import os

import pytest
from conftest import lm_command_error, save_tiny_pretrained

from iwsft.errors import UserError
from iwsft.lm.answers import MathAnswers, read_answers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write(path, rows) -> str:
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def test_answers_are_compared_as_mathematics():
  m = MathAnswers([("half?", "\\frac{1}{2}"), ("poly?", "x^2+1"), ("n?", "42"), ("pi?", "\\pi")])
  assert m.verify("half?", "so the answer is \\boxed{0.5}") == (1.0, 1.0)
  assert m.verify("half?", "\\boxed{1/2}") == (1.0, 1.0)
  assert m.verify("half?", "\\boxed{\\frac{2}{3}}") == (0.0, 0.0)
  assert m.verify("poly?", "We get \\boxed{1 + x^2}.") == (1.0, 1.0)
  assert m.verify("n?", "First 41, then finally \\boxed{42}") == (1.0, 1.0)
  assert m.verify("n?", "The answer is \\boxed{43}") == (0.0, 0.0)
  assert m.verify("n?", "no idea") == (0.0, 0.0)
  assert m.verify("pi?", "\\boxed{\\pi}") == (1.0, 1.0)


@pytest.mark.parametrize(
  "rows, needle",
  [
    ([{"prompt": "a"}], ":1: need an object with string fields 'prompt' and 'answer'"),
    ([{"prompt": "a", "answer": "1"}, "{not json"], ":2: not a JSON object"),
    ([{"prompt": "a", "answer": "1"}, {"prompt": "a", "answer": "2"}], ":2: the prompt of line 1"),
    ([{"prompt": "a", "answer": " "}], ":1: need an object"),
  ],
)
def test_a_malformed_benchmark_is_a_user_error_naming_the_line(tmp_path, rows, needle):
  with pytest.raises(UserError, match=needle):
    read_answers(_write(tmp_path / "b.jsonl", rows))


def test_the_s1k_preset_fine_tunes_then_scores_a_math_benchmark(tmp_path, smollm2_tokenizer):
  """finetune then evaluate on eval_data: pass@1 over the benchmark's problems, per problem."""
  from iwsft.lm.config import get_config
  from iwsft.lm.pipeline import run_lm

  model_dir = tmp_path / "qwen2-like"
  save_tiny_pretrained(model_dir, smollm2_tokenizer, max_len=96, qkv_bias=True)
  traces = [{"prompt": f"Compute {a} * {b}.", "completion": f"{a * b}. \\boxed{{{a * b}}}"}
            for a, b in [(12, 3), (7, 8), (21, 4), (5, 5)]]  # fmt: skip
  data = _write(tmp_path / "traces.jsonl", traces)
  bench = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(1, 2), (3, 4)]]
  cfg = get_config("s1k")
  cfg.model.update(path=str(model_dir), max_len=96)
  cfg.update(data=data, eval_data=_write(tmp_path / "bench.jsonl", bench), fsdp=1)
  cfg.update(stages=("finetune", "evaluate"), methods=("iw_sft",), steps_per_dispatch=2)
  cfg.finetune.update(steps=2, batch_size=2, warmup_steps=1)
  cfg.task.max_new = 6
  cfg.compute.update(attention_chunk=16, logits_chunk=16)
  result = run_lm(cfg, str(tmp_path / "run"), quiet=True)
  assert result["eval_problems"] == 2 and result["eval_data"].endswith("bench.jsonl")
  for model in ("reference", "iw_sft"):
    r = result["models"][model]
    assert len(r["correct_greedy"]) == len(r["correct_sampled"]) == 2
    assert r["pass@1_greedy"] == sum(r["correct_greedy"]) / 2


def test_a_bad_benchmark_is_one_line_exit_2_and_nothing_is_written(tmp_path):
  bench = _write(tmp_path / "bench.jsonl", [{"prompt": "What is 1 + 1?"}])
  line = lm_command_error(tmp_path / "w", f"--config.eval_data={bench}")
  assert "bench.jsonl:1: need an object" in line
