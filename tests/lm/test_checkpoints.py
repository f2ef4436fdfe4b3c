"""Pretrained checkpoints against the reference implementation: logits of tiny Llama and Qwen2
checkpoints made by Hugging Face `transformers` (tests/fixtures/hf_reference.py, its own venv), the
SmolLM2 tokenizer built from the GGUF against the ids `transformers` gives with it, the KV cache of
the rotary / grouped-query model, the export round trip, and bad input."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import QWEN2_TINY, lm_command_error, save_tiny_pretrained, write_sum_records
from flax import nnx

from iwsft.errors import UserError
from iwsft.lm import checkpoints
from iwsft.lm.model import LMConfig, Transformer
from iwsft.lm.sampling import generate, generate_without_cache

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")
HF = os.path.join(FIXTURES, "hf")
LM_CONFIG = os.path.join(os.path.dirname(os.path.dirname(FIXTURES)), "iwsft", "lm", "config.py")


@pytest.mark.parametrize("scan_layers", [False, True], ids=["blocks", "scanned"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_logits_match_transformers(arch, scan_layers):
  path = os.path.join(HF, f"tiny-{arch}")
  cfg, graphdef, params = checkpoints.load_hf(path, max_len=64, scan_layers=scan_layers)
  assert cfg.scan_layers == scan_layers
  assert cfg.positions == "rope" and cfg.mlp == "swiglu" and cfg.kv_heads < cfg.n_heads
  assert cfg.qkv_bias == (arch == "qwen2") and cfg.tie_embeddings == (arch == "qwen2")
  ref = np.load(os.path.join(path, "logits.npz"))
  logits = nnx.merge(graphdef, params)(jnp.asarray(ref["ids"]))
  np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_export_reloads_to_the_same_model(arch, tmp_path):
  """save_hf writes what load_hf reads back bit for bit (transformers' reload: `make fixtures`)."""
  cfg, _, params = checkpoints.load_hf(os.path.join(HF, f"tiny-{arch}"), max_len=64)
  checkpoints.save_hf(str(tmp_path), cfg, params)
  cfg2, _, params2 = checkpoints.load_hf(str(tmp_path), max_len=64)
  assert cfg2 == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  hf = json.load(open(tmp_path / "config.json"))
  assert hf["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]]


def test_kv_cache_decoding_equals_the_full_pass_with_rope_and_gqa():
  cfg = LMConfig(**QWEN2_TINY, max_len=24)
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  prompts = jnp.asarray(np.random.default_rng(0).integers(3, 50, (3, 5)), jnp.int32)
  special = (0, 1, 2)
  a = generate(graphdef, params, prompts, jax.random.key(0), 12, 0.0, 0, special)
  b = generate_without_cache(graphdef, params, prompts, jax.random.key(0), 12, 0.0, 0, special)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  model = nnx.merge(graphdef, params)
  full = model(jnp.concatenate([prompts, a[:, :4]], axis=1))
  _, cache = model.prefill(prompts)
  for i in range(4):
    step, cache = model.decode(a[:, i], cache, 5 + i)
    np.testing.assert_allclose(np.asarray(step), np.asarray(full[:, 5 + i]), atol=1e-4)


def test_rope_rotates_pairs_by_position_times_frequency():
  """Against the closed form: dimension j and j + D/2 rotate by angle pos · theta^(-2j/D)."""
  from iwsft.lm.model import rope

  x = np.random.default_rng(1).normal(size=(1, 1, 3, 8)).astype(np.float32)
  pos = np.array([0, 1, 5])
  out = np.asarray(rope(jnp.asarray(x), jnp.asarray(pos), 100.0))
  for t, p in enumerate(pos):
    for j in range(4):
      ang = p * 100.0 ** (-2 * j / 8)
      a, b = x[0, 0, t, j], x[0, 0, t, j + 4]
      np.testing.assert_allclose(
        out[0, 0, t, [j, j + 4]],
        [a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)],
        atol=1e-5,
      )


def test_gguf_tokenizer_gives_the_ids_transformers_gives(smollm2_tokenizer):
  corpus = json.load(open(os.path.join(FIXTURES, "corpus.json")))
  expected = json.load(open(os.path.join(HF, "smollm2_ids.json")))["ids"]
  for text, ids in zip(corpus, expected, strict=True):
    assert smollm2_tokenizer.encode(text) == ids, text
    assert smollm2_tokenizer.tok.decode(ids, skip_special_tokens=False) == text  # exact round trip


def test_chat_prompt_and_completion_end(smollm2_tokenizer):
  tok = smollm2_tokenizer
  ids = tok.prompt("What is 2 + 2?")
  text = tok.tok.decode(ids, skip_special_tokens=False)
  assert text.endswith("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")
  assert tok.token(tok.eos) == "<|im_end|>" and ids.count(tok.encode("<|im_start|>")[0]) == 3
  assert tok.decode(tok.encode("4") + [tok.eos] + tok.encode("junk")) == "4"
  assert [int(c) for c in "1234"] == [
    int(tok.decode([i])) for i in tok.encode("1234")
  ]  # digits split


BAD = [
  ("missing", lambda d: shutil.rmtree(d), "not a Hugging Face model directory"),
  (
    "corrupt",
    lambda d: open(os.path.join(d, "model.safetensors"), "wb").write(b"garbage"),
    "cannot read the checkpoint",
  ),
  (
    "architecture",
    lambda d: _edit_config(d, architectures=["GPT2LMHeadModel"]),
    "architecture 'GPT2LMHeadModel' is not supported",
  ),
  ("shape", lambda d: _edit_config(d, intermediate_size=48), "has shape"),
]


def _edit_config(d, **changes):
  path = os.path.join(d, "config.json")
  config = json.load(open(path))
  config.update(changes)
  json.dump(config, open(path, "w"))


@pytest.mark.parametrize("name,damage,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_checkpoints_are_user_errors(tmp_path, name, damage, needle):
  d = tmp_path / "model"
  shutil.copytree(os.path.join(HF, "tiny-llama"), d)
  damage(str(d))
  with pytest.raises(UserError, match=needle):
    checkpoints.load_hf(str(d))


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, smollm2_tokenizer):
  d = tmp_path / "model"
  shutil.copytree(os.path.join(HF, "tiny-llama"), d)
  smollm2_tokenizer.save(str(d))
  with pytest.raises(UserError, match="do not fit the model's vocabulary of 96"):
    checkpoints.load_model(str(d), max_len=64)


def test_chat_sum_verifier_on_hand_written_answers():
  from iwsft.lm.task import ChatSum

  t = ChatSum(2)
  q = t.prompt(47, 85)
  assert q == "What is 47 + 85?" and t.response_prefix(q) == "47 + 85 = "
  assert t.verify(q, "132.") == (1.0, 1.0)
  assert t.verify(q, "132, since 7 + 5 = 12") == (1.0, 1.0)  # the first integer counts
  assert t.verify(q, "122") == (0.0, 2 / 3)
  assert t.verify(q, "1,232") == (0.0, 2 / 4)  # thousands separators are read
  assert t.verify(q, "a lot") == (0.0, 0.0)


def test_a_pretrained_model_fine_tunes_on_user_records_and_evaluates(tmp_path, smollm2_tokenizer):
  """The pipeline with a Hugging Face directory as π_ref (a tiny random Llama with SmolLM2's
  tokenizer and chat template): every method fine-tunes the top block only, on user records, with
  π_ref's log-probs computed once; evaluation runs the chat task."""
  from iwsft.lm.config import get_config
  from iwsft.lm.pipeline import run_lm

  model_dir, data = tmp_path / "model", tmp_path / "data.jsonl"
  save_tiny_pretrained(model_dir, smollm2_tokenizer)
  write_sum_records(data, [(12, 30), (45, 21), (8, 70)], score=1.0)
  cfg = get_config("smollm2")
  cfg.model.update(path=str(model_dir), train_layers=1)
  cfg.update(data=str(data), stages=("finetune", "evaluate"), steps_per_dispatch=2)
  cfg.task.update(eval_problems=4, max_new=4)
  cfg.finetune.update(steps=4, batch_size=2, warmup_steps=1)
  result = run_lm(cfg, str(tmp_path / "run"), quiet=True)
  assert set(result["models"]) == {"reference", "sft", "iw_sft", "iw_sft_step", "sft_q"}
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  iw = [r for r in rows if r["stage"] == "iw_sft" and r["kind"] == "train"]
  assert iw and all(0 < r["iw/ess_fraction"] <= 1 for r in iw)
  a = checkpoints.load_hf(str(model_dir), 64)[2]
  from iwsft.io import checkpoint

  b = checkpoint.restore_state(str(tmp_path / "run" / "sft" / "params"), a)
  assert np.array_equal(
    np.asarray(a["embed"]["embedding"][...]), np.asarray(b["embed"]["embedding"][...])
  )
  assert np.array_equal(
    np.asarray(a["blocks"][0]["up"]["kernel"][...]), np.asarray(b["blocks"][0]["up"]["kernel"][...])
  )  # frozen
  assert not np.array_equal(
    np.asarray(a["blocks"][1]["up"]["kernel"][...]), np.asarray(b["blocks"][1]["up"]["kernel"][...])
  )  # trained
  # each fine-tuned model is also a Hugging Face directory that reloads to the same weights
  hf_cfg, _, hf = checkpoints.load_hf(str(tmp_path / "run" / "sft" / "hf"), 64)
  assert hf_cfg.n_layers == 2 and (tmp_path / "run" / "sft" / "hf" / "tokenizer.json").exists()
  for x, y in zip(jax.tree.leaves(nnx.to_pure_dict(b)), jax.tree.leaves(nnx.to_pure_dict(hf))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


CLI_BAD = [
  ("nowhere", "does not exist"),
  ("arch", "architecture 'GPT2LMHeadModel' is not supported"),
  ("no-tokenizer", "has no tokenizer.json"),
  ("no-hidden-size", "config.json has no hidden_size"),
]


@pytest.mark.parametrize("case,needle", CLI_BAD, ids=[c[0] for c in CLI_BAD])
def test_bad_pretrained_models_are_one_line_exit_2_and_nothing_is_written(tmp_path, case, needle):

  model = tmp_path / case
  if case != "nowhere":
    shutil.copytree(os.path.join(HF, "tiny-llama"), model)
  if case == "arch":
    _edit_config(str(model), architectures=["GPT2LMHeadModel"])
  if case == "no-hidden-size":
    path = model / "config.json"
    config = json.loads(path.read_text())
    del config["hidden_size"]
    path.write_text(json.dumps(config))
  line = lm_command_error(
    tmp_path / "work", f"--config={LM_CONFIG}:smollm2", f"--config.model.path={model}"
  )
  assert needle in line


def test_a_chat_prompt_longer_than_the_context_is_a_user_error(tmp_path, smollm2_tokenizer):
  from iwsft.lm.config import get_config
  from iwsft.lm.pipeline import prepare

  cfg_m = LMConfig(
    vocab_size=smollm2_tokenizer.vocab_size,
    d_model=16,
    n_layers=1,
    n_heads=2,
    d_ff=16,
    max_len=64,
    positions="rope",
    mlp="swiglu",
  )
  checkpoints.save_hf(
    str(tmp_path / "m"), cfg_m, nnx.state(Transformer(cfg_m, rngs=nnx.Rngs(0))), smollm2_tokenizer
  )
  cfg = get_config("smollm2")
  cfg.model.update(path=str(tmp_path / "m"), max_len=32)
  with pytest.raises(UserError, match="model.max_len 32 is too short"):
    prepare(cfg, str(tmp_path / "w"), quiet=True)
  assert not (tmp_path / "w").exists()


def test_bfloat16_compute_stays_close_to_the_float32_reference():
  import dataclasses

  cfg, _, params = checkpoints.load_hf(os.path.join(HF, "tiny-llama"), max_len=64)
  bf16 = dataclasses.replace(cfg, dtype="bfloat16")
  graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(bf16, rngs=nnx.Rngs(0))))[0]
  ref = np.load(os.path.join(HF, "tiny-llama", "logits.npz"))
  logits = nnx.merge(graphdef, params)(jnp.asarray(ref["ids"]))
  assert logits.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    np.asarray(logits, np.float32), ref["logits"], atol=0.15
  )  # 8-bit mantissa
