"""The language pipeline's stages, each a function of the run's context; each writes its artefacts
to the workdir and is skipped when they exist (unless overwrite), so any stage can be rerun alone:

  reference  train π_ref on noisy demonstrations           reference/params, reference/info.json
             (a pretrained model, model.path, is π_ref as it is: nothing to train)
  sample     k completions per training prompt from π_ref   samples.jsonl
  curate     verified-correct samples / all with scores     curated.jsonl, scored.jsonl
  finetune   SFT, iw-SFT, SFT(Q) from π_ref                 <method>/params, <method>/info.json,
                                                            <method>/hf/ (a pretrained π_ref)
  evaluate   pass@1 (greedy and sampled) on held-out problems    result.json, table.md
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from iwsft.core import curation
from iwsft.core.config import StageConfig, make_optimizer
from iwsft.core.loop import Hooks, fit
from iwsft.core.objectives import ObjectiveConfig
from iwsft.core.sharding import batch_devices, path_keys, shard_pool
from iwsft.core.state import init_state
from iwsft.core.step import Sampling, make_update, pool_logprobs, state_parts
from iwsft.errors import UserError
from iwsft.io import checkpoint, distributed
from iwsft.io import workdir as workdir_lib
from iwsft.io.preemption import PreemptionGuard
from iwsft.io.report import format_table
from iwsft.lm import data as lm_data
from iwsft.lm import lora
from iwsft.lm.answers import MathAnswers
from iwsft.lm.checkpoints import save_hf
from iwsft.lm.model import (
  make_logprob_fn,
  make_trunk_fn,
  matrices,
  param_count,
  stacked,
  tensor_parallel_dim,
  top_layers,
  trainable,
)
from iwsft.lm.sampling import sample_grouped
from iwsft.lm.settings import Model, Settings, encode, prompt_ids


@dataclasses.dataclass(frozen=True)
class Context:
  """What the stages share: settings, π_ref's model, the mesh, the workdir and the metrics log."""

  settings: Settings
  model: Model
  mesh: object
  workdir: str
  overwrite: bool
  quiet: bool
  log: object
  guard: PreemptionGuard
  user_records: list | None  # the records of settings.data, checked whole, or None
  eval_problems: list | None = None  # (prompt, answer) of settings.eval_data, or None

  def path(self, *parts) -> str:
    return os.path.join(self.workdir, *parts)

  def done(self, *parts) -> bool:
    return os.path.exists(self.path(*parts)) and not self.overwrite

  def say(self, text: str) -> None:
    if not self.quiet and distributed.is_primary():
      print(text)

  def write_json(self, name: str, obj) -> None:
    if distributed.is_primary():
      workdir_lib.write_json(self.path(name), obj)

  def write_jsonl(self, name: str, rows: list[dict]) -> None:
    if distributed.is_primary():
      lm_data.write_jsonl(self.path(name), rows)

  def prompt_ids(self, prompt: str) -> list[int]:
    return prompt_ids(self.settings.task, self.model.tok, prompt)

  def encode(self, records, source: str = "data"):
    return encode(self.settings, self.model, records, source)

  def load(self, name: str):
    """A stage's trained parameters (π_ref: the pretrained model as it is)."""
    if name == "reference" and not self.settings.task.pretrains:
      return self.model.init_params
    p = self.path(name, "params")
    if not os.path.exists(p):
      raise UserError(f"stage output {p} is missing: run the stage that makes it first")
    return checkpoint.restore_state(p, self.model.init_params)


def problems(s: Settings, n: int, stream: int, exclude: set | None = None) -> list[tuple[int, int]]:
  """Problems of one stream (demos 1, sampling 2, evaluation 3) of this seed, none in `exclude`."""
  rng = np.random.default_rng([s.seed, stream])
  out: list[tuple[int, int]] = []
  while len(out) < n:
    for p in s.task.problems(n, rng):
      if (exclude is None or p not in exclude) and len(out) < n:
        out.append(p)
  return out


def _tokens_per_s(rows: list[dict], tokens_per_step: int) -> float | None:
  """Training throughput from the loop's rows, leaving out the first chunk (compilation)."""
  tr = [r for r in rows if r["kind"] == "train"]
  if len(tr) < 2:
    return None
  seconds = max(tr[-1]["time_s"] - tr[0]["time_s"], 1e-9)
  return (tr[-1]["step"] - tr[0]["step"]) * tokens_per_step / seconds


def _optimizer(ctx: Context, stage: StageConfig, train_layers: int):
  """The stage's optimiser (weight decay on one layer's matrices); with train_layers, frozen
  parameters get no update and no state (a scanned model's Adam moments cover only the top
  train_layers layers of its stacked leaves)."""
  optimizer = make_optimizer(stage, matrices)
  n = ctx.model.mcfg.n_layers
  if not 0 < train_layers < n:
    return optimizer
  labels = jax.tree_util.tree_map_with_path(
    lambda path, _: "train" if trainable(path, n, train_layers) else "freeze",
    ctx.model.init_params,
  )
  optimizer = optax.multi_transform({"train": optimizer, "freeze": optax.set_to_zero()}, labels)
  return _on_top_layers(optimizer, n, train_layers) if ctx.model.mcfg.scan_layers else optimizer


def _on_top_layers(inner, n_layers: int, train_layers: int) -> optax.GradientTransformation:
  """inner on the top train_layers layers of every stacked leaf (its state sized to them); the
  lower layers' updates are zero."""
  top = lambda tree: top_layers(tree, n_layers, train_layers)

  def pad(path, g, u):
    if not stacked(path_keys(path)):
      return u
    return jnp.concatenate([jnp.zeros_like(g[: n_layers - train_layers]), u.astype(g.dtype)])

  def update(updates, state, params=None):
    new, state = inner.update(top(updates), state, None if params is None else top(params))
    return jax.tree_util.tree_map_with_path(pad, updates, new), state

  return optax.GradientTransformation(lambda params: inner.init(top(params)), update)


def training(ctx: Context, name, params, ref_params, data, stage: StageConfig, objective):
  """(state, update, LoRA graphdef or None) of a training stage from params on the pool `data`.
  With LoRA (fine-tuning from π_ref = params), the state trains adapters on the frozen base
  params, and π_ref is the adapters' initial value (the base model itself)."""
  s = ctx.settings
  track_bounds = ref_params is not None
  parts = state_parts(objective, track_bounds, "logp_ref" in data)
  graphdef = trunk_fn = None
  pack = dict(packed_rows=s.packed_rows, packed_groups=batch_devices(ctx.mesh))
  where = dict(mesh=ctx.mesh, split=tensor_parallel_dim)  # the state made in its shardings
  if s.model.lora_rank and name != "reference":
    m = s.model
    mcfg = lora.with_lora(ctx.model.mcfg, m.lora_rank, m.lora_alpha, m.lora_targets)
    graphdef, adapters = lora.adapters(mcfg, s.seed)
    optimizer = make_optimizer(stage, matrices)
    state = init_state(adapters, optimizer, s.seed, None, **parts, frozen=params, **where)
    logprob_fn = make_logprob_fn(graphdef, **pack)
  else:
    layers = s.model.train_layers if name != "reference" else 0
    optimizer = _optimizer(ctx, stage, layers)
    rows = s.packed_rows if name != "reference" else 0
    logprob_fn = make_logprob_fn(
      ctx.model.graphdef, ctx.model.mcfg.n_layers, layers, 1.0, rows, pack["packed_groups"]
    )
    state = init_state(params, optimizer, s.seed, ref_params, **parts, **where)
    shared = parts["keep_q"] or parts["keep_ref"]  # q's or π_ref's log-probs in the update
    if 0 < layers < ctx.model.mcfg.n_layers and not rows and shared:  # one frozen trunk for all
      trunk_fn = make_trunk_fn(ctx.model.graphdef, ctx.model.mcfg.n_layers, layers)
  ref_fn = None
  if s.ref_temperature != 1.0:
    graph, temperature = graphdef or ctx.model.graphdef, s.ref_temperature
    if trunk_fn is None:
      ref_fn = make_logprob_fn(graph, temperature=temperature, **pack)
    else:  # from the shared trunk, as logprob_fn
      ref_fn = make_logprob_fn(graph, ctx.model.mcfg.n_layers, layers, temperature)
  update = make_update(
    logprob_fn,
    optimizer,
    objective,
    track_bounds,
    skip_nonfinite=s.skip_nonfinite,
    micro_batches=s.micro_batches,
    ref_logprob_fn=ref_fn,
    trunk_fn=trunk_fn,
  )
  return state, update, graphdef


def train(ctx: Context, name, params, ref_params, data, logits, stage, objective: ObjectiveConfig):
  """One training stage from params on the pool `data` drawn ∝ exp(logits); saves and returns
  the trained params (name/params, name/info.json)."""
  s, primary = ctx.settings, distributed.is_primary()
  if ctx.overwrite and primary:
    workdir_lib.remove_outputs(ctx.workdir, [os.path.join("checkpoints", name)])
  distributed.barrier(f"{name}: checkpoints")
  ckpt = None
  if s.checkpoint_every:
    path = ctx.path("checkpoints", name)
    ckpt = checkpoint.TrainCheckpoints(path, s.checkpoint_every, s.keep_checkpoints)
  state, update, lora_graph = training(ctx, name, params, ref_params, data, stage, objective)
  rows = []
  hooks = Hooks(
    logs=[lambda row: (rows.append(row), ctx.log(row))],
    checkpoints=ckpt,
    guard=ctx.guard,
    on_resume=lambda step: ctx.log.drop_stage_after(name, step),
  )
  sampling = Sampling(stage.steps, stage.batch_size, steps_per_dispatch=s.steps_per_dispatch)
  t0 = time.time()
  where = dict(mesh=ctx.mesh, split=tensor_parallel_dim)
  state = fit(update, state, data, logits, sampling, name=name, hooks=hooks, **where)
  params = state.params  # on the devices: never whole in any one process
  if lora_graph is not None:  # the adapters merged into the base model's own layout
    params = lora.merge(lora_graph, params, state.frozen)
  checkpoint.save_state(ctx.path(name, "params"), params)
  if primary:  # the metrics log (and so the final loss) exists in process 0 only
    info = {
      "steps": stage.steps,
      "wall_time_s": round(time.time() - t0, 2),
      "train_tokens_per_s": _tokens_per_s(rows, stage.batch_size * ctx.model.mcfg.max_len),
      "final_loss": [r for r in ctx.log.rows() if r["stage"] == name][-1]["loss"],
    }
    workdir_lib.write_json(ctx.path(name, "info.json"), info)
  return params


def reference(ctx: Context) -> None:
  """π_ref: the pretrained model as it is, or the byte-level model trained on demonstrations."""
  s, m = ctx.settings, ctx.model
  n_params = param_count(m.init_params)
  if not s.task.pretrains:
    return ctx.say(f"reference: the pretrained model, {n_params:,} parameters")
  if ctx.done("reference", "params"):
    return ctx.say("reference: reusing reference/params")
  rng = np.random.default_rng([s.seed, 4])
  records = [
    lm_data.Record(s.task.prompt(a, b), s.task.demonstration(a, b, rng))
    for a, b in problems(s, s.task_cfg.demos, 1)
  ]
  correct = np.mean([s.task.verify(r.prompt, r.completion)[0] for r in records])
  ctx.say(
    f"reference: {n_params:,} parameters, {len(records)} demonstrations "
    f"({100 * correct:.1f}% correct)"
  )
  zeros = np.zeros(len(records), np.float32)
  train(
    ctx,
    "reference",
    m.init_params,
    None,
    ctx.encode(records),
    zeros,
    s.reference,
    s.objectives["reference"],
  )


def sample(ctx: Context) -> None:
  """k completions per training prompt from π_ref, verified and scored: samples.jsonl."""
  if ctx.done("samples.jsonl"):
    return ctx.say("sample: reusing samples.jsonl")
  s, m, c = ctx.settings, ctx.model, ctx.settings.task_cfg
  params = ctx.load("reference")
  prompts = [
    s.task.prompt(a, b)
    for a, b in problems(s, c.sample_prompts, 2)
    for _ in range(c.samples_per_prompt)
  ]
  t0 = time.time()
  comps = sample_grouped(
    m.graphdef,
    params,
    [ctx.prompt_ids(p) for p in prompts],
    jax.random.key(s.seed + 7),
    m.max_new,
    c.sample_temperature,
    s.top_k,
    special=m.special,
  )
  seconds = time.time() - t0
  rows = []
  for p, comp in zip(prompts, comps):
    text = m.tok.decode(comp)
    correct, score = s.task.verify(p, text)
    rows.append({"prompt": p, "completion": text, "score": score, "correct": correct})
  ctx.write_jsonl("samples.jsonl", rows)
  acc = float(np.mean([r["correct"] for r in rows]))
  info = {"samples": len(rows), "correct_fraction": acc, "seconds": round(seconds, 2)}
  info["sample_tokens_per_s"] = len(rows) * m.max_new / seconds
  ctx.write_json("sample_info.json", info)
  ctx.say(f"sample: {len(rows)} samples, {100 * acc:.1f}% verified correct")


def curate(ctx: Context) -> None:
  """The verified-correct samples (curated.jsonl), and all samples with scores (scored.jsonl)."""
  if ctx.done("curated.jsonl") and ctx.done("scored.jsonl"):
    return ctx.say("curate: reusing curated.jsonl and scored.jsonl")
  rows = [json.loads(line) for line in open(ctx.path("samples.jsonl"))]
  strip = lambda r: {"prompt": r["prompt"], "completion": r["completion"], "score": r["score"]}
  keep = [strip(r) for r in rows if r["correct"]]
  if not keep:
    raise UserError(
      "no verified-correct samples to fine-tune on: sample more (task.sample_prompts)"
      " or train the reference model longer"
    )
  ctx.write_jsonl("curated.jsonl", keep)
  ctx.write_jsonl("scored.jsonl", [strip(r) for r in rows])
  ctx.say(f"curate: {len(keep)} of {len(rows)} samples verified correct")


def _with_ref_logprobs(ctx: Context, data: dict, ref) -> dict:
  """The pool placed on the mesh (each process its rows) with π_ref's log-probs ("logp_ref" [N',
  T], split over the devices as the pool), computed once through the sharded pool path (π_ref is
  frozen)."""
  placed = shard_pool(data, ctx.mesh)
  logprob = make_logprob_fn(ctx.model.graphdef, temperature=ctx.settings.ref_temperature)
  return {**placed, "logp_ref": pool_logprobs(logprob, ref, placed, ctx.mesh)}


def pool(ctx: Context, source: str, ref) -> tuple[list, dict]:
  """The records of a fine-tuning source and their encoded pool; with precompute_ref, π_ref's
  log-probs too, where the data is at most one epoch of the stage (so that it costs less)."""
  s = ctx.settings
  records = ctx.user_records if source == s.data else lm_data.read_jsonl(source)
  data = ctx.encode(records, source)
  if s.precompute_ref and len(records) <= s.finetune.steps * s.finetune.batch_size:
    data = _with_ref_logprobs(ctx, data, ref)
  return records, data


def finetune(ctx: Context) -> None:
  """Each method fine-tuned from π_ref on its data: the curated samples (scored ones for sft_q)."""
  s = ctx.settings
  ref = ctx.load("reference")
  pools = {}  # source -> (records, encoded pool): the curated set serves several methods
  for method in s.methods:
    if ctx.done(method, "params"):
      ctx.say(f"finetune: reusing {method}/params")
      continue
    if ctx.user_records is not None:
      source = s.data
    else:
      source = ctx.path("scored.jsonl" if method == "sft_q" else "curated.jsonl")
    if source not in pools:
      pools[source] = pool(ctx, source, ref)
    records, data = pools[source]
    logits = np.zeros(len(records), np.float32)
    if method == "sft_q":
      logits = curation.quality_logits(np.array([r.score for r in records]), s.quality_beta)
    params = train(
      ctx, method, ref, ref, data, logits.astype(np.float32), s.finetune, s.objectives[method]
    )
    ctx.say(f"finetune: {method} on {len(records)} records")
    if s.export_hf and not s.task.pretrains:  # a collective: process 0 writes
      save_hf(ctx.path(method, "hf"), ctx.model.mcfg, params, ctx.model.tok, s.export_dtype)
      ctx.say(f"finetune: {method} written as a Hugging Face directory, {method}/hf/")


def _pass_at_1(ctx: Context, name: str, prompts: list[str], tokens: list, verify) -> dict:
  """A model's pass@1 and partial score on the prompts, greedy and sampled; verify(prompt,
  completion) -> (correct, partial score)."""
  s, m = ctx.settings, ctx.model
  params = ctx.load(name)
  res = {}
  for mode, temp in (("greedy", 0.0), ("sampled", s.eval_temperature)):
    key = jax.random.key(s.seed + 11)
    comps = sample_grouped(
      m.graphdef, params, tokens, key, m.max_new, temp, s.top_k, special=m.special
    )
    texts = [m.tok.decode(x) for x in comps]
    scores = np.array([verify(p, t) for p, t in zip(prompts, texts)])
    res[f"pass@1_{mode}"] = float(scores[:, 0].mean())
    res[f"correct_{mode}"] = [int(x) for x in scores[:, 0]]  # per problem: paired tests
    res[f"score_{mode}"] = float(scores[:, 1].mean())
  info = ctx.path(name, "info.json")
  if os.path.exists(info):
    res["train_tokens_per_s"] = json.load(open(info))["train_tokens_per_s"]
  return res


def evaluate(ctx: Context) -> dict:
  """pass@1 of π_ref and every method on held-out problems (or settings.eval_data's benchmark,
  answers checked with math-verify): result.json and table.md."""
  s, c = ctx.settings, ctx.settings.task_cfg
  if ctx.eval_problems is not None:
    prompts, verify = [p for p, _ in ctx.eval_problems], MathAnswers(ctx.eval_problems).verify
  else:
    seen = set(problems(s, c.sample_prompts, 2))
    if s.task.pretrains:
      seen |= set(problems(s, c.demos, 1))
    held_out = problems(s, c.eval_problems, 3, exclude=seen)
    prompts, verify = [s.task.prompt(a, b) for a, b in held_out], s.task.verify
  tokens = [ctx.prompt_ids(p) for p in prompts]
  models = {n: _pass_at_1(ctx, n, prompts, tokens, verify) for n in ["reference", *s.methods]}
  result = {
    "seed": s.seed,
    "eval_data": s.eval_data or None,
    "eval_problems": len(prompts),
    "models": models,
    "parameters": param_count(ctx.model.init_params),
    "config": s.config,
    "code": workdir_lib.code_version(),
  }
  if os.path.exists(ctx.path("sample_info.json")):
    result["sampling"] = json.load(open(ctx.path("sample_info.json")))
  ctx.write_json("result.json", result)
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
  if distributed.is_primary():
    with open(ctx.path("table.md"), "w") as f:
      f.write(text + "\n")
  ctx.say(text)
  return result


STAGE_FUNCTIONS = {
  "reference": reference,
  "sample": sample,
  "curate": curate,
  "finetune": finetune,
  "evaluate": evaluate,
}
