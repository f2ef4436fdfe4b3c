"""Configuration of the language pipeline (sized for a 2-core CPU): an ml_collections config file.

  experiments/lm.py --config.finetune.steps=800 --config.methods=sft --config.methods=iw_sft

The iw-SFT settings follow the authors' LM recipe (docs/objectives.md): temperature 1, sequence
weights clipped to [0, 16] without batch normalisation, per-token variant clipped to [0.2, 1.8],
token-mean loss, Adam betas (0.9, 0.95), weight decay 1e-4, cosine schedule with 5% warm-up.
Their q is the detached current model (q_decay 0); ours defaults to a lagged copy (0.9), as the
bound asks for a q close to but not equal to the trained policy; set objective.q_decay=0 for theirs.
"""

from __future__ import annotations

import ml_collections

from iwsft.core.config import log_section, objective_section, stage_section

LM_METHODS = ("sft", "iw_sft", "iw_sft_step", "sft_q")
WEIGHTED = ("iw_sft", "iw_sft_step")  # iw_sft_step: one weight per token
UNWEIGHTED = {"iw_sft": "sft", "iw_sft_step": "sft"}  # each weighted method with every weight 1
PRESETS = ("tiny", "smollm2", "smollm2-5epochs", "s1k")
STAGES = ("reference", "sample", "curate", "finetune", "evaluate")


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  """preset "tiny": a byte-level model trained from scratch on worked additions (π_ref);
  "smollm2": the pretrained SmolLM2-135M-Instruct as π_ref on natural-language additions;
  "smollm2-5epochs": the same, trained as far as the authors' recipe (below); "s1k": the
  authors' 32B run."""
  if preset not in PRESETS:
    raise ValueError(f"unknown language preset {preset!r}; choose from {', '.join(PRESETS)}")
  c = ml_collections.ConfigDict()
  c.pipeline = "lm"
  c.seed = 0
  c.stages = STAGES  # any subset, run in this order
  c.methods = ("sft", "iw_sft", "sft_q")  # of LM_METHODS; π_ref ("reference") is always evaluated
  c.data = ""  # a JSON-lines file of curated records to fine-tune on instead of stages 2-3
  # a JSON-lines math benchmark, {"prompt", "answer"} a line, that the evaluate stage scores
  # instead of the task's problems (answers checked with math-verify: lm/answers.py)
  c.eval_data = ""
  c.num_devices = 0  # 0: all devices
  c.fsdp = 1  # devices each large parameter (and its optimiser state) is split over
  # devices each block's attention heads and MLP units are split over (Megatron-style tensor
  # parallelism, the mesh's model axis); divides the key/value heads and the MLP width
  c.tensor_parallel = 1
  c.micro_batches = 1  # gradients accumulated over this many parts of each batch (same update)
  # each (micro-)batch's sequences packed end to end into this many rows of the context, when
  # they fit (the same log-probs, loss and gradients at less cost); 0: every sequence padded
  c.packed_rows = 0
  c.compute = _compute_section()
  c.model = _model_section()
  c.task = _task_section()
  # Stage 1 trains π_ref on the demonstrations; stage 4 fine-tunes it on the curated samples.
  c.reference, c.finetune = _stage_sections()

  # iw-SFT (fields of core.objectives.ObjectiveConfig); "step" weights each token.
  c.objective = objective_section(
    temperature=1.0,
    w_max=16.0,
    self_normalise=False,
    step_w_min=0.2,
    step_w_max=1.8,
    reduction="token_mean",
  )
  c.quality_beta = 0.1  # SFT(Q): sample ∝ exp(normalised score / beta)

  c.eval_temperature = 1.0  # the sampled pass@1
  c.top_k = 0  # sampling (stage 2 and sampled evaluation) from the k most likely tokens; 0: all
  c.steps_per_dispatch = 100  # updates per jitted call (lax.scan)
  # π_ref's log-probs of the fine-tuning data once, not in every batch (where the data is at most
  # one epoch of the stage, so that it costs less)
  c.precompute_ref = False
  # π_ref's log-probs are the model's at this temperature. 1: the model as it is (the authors'
  # choice: π_ref = the starting model); task.sample_temperature (with top_k 0): exactly the
  # distribution the curated samples were drawn from
  c.ref_temperature = 1.0
  # write each method's fine-tuned pretrained model as a Hugging Face directory, <method>/hf/
  # (float32 safetensors, config.json and the tokenizer); the byte-level model has no HF form
  c.export_hf = True
  c.export_dtype = "float32"  # of the Hugging Face weights: "float32" or "bfloat16"

  # Where metrics go besides metrics.jsonl: TensorBoard (tensorboard), Weights & Biases (wandb,
  # wandb_project, wandb_mode offline|online, wandb_group).
  c.log = log_section()
  c.checkpoint_every = 500  # save the training state every this many updates; 0: never
  c.keep_checkpoints = 2  # latest checkpoints kept per stage
  c.skip_nonfinite = False  # skip NaN/inf batches instead of stopping with exit status 1
  if preset.startswith("smollm2"):
    _smollm2(c)
  if preset == "smollm2-5epochs":
    _smollm2_5epochs(c)
  if preset == "s1k":
    _s1k(c)
  return c


def _compute_section() -> ml_collections.ConfigDict:
  """How the model computes (the same function, less memory for long sequences; lm/model.py):
  attention "full", "chunked" (queries attention_chunk at a time), "dot_product"
  (jax.nn.dot_product_attention, implementation chosen by JAX: XLA's), "cudnn" (its cuDNN
  fused kernel; GPUs only) or "splash" (Pallas's splash kernel; TPUs only); remat "none",
  "full" or "dots" (recompute each block in the backward pass); logits_chunk: token log-probs
  that many positions at a time."""
  return ml_collections.ConfigDict(
    {"attention": "full", "attention_chunk": 512, "remat": "none", "logits_chunk": 0}
  )


def _stage_sections() -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """(reference, finetune): the byte-level model's π_ref training and its fine-tuning."""
  lm_stage = dict(schedule="cosine", weight_decay=1e-4, adam_b2=0.95)
  reference = stage_section(
    steps=2_000, batch_size=64, learning_rate=3e-3, warmup_steps=100, **lm_stage
  )
  finetune = stage_section(
    steps=400, batch_size=64, learning_rate=3e-4, warmup_steps=20, **lm_stage
  )
  return reference, finetune


def _model_section() -> ml_collections.ConfigDict:
  """lm/model.py's LMConfig for the byte-level model, or a pretrained checkpoint (path)."""
  m = ml_collections.ConfigDict()  # lm/model.py's LMConfig, or a pretrained checkpoint
  m.path = ""  # "": the byte-level model below; "smollm2", a Hugging Face dir or a .gguf file
  m.d_model = 64
  m.n_layers = 3
  m.n_heads = 4
  m.d_ff = 256
  m.max_len = 64  # the context (tokens)
  m.dtype = "float32"  # compute type ("bfloat16" halves activations)
  # the parameters' type, and Adam's moments' unless finetune.moment_dtype says otherwise
  m.param_dtype = "float32"
  m.train_layers = 0  # fine-tune only the top this many blocks (and the final norm); 0: all
  # the blocks stacked and run by one lax.scan: one block compiled whatever the depth (the
  # parameters' layout: blocks/qkv/kernel [n_layers, ...]; checkpoints load and export as usual)
  m.scan_layers = False
  # LoRA: fine-tune low-rank adapters (rank lora_rank, output scaled by lora_alpha / lora_rank)
  # beside the lora_targets projections of every block instead of the model; 0: the whole model
  m.lora_rank = 0
  m.lora_alpha = 16.0
  m.lora_targets = ("qkv", "proj", "up", "down")
  return m


def _task_section() -> ml_collections.ConfigDict:
  """lm/task.py's task, its demonstrations, sampling and evaluation."""
  t = ml_collections.ConfigDict()  # lm/task.py
  t.kind = "columns"  # "columns": worked column additions; "chat_sum": "What is a + b?"
  t.digits = 3
  t.demos = 20_000  # noisy demonstrations the byte-level π_ref is trained on
  t.error_rate = 0.05  # random column mistakes
  t.carry_error_rate = 0.6  # systematic "forgets the carry" mistakes
  t.sample_prompts = 1_000  # training prompts sampled from π_ref
  t.samples_per_prompt = 4
  t.sample_temperature = 1.0
  t.eval_problems = 500  # held-out problems for pass@1
  t.max_new = 0  # tokens sampled per completion; 0: what the context leaves after the prompt
  return t


def _smollm2(c: ml_collections.ConfigDict) -> None:
  """The paper's LM experiment in miniature, at a 2-core CPU's scale, with the authors' LM recipe:
  q the current model detached, sequence weights exp(mean token log-ratio) clipped to [0, 16],
  per-token clip [0.2, 1.8], the loss a per-sequence token mean, AdamW (0.9, 0.95) with weight
  decay 1e-4 on matrices, gradient clipping at 1.0, cosine schedule with 5% warm-up."""
  c.model.update(path="smollm2", max_len=64, train_layers=6)
  c.precompute_ref = True
  c.task.update(
    kind="chat_sum",
    digits=2,
    sample_prompts=256,
    samples_per_prompt=4,
    sample_temperature=0.7,
    eval_problems=100,
    max_new=8,
  )
  c.methods = LM_METHODS
  c.eval_temperature = 0.7
  c.finetune.update(steps=40, batch_size=8, learning_rate=3e-5, warmup_steps=2, clip_norm=1.0)
  c.objective.update(reduction="sequence_mean", q_decay=0.0)
  c.steps_per_dispatch = 10
  c.checkpoint_every = 0


def _smollm2_5epochs(c: ml_collections.ConfigDict) -> None:
  """The SmolLM2 experiment where the policy moves as far as in the authors' run: twice the
  training prompts (512 × 4 samples; at π_ref's ~21% pass rate ~430 curated), 270 updates of 8
  (~5 epochs over them, the authors' count), 500 held-out problems for a paired-by-problem
  test, SFT and iw-SFT only; checkpoints every 30 updates, so a stopped run resumes."""
  c.task.update(sample_prompts=512, eval_problems=500)
  c.methods = ("sft", "iw_sft")
  c.finetune.update(steps=270, warmup_steps=14)
  c.checkpoint_every = 30


def _s1k(c: ml_collections.ConfigDict) -> None:
  """The authors' LM run: Qwen2.5-32B-Instruct fine-tuned on s1K-1.1's 1,000 reasoning traces,
  their recipe: q the current model detached, π_ref the starting model (its log-probs computed
  once), sequence weights exp(mean token log-ratio) clipped to [0, 16], per-token clip [0.2, 1.8],
  a per-sequence token mean, AdamW (0.9, 0.95) with weight decay 1e-4 on matrices, clipping at
  1.0, learning rate 1e-5 on a cosine schedule with 5% warm-up, 8 sequences a step for 5 epochs
  (625 steps), bfloat16 compute, contexts up to 22,000 tokens, gradient checkpointing (here with
  the blocks scanned). A GPU/TPU
  job on 8 devices: give the model's Hugging Face directory (model.path) and the traces as
  JSON lines of {"prompt", "completion"} (data). It fine-tunes only (stages: finetune); add the
  evaluate stage and eval_data (a math benchmark such as AIME24 as JSON lines of {"prompt",
  "answer"}) for pass@1 checked with math-verify. GPQA-Diamond is not built."""
  c.model.update(path="", max_len=22_000, dtype="bfloat16", scan_layers=True)
  c.task.kind = "chat_sum"  # a pretrained model's chat template; its problems are not used
  c.stages = ("finetune",)
  c.methods = ("sft", "iw_sft", "iw_sft_step")
  c.precompute_ref = True
  c.fsdp = 8
  c.finetune.update(steps=625, batch_size=8, learning_rate=1e-5, warmup_steps=31, clip_norm=1.0)
  c.objective.update(reduction="sequence_mean", q_decay=0.0)
  c.compute.update(attention="chunked", attention_chunk=1024, remat="full", logits_chunk=1024)
  c.steps_per_dispatch = 25
  c.checkpoint_every = 125
