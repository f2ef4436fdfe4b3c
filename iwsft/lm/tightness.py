"""The bound claim tested directly: J(θ) and its two lower bounds along fine-tuning, on a task
whose π_ref is known exactly (the byte-level model, sampled at temperature 1 with every token
allowed: the curated data are exactly π_ref's samples that the verifier accepts).

  J(θ)        = E_{y~π_θ}[R(y)]                                 (sampled from π_θ)
  SFT bound   = E_{y~π_ref}[R(y) (1 + log π_θ(y) − log π_ref(y))]
  iw-SFT bound= E_{y~π_ref}[R(y) q(y)/π_ref(y) (1 + log π_θ(y) − log q(y))]
  IS estimate = E_{y~π_ref}[R(y) π_θ(y)/π_ref(y)]                = J(θ), unbiased

with whole-sequence log-likelihoods (no length normalisation, no clipping, no temperature), each
expectation over held-out prompts (none seen in training) and estimated from fresh samples. Both
bounds are ≤ J(θ) for any θ and q (x ≥ 1 + log x); the paper's claim is that the iw-SFT bound,
with q a lagged copy of θ, is the tighter one and stays tighter as θ moves away from π_ref.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from iwsft.core.loop import fit
from iwsft.core.step import Sampling
from iwsft.errors import UserError
from iwsft.lm import data as lm_data
from iwsft.lm.model import make_logprob_fn, tensor_parallel_dim
from iwsft.lm.sampling import sample_grouped
from iwsft.lm.stages import Context, pool, problems, training

# Problem streams of stages.problems that no stage uses: bound samples, J's prompts.
BOUND_STREAM, J_STREAM = 5, 6


@dataclasses.dataclass(frozen=True)
class Probe:
  """What every evaluation point reads.

  data: π_ref's held-out samples encoded ({"tokens", "mask"} [N, T]); reward [N] ∈ {0, 1};
  l_ref [N]: their log-likelihoods under π_ref; j_prompts / j_tokens: the prompts J is sampled on.
  """

  data: dict
  reward: np.ndarray
  l_ref: np.ndarray
  j_prompts: list
  j_tokens: list


def _held_out(ctx: Context, n: int, stream: int) -> list:
  s, c = ctx.settings, ctx.settings.task_cfg
  seen = set(problems(s, c.sample_prompts, 2)) | set(problems(s, c.demos, 1))
  return [s.task.prompt(a, b) for a, b in problems(s, n, stream, exclude=seen)]


def _sample(ctx: Context, params, prompts: list, key) -> tuple[list, np.ndarray]:
  """One completion per prompt at temperature 1, all tokens allowed: (texts, rewards [N])."""
  m, task = ctx.model, ctx.settings.task
  comps = sample_grouped(
    m.graphdef,
    params,
    [ctx.prompt_ids(p) for p in prompts],
    key,
    m.max_new,
    1.0,
    0,
    special=m.special,
  )
  texts = [m.tok.decode(x) for x in comps]
  return texts, np.array([task.verify(p, t)[0] for p, t in zip(prompts, texts)], np.float64)


def sequence_logprobs(graphdef, params, data: dict, batch: int = 256) -> np.ndarray:
  """Σ_t mask · log p(token_t | tokens_<t): each row's completion log-likelihood [N] (float64)."""
  fn = jax.jit(make_logprob_fn(graphdef))
  out = []
  for i in range(0, len(data["tokens"]), batch):
    lp = np.asarray(fn(params, {"tokens": data["tokens"][i : i + batch]}), np.float64)
    out.append((lp * data["mask"][i : i + batch]).sum(axis=1))
  return np.concatenate(out)


def make_probe(ctx: Context, ref_params, bound_prompts: int, j_prompts: int, seed: int) -> Probe:
  """Fresh π_ref samples on `bound_prompts` held-out prompts, and `j_prompts` others for J."""
  prompts = _held_out(ctx, bound_prompts, BOUND_STREAM)
  texts, reward = _sample(ctx, ref_params, prompts, jax.random.key(seed + 101))
  data = ctx.encode([lm_data.Record(p, t) for p, t in zip(prompts, texts)], "π_ref samples")
  l_ref = sequence_logprobs(ctx.model.graphdef, ref_params, data)
  j_list = _held_out(ctx, j_prompts, J_STREAM)
  return Probe(data, reward, l_ref, j_list, [ctx.prompt_ids(p) for p in j_list])


def bound_terms(reward, l_theta, l_q, l_ref) -> dict[str, np.ndarray]:
  """Per-sample terms [N] whose means over π_ref's samples estimate each quantity."""
  r = np.asarray(reward, np.float64)
  l_theta, l_q, l_ref = (np.asarray(x, np.float64) for x in (l_theta, l_q, l_ref))
  w = np.where(r > 0, np.exp(np.minimum(l_q - l_ref, 700.0)), 0.0)
  return {
    "bound_sft": r * (1.0 + l_theta - l_ref),
    "bound_iw": w * (1.0 + l_theta - l_q),
    "is_estimate": np.where(r > 0, np.exp(np.minimum(l_theta - l_ref, 700.0)), 0.0),
    "kl_ref_theta": l_ref - l_theta,  # its mean: KL(π_ref ‖ π_θ) over the held-out prompts
  }


def _mean_se(x: np.ndarray) -> tuple[float, float]:
  return float(np.mean(x)), float(np.std(x, ddof=1) / np.sqrt(len(x)))


def point(ctx: Context, probe: Probe, params, q_params, key) -> dict:
  """J(θ) (sampled), both bounds and the IS estimate (on the probe), each as mean and s.e.

  The bounds' difference is paired (the same samples): its s.e. is that of the per-sample
  difference. ess: the effective sample size fraction of q/π_ref over the correct samples."""
  g = ctx.model.graphdef
  l_theta = sequence_logprobs(g, params, probe.data)
  l_q = l_theta if q_params is None else sequence_logprobs(g, q_params, probe.data)
  terms = bound_terms(probe.reward, l_theta, l_q, probe.l_ref)
  terms["iw_minus_sft"] = terms["bound_iw"] - terms["bound_sft"]
  _, r_theta = _sample(ctx, params, probe.j_prompts, key)
  terms["J"] = r_theta
  row = {}
  for k, x in terms.items():
    row[k], row[f"{k}_se"] = _mean_se(x)
  w = np.exp(np.minimum(l_q - probe.l_ref, 700.0))[probe.reward > 0]
  row["ess"] = float(w.sum() ** 2 / max((w**2).sum(), 1e-300) / max(len(w), 1))
  return row


def trace(ctx: Context, method: str, probe: Probe, points: list[int], seed: int) -> list[dict]:
  """Fine-tunes π_ref with `method` on the curated samples (the pipeline's finetune stage, stopped
  after each of `points` updates, increasing from 0) and returns point() at each. J is sampled
  with one key at every point (common random numbers across steps and methods)."""
  s = ctx.settings
  exact = s.task_cfg.sample_temperature == 1.0 and s.top_k == 0 and s.ref_temperature == 1.0
  if not s.task.pretrains or s.model.lora_rank or not exact:
    raise UserError(
      "the bound check needs π_ref known exactly: the byte-level model without LoRA, sampled at"
      " task.sample_temperature 1 with top_k 0 and ref_temperature 1"
    )
  if (
    points[0] != 0
    or any(b <= a for a, b in zip(points, points[1:]))
    or points[-1] > s.finetune.steps
  ):
    raise UserError(f"points must rise from 0 to at most finetune.steps ({s.finetune.steps})")
  ref = ctx.load("reference")
  records, data = pool(ctx, ctx.path("curated.jsonl"), ref)
  logits = np.zeros(len(records), np.float32)
  state, update, _ = training(ctx, method, ref, ref, data, s.finetune, s.objectives[method])
  key = jax.random.key(seed + 202)
  rows = [{"method": method, "step": 0, **point(ctx, probe, ref, None, key)}]
  for done, target in zip(points, points[1:]):
    sampling = Sampling(
      target - done, s.finetune.batch_size, steps_per_dispatch=s.steps_per_dispatch
    )
    where = dict(mesh=ctx.mesh, split=tensor_parallel_dim)
    state = fit(update, state, data, logits, sampling, name=f"{method} {done}+", **where)
    row = point(ctx, probe, state.params, state.q_params, key)
    rows.append({"method": method, "step": target, **row})
  return rows
