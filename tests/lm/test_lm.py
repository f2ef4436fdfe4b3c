"""Language pipeline: the model, the cache, masks, log-probs, the verifier, data errors, and a tiny
run."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LM_TINY, code_of_checkout, lm_command_error
from flax import nnx

from iwsft.core.objectives import ObjectiveConfig, iw_sft_loss
from iwsft.lm import data as lm_data
from iwsft.lm import task
from iwsft.lm import tokenizer as tok
from iwsft.lm.model import LMConfig, Transformer, make_logprob_fn, token_logprobs
from iwsft.lm.sampling import generate, generate_without_cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = LMConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=24)


@pytest.fixture(scope="module")
def model():
  return Transformer(CFG, rngs=nnx.Rngs(0))


def tokens(b=3, t=20, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (b, t)), jnp.int32)


def test_kv_cache_decoding_matches_the_full_pass(model):
  x = tokens()
  full = np.asarray(model(x))
  logits, cache = model.prefill(x[:, :7])
  np.testing.assert_allclose(np.asarray(logits), full[:, :7], atol=1e-4)
  for t in range(7, x.shape[1]):
    step, cache = model.decode(x[:, t], cache, t)
    np.testing.assert_allclose(np.asarray(step), full[:, t], atol=1e-4)


def test_future_tokens_do_not_change_past_logits(model):
  x = tokens()
  y = x.at[:, 12:].set(tokens(seed=1)[:, 12:])
  np.testing.assert_allclose(np.asarray(model(x))[:, :12], np.asarray(model(y))[:, :12], atol=1e-6)
  assert not np.allclose(np.asarray(model(x))[:, 12:], np.asarray(model(y))[:, 12:])


def test_cached_and_uncached_sampling_agree(model):
  graphdef, params = nnx.split(model)
  prompts = tokens(t=6)
  for temp, k in ((0.0, 0), (1.0, 0), (0.8, 5)):
    a = generate(graphdef, params, prompts, jax.random.key(3), 10, temp, k)
    b = generate_without_cache(graphdef, params, prompts, jax.random.key(3), 10, temp, k)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sampling_stops_at_eos(model):
  """After the first EOS a completion is PAD only (random weights draw EOS about 1 time in 259)."""
  graphdef, params = nnx.split(model)
  x = np.asarray(generate(graphdef, params, tokens(b=128, t=4), jax.random.key(0), 20, 1.0, 0))
  rows_with_eos = 0
  for row in x:
    if tok.EOS in row:
      rows_with_eos += 1
      first = list(row).index(tok.EOS)
      assert np.all(row[first + 1 :] == tok.PAD)
    else:
      assert tok.PAD not in row
  assert rows_with_eos >= 2


def test_token_logprobs_match_numpy_log_softmax(model):
  x = tokens()
  logits = np.asarray(model(x), np.float64)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  expected = np.zeros(x.shape)
  xn = np.asarray(x)
  for b in range(x.shape[0]):
    for t in range(1, x.shape[1]):
      expected[b, t] = logits[b, t - 1, xn[b, t]] - lse[b, t - 1]
  np.testing.assert_allclose(np.asarray(token_logprobs(model, x)), expected, atol=1e-4)


def test_masks_cover_completion_and_eos_only():
  recs = [lm_data.Record("12+3=", "abc"), lm_data.Record("7", "")]
  d = lm_data.encode_records(recs, 16)
  assert d["tokens"][0, 0] == tok.BOS
  assert list(d["mask"][0]) == [0] * 6 + [1] * 4 + [0] * 6  # BOS + 5 prompt bytes, 3 bytes + EOS
  assert d["tokens"][0, 9] == tok.EOS and np.all(d["tokens"][0, 10:] == tok.PAD)
  assert list(d["mask"][1]) == [0, 0, 1] + [0] * 13


def test_sequence_logprob_is_the_sum_over_completion_tokens_and_ignores_prompt_and_padding(model):
  graphdef, params = nnx.split(model)
  recs = [lm_data.Record("12+34=", "5+6"), lm_data.Record("9+9=", "18")]
  d = lm_data.encode_records(recs, CFG.max_len)
  logp = np.asarray(
    make_logprob_fn(graphdef)(params, {"tokens": jnp.asarray(d["tokens"])}), np.float64
  )
  cfg = ObjectiveConfig(length_normalise=False)
  loss, _ = iw_sft_loss(jnp.asarray(logp, jnp.float32), None, None, d["mask"], d["weight"], cfg)
  independent = []
  for r in recs:  # log p(completion + EOS | BOS + prompt), token by token through the full model
    seq = [tok.BOS] + tok.encode(r.prompt) + tok.encode(r.completion) + [tok.EOS]
    lg = np.asarray(model(jnp.asarray([seq])), np.float64)[0]
    lp = lg - (
      np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True))
      + lg.max(-1, keepdims=True)
    )
    start = 1 + len(tok.encode(r.prompt))
    independent.append(sum(lp[t - 1, seq[t]] for t in range(start, len(seq))))
  np.testing.assert_allclose(float(loss), -np.mean(independent), rtol=1e-4)
  # Changing prompt or padding tokens' *targets* cannot change the loss: only masked positions
  # count.
  grad = jax.grad(lambda lp: iw_sft_loss(lp, None, None, d["mask"], d["weight"], cfg)[0])(
    jnp.asarray(logp, jnp.float32)
  )
  assert np.all(np.asarray(grad)[d["mask"] == 0] == 0)


def test_verifier_on_hand_written_answers():
  right = "7+5+0=12 4+8+1=13 3+2+1=06 >632"
  assert task.verify("347+285=", right) == (1.0, 1.0)
  assert task.worked_solution(347, 285, 3) == right
  forgot = "7+5+0=12 4+8+0=12 3+2+1=06 >622"  # forgot the carry in column 2
  c, s = task.verify("347+285=", forgot)
  assert c == 0.0 and s == pytest.approx(2 / 4)
  assert task.verify("347+285=", "7+5+0=12 4+8+1=13 3+2+1=06 >633")[0] == 0.0
  assert task.verify("347+285=", "nonsense") == (0.0, 0.0)
  assert task.verify("not a prompt", right) == (0.0, 0.0)
  assert task.verify("999+1=", "9+1+0=10 9+0+1=10 9+0+1=10 >1000") == (1.0, 1.0)


def test_noisy_demonstrations_forget_carries_at_the_given_rate():
  rng = np.random.default_rng(0)
  wrong = [
    task.verify("15+17=", task.worked_solution(15, 17, 2, 0.0, rng, carry_error_rate=0.6))[0]
    for _ in range(4000)
  ]
  np.testing.assert_allclose(1 - np.mean(wrong), 0.6, atol=0.03)


BAD = [
  (b"", "no records"),
  (b'{"prompt": "a", "completion": "b"}\n\n', ":2: empty line"),
  (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n', ":2: malformed JSON"),
  (b'{"prompt": "a"}\n', ":1: need an object"),
  (b'{"prompt": "a", "completion": "\xff"}\n', ":1: not valid UTF-8"),
  (b'{"prompt": "a", "completion": "b", "score": -1}\n', ":1: negative score"),
  (b'{"prompt": "' + b"x" * 80 + b'", "completion": "b"}\n', ":1: prompt of 81 tokens"),
]


@pytest.mark.parametrize("content,needle", BAD, ids=[b[1] for b in BAD])
def test_bad_jsonl_is_one_line_exit_2(tmp_path, content, needle):
  f = tmp_path / "data.jsonl"
  f.write_bytes(content)
  line = lm_command_error(tmp_path / "work", f"--config.data={f}", "--config.stages=finetune")
  assert needle in line


def test_tiny_run_of_all_stages(tmp_path):
  from iwsft.lm.config import get_config
  from iwsft.lm.pipeline import run_lm

  cfg = get_config()
  cfg.model.update(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=48)
  cfg.task.update(digits=1, demos=256, sample_prompts=16, samples_per_prompt=2, eval_problems=16)
  cfg.reference.update(steps=200, batch_size=16, warmup_steps=5)
  cfg.finetune.update(steps=20, batch_size=8, warmup_steps=2)
  cfg.steps_per_dispatch = 20
  result = run_lm(cfg, str(tmp_path), quiet=True)
  assert set(result["models"]) == {"reference", "sft", "iw_sft", "sft_q"}
  assert result["code"].startswith(code_of_checkout())  # the commit that made it
  for m in result["models"].values():
    assert 0.0 <= m["pass@1_greedy"] <= 1.0 and 0.0 <= m["score_sampled"] <= 1.0
  rows = [json.loads(l) for l in open(tmp_path / "samples.jsonl")]
  assert len(rows) == 32 and all(
    set(r) == {"prompt", "completion", "score", "correct"} for r in rows
  )
  curated = [json.loads(l) for l in open(tmp_path / "curated.jsonl")]
  assert len(curated) == sum(r["correct"] for r in rows)
  metrics = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  iw = [r for r in metrics if r["stage"] == "iw_sft" and r["kind"] == "train"]
  assert iw and all("iw/ess_fraction" in r for r in iw)
  from test_tracking import read_scalars  # the same rows in TensorBoard, with the same names

  events = read_scalars(str(tmp_path / "tensorboard"))
  assert events["iw_sft/train/iw/ess_fraction"] == [
    (r["step"], pytest.approx(r["iw/ess_fraction"])) for r in iw
  ]
  # A stage rerun alone reuses the others' outputs.
  cfg.stages = ("evaluate",)
  again = run_lm(cfg, str(tmp_path), quiet=True)
  assert again["models"] == result["models"]
  # A stage redone with overwrite replaces its metrics rows instead of appending a second copy.
  cfg.stages = ("finetune",)
  cfg.methods = ("sft",)
  run_lm(cfg, str(tmp_path), overwrite=True, quiet=True)
  redone = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  sft_rows = [r for r in redone if r["stage"] == "sft"]
  assert [r["step"] for r in sft_rows] == [r["step"] for r in metrics if r["stage"] == "sft"]
  assert [r for r in redone if r["stage"] == "iw_sft"] == [
    r for r in metrics if r["stage"] == "iw_sft"
  ]


@pytest.mark.parametrize("digits,max_len", [(1, 24), (3, 64), (4, 64)])
def test_a_completion_that_never_ends_still_fits_the_context_with_its_eos(
  tmp_path, digits, max_len
):
  from iwsft.lm.config import get_config
  from iwsft.lm.settings import check_settings, load_model

  cfg = get_config()
  cfg.model.max_len = max_len
  cfg.task.digits = digits
  run = load_model(check_settings(cfg))
  prompt = lm_data.prompt_tokens(task.prompt_text(10 ** (digits - 1), 10 ** (digits - 1)))
  assert len(prompt) + run.max_new + 1 == max_len
  longest = "x" * run.max_new  # a sample that used its whole budget without EOS
  lm_data.encode_records(
    [lm_data.Record(task.prompt_text(10 ** (digits - 1), 10 ** (digits - 1)), longest)], max_len
  )


def test_too_short_a_context_is_a_user_error(tmp_path):
  from iwsft.errors import UserError
  from iwsft.lm.config import get_config
  from iwsft.lm.pipeline import prepare

  cfg = get_config()
  cfg.model.max_len = 20
  with pytest.raises(UserError, match="too short"):
    prepare(cfg, str(tmp_path / "w"), quiet=True)
  assert not (tmp_path / "w").exists()


def test_top_1_sampling_is_greedy_decoding(model):
  graphdef, params = nnx.split(model)
  prompts = tokens(b=8, t=5)
  greedy = generate(graphdef, params, prompts, jax.random.key(0), 12, 0.0, 0)
  top1 = generate(graphdef, params, prompts, jax.random.key(1), 12, 1.5, 1)
  np.testing.assert_array_equal(np.asarray(greedy), np.asarray(top1))


# π_ref's stage alone, long enough to be stopped mid-way
REFERENCE_ONLY = [
  *LM_TINY,
  "--config.reference.steps=600",
  "--config.checkpoint_every=50",
  "--config.stages=reference",
]


@pytest.mark.slow
def test_an_lm_stage_stopped_by_sigterm_resumes_to_the_same_parameters(tmp_path):
  import signal
  import time

  def command(work):
    return [
      sys.executable,
      os.path.join(ROOT, "experiments", "lm.py"),
      f"--workdir={work}",
      *REFERENCE_ONLY,
    ]

  whole = subprocess.run(command(tmp_path / "whole"), capture_output=True, text=True, timeout=600)
  assert whole.returncode == 0, whole.stderr[-2000:]
  work = tmp_path / "stopped"
  proc = subprocess.Popen(command(work), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  ckpts = work / "seed_0" / "checkpoints" / "reference"
  while not (ckpts.is_dir() and any(p.isdigit() for p in os.listdir(ckpts))):
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 75, err[-2000:]
  assert not (work / "seed_0" / "reference" / "params").exists()
  again = subprocess.run(command(work), capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-2000:]

  from iwsft.io import checkpoint

  template = nnx.state(
    Transformer(LMConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=48), rngs=nnx.Rngs(0))
  )
  whole = tmp_path / "whole" / "seed_0" / "reference" / "params"
  a = checkpoint.restore_state(str(whole), template)
  b = checkpoint.restore_state(str(work / "seed_0" / "reference" / "params"), template)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  strip = lambda p: [{k: v for k, v in json.loads(l).items() if k != "time_s"} for l in open(p)]
  assert strip(work / "seed_0" / "metrics.jsonl") == strip(
    tmp_path / "whole" / "seed_0" / "metrics.jsonl"
  )


@pytest.mark.parametrize("bad", ["--config.quality_beta=0", "--config.finetune.warmup_steps=10000"])
def test_bad_input_with_overwrite_leaves_a_finished_lm_run_as_it_was(tmp_path, bad):
  """Every setting is checked before --overwrite clears anything."""
  work = tmp_path / "work"
  (work / "iw_sft").mkdir(parents=True)
  files = {"result.json": "{}", "run.json": '{"config": {}}', "iw_sft/params": "weights"}
  for name, text in files.items():
    (work / name).write_text(text)
  r = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "experiments", "lm.py"),
      f"--workdir={work}",
      "--overwrite",
      bad,
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  lines = [l for l in r.stderr.splitlines() if l.strip() and "warn" not in l.lower()]
  assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
  assert {
    os.path.relpath(os.path.join(d, f), work): open(os.path.join(d, f)).read()
    for d, _, fs in os.walk(work)
    for f in fs
  } == files
