"""The paper's objectives as pure, jit-able functions of per-step log-probabilities.

Both pipelines reduce a batch to the same shapes, so every objective here serves both:

  logp:  [B, T]  log π_θ(a_t | s_t) per step (control) or per completion token (language)
  mask:  [B, T]  1 for real steps / completion tokens, 0 for padding and prompt tokens
  weight:[B]     per-sequence data weight (1, or a quality weight for SFT(Q) in "weight" mode)

A "sequence" is an episode (control) or a completion (language). Its log-likelihood is the masked
sum of step log-probs, divided by its length when `length_normalise` (the authors' choice).

iw-SFT (Qin & Springenberg, 2025) multiplies each sequence's loss by w = q(τ)/π_ref(τ), computed in
log space, tempered, clipped and optionally self-normalised, and held constant (stop-gradient). With
q = π_ref every weight is 1 and iw-SFT is plain SFT.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

Array = jax.Array

WEIGHTINGS = ("none", "sequence", "step")
REDUCTIONS = ("sequence_mean", "token_mean")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Settings of the weighted NLL; defaults are the authors' control recipe (iwsft.recipes and
  docs/objectives.md give both of their recipes).

  importance_weighting: "none" (SFT / BC), "sequence" (one weight per episode or completion), or
    "step" (one weight per step or token, the paper's per-step variant).
  temperature: multiplies the log-ratio before exponentiation (10 for control, 1 for language).
  w_min, w_max: clip range of the sequence weight (0 means no lower bound).
  self_normalise: divide sequence weights by their batch mean (the authors divide by the batch
    sum; ours differs by the constant batch size, so that q = π_ref gives exactly SFT).
  step_w_min, step_w_max: clip range of the per-step weights.
  length_normalise: divide each sequence's log-likelihood and log-ratio by its length.
  reduction: "sequence_mean" averages per-sequence losses over the batch (control); "token_mean"
    sums weighted token NLL over the batch and divides by the number of tokens (the authors' LM
    loss).
  q_decay: the auxiliary policy q follows the trained one, q ← q_decay · q + (1 − q_decay) · θ after
    every update (0.9, the authors' control recipe); 0 makes q the current policy, detached (their
    LM recipe).
  step_normalise: divide the per-step weights by their sum over all B × T entries, a padding entry
    counting 1 (the authors' control code does this; it rescales the loss by about 1 / (B·T)).
  """

  importance_weighting: Literal["none", "sequence", "step"] = "none"
  temperature: float = 10.0
  w_min: float = 0.0
  w_max: float = 1000.0
  self_normalise: bool = True
  step_w_min: float = 0.0
  step_w_max: float = 2.0
  length_normalise: bool = True
  reduction: Literal["sequence_mean", "token_mean"] = "sequence_mean"
  q_decay: float = 0.9
  step_normalise: bool = False

  def __post_init__(self):
    if self.importance_weighting not in WEIGHTINGS:
      raise ValueError(
        f"importance_weighting must be one of {WEIGHTINGS}, got {self.importance_weighting!r}"
      )
    if self.reduction not in REDUCTIONS:
      raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
    if not 0.0 <= self.w_min < self.w_max:
      raise ValueError(f"need 0 <= w_min < w_max, got [{self.w_min}, {self.w_max}]")
    if not 0.0 <= self.step_w_min < self.step_w_max:
      raise ValueError(
        f"need 0 <= step_w_min < step_w_max, got [{self.step_w_min}, {self.step_w_max}]"
      )
    if self.temperature <= 0:
      raise ValueError(f"temperature must be > 0, got {self.temperature}")
    if not 0.0 <= self.q_decay < 1.0:
      raise ValueError(f"q_decay must be in [0, 1), got {self.q_decay}")

  @property
  def uses_weights(self) -> bool:
    return self.importance_weighting != "none"


def sequence_lengths(mask: Array) -> Array:
  """[B, T] mask -> [B] number of real steps (at least 1, so empty padding rows stay finite)."""
  return jnp.maximum(mask.sum(axis=-1), 1.0)


def sequence_logprob(logp: Array, mask: Array, length_normalise: bool = True) -> Array:
  """[B, T] step log-probs -> [B] sequence log-likelihood (mean over steps if length_normalise)."""
  total = jnp.sum(logp * mask, axis=-1)
  return total / sequence_lengths(mask) if length_normalise else total


def _log_clip(log_w: Array, lo: float, hi: float) -> tuple[Array, Array]:
  """Clips log-weights to [log lo, log hi]; also returns a 0/1 array of where clipping acted."""
  log_hi = jnp.log(hi)
  log_lo = jnp.log(lo) if lo > 0 else -jnp.inf
  clipped = (log_w > log_hi) | (log_w < log_lo)
  return jnp.clip(log_w, log_lo, log_hi), clipped.astype(log_w.dtype)


def sequence_log_ratio(logp_q: Array, logp_ref: Array, mask: Array, cfg: ObjectiveConfig) -> Array:
  """[B] log q(τ) − log π_ref(τ) summed over steps (divided by length if cfg.length_normalise)."""
  return sequence_logprob(logp_q - logp_ref, mask, cfg.length_normalise)


def sequence_weights(
  logp_q: Array, logp_ref: Array, mask: Array, valid: Array, cfg: ObjectiveConfig
) -> tuple[Array, dict[str, Array]]:
  """Per-sequence importance weights w = clip(exp(temp · log-ratio)), optionally self-normalised.

  Args:
    logp_q: [B, T] step log-probs under q.
    logp_ref: [B, T] step log-probs under π_ref.
    mask: [B, T] step mask.
    valid: [B] 1 for sequences that count in the batch (0 for padding rows).
  Returns:
    w: [B] stop-gradient weights (0 on invalid rows), and a dict of diagnostics.
  """
  log_w = cfg.temperature * sequence_log_ratio(logp_q, logp_ref, mask, cfg)
  log_w, clipped = _log_clip(log_w, cfg.w_min, cfg.w_max)
  w = jnp.exp(log_w) * valid
  n_valid = jnp.maximum(valid.sum(), 1.0)
  if cfg.self_normalise:
    w = w * n_valid / jnp.maximum(w.sum(), jnp.finfo(w.dtype).tiny)
  w = jax.lax.stop_gradient(w)
  diag = {
    "iw/ess_fraction": effective_sample_size(w, valid) / n_valid,
    "iw/clip_fraction": jnp.sum(clipped * valid) / n_valid,
    "iw/max_weight": jnp.max(w),
    "iw/mean_log_ratio": jnp.sum(log_w * valid) / n_valid / cfg.temperature,
  }
  return w, diag


def step_weights(
  logp_q: Array, logp_ref: Array, mask: Array, cfg: ObjectiveConfig
) -> tuple[Array, dict[str, Array]]:
  """Per-step weights clip(exp(temp · (log q − log π_ref)), [step_w_min, step_w_max]); [B, T]."""
  log_w = cfg.temperature * (logp_q - logp_ref)
  log_w, clipped = _log_clip(log_w, cfg.step_w_min, cfg.step_w_max)
  w = jnp.exp(log_w) * mask
  if cfg.step_normalise:
    w = w / jnp.sum(jnp.where(mask > 0, w, 1.0))
  w = jax.lax.stop_gradient(w)
  n = jnp.maximum(mask.sum(), 1.0)
  diag = {
    "iw/clip_fraction": jnp.sum(clipped * mask) / n,
    "iw/max_weight": jnp.max(w),
    "iw/mean_weight": jnp.sum(w) / n,
  }
  return w, diag


def effective_sample_size(w: Array, valid: Array | None = None) -> Array:
  """Kish's effective sample size (Σw)² / Σw² of non-negative weights [B] -> scalar."""
  if valid is not None:
    w = w * valid
  return jnp.square(w.sum()) / jnp.maximum(jnp.square(w).sum(), jnp.finfo(w.dtype).tiny)


def weighted_nll(
  logp: Array,
  mask: Array,
  seq_weight: Array,
  step_weight: Array | None,
  cfg: ObjectiveConfig,
  valid: Array,
) -> Array:
  """Scalar loss −Σ_i c_i · ℓ_i / Σ_i valid_i with ℓ_i the (step-weighted) sequence log-lik.

  Args:
    logp: [B, T] log-probs under the trained policy (differentiated).
    mask: [B, T] step mask.
    seq_weight: [B] per-sequence weight c_i (data weight times importance weight).
    step_weight: [B, T] per-step weights, or None for 1.
    valid: [B] 1 for rows of real data, 0 for padding rows. The denominator counts these, not the
      rows whose final weight is > 0, so an importance weight that underflows to 0 does not rescale
      the whole batch's loss.
  """
  sw = mask if step_weight is None else step_weight * mask
  if cfg.reduction == "token_mean":
    tokens = jnp.maximum(jnp.sum(mask * valid[:, None]), 1.0)
    return -jnp.sum(seq_weight[:, None] * sw * logp) / tokens
  per_seq = jnp.sum(sw * logp, axis=-1)
  if cfg.length_normalise:
    per_seq = per_seq / sequence_lengths(mask)
  return -jnp.sum(seq_weight * per_seq) / jnp.maximum(jnp.sum(valid), 1.0)


def loss_coefficients(
  logp_q: Array | None,
  logp_ref: Array | None,
  mask: Array,
  weight: Array,
  cfg: ObjectiveConfig,
) -> Array:
  """[B, T] constants c with iw_sft_loss's loss = Σ c · logp: the whole batch's weights and
  denominators, so that a gradient accumulated over micro-batches of logp equals the batch's.

  Arguments as iw_sft_loss's (logp_q and logp_ref may be None without weighting)."""
  valid = (weight > 0).astype(mask.dtype)
  seq_w, step_w = weight, None
  if cfg.importance_weighting == "sequence":
    w, _ = sequence_weights(logp_q, logp_ref, mask, valid, cfg)
    seq_w = weight * w
  elif cfg.importance_weighting == "step":
    step_w, _ = step_weights(logp_q, logp_ref, mask, cfg)
  sw = mask if step_w is None else step_w * mask
  if cfg.reduction == "token_mean":
    coef = seq_w[:, None] * sw / jnp.maximum(jnp.sum(mask * valid[:, None]), 1.0)
  else:
    if cfg.length_normalise:
      sw = sw / sequence_lengths(mask)[:, None]
    coef = seq_w[:, None] * sw / jnp.maximum(jnp.sum(valid), 1.0)
  return jax.lax.stop_gradient(-coef)


def bound_estimates(
  logp: Array, logp_q: Array, logp_ref: Array, mask: Array, reward: Array, cfg: ObjectiveConfig
) -> dict[str, Array]:
  """Per-batch estimates of the two lower bounds on J(θ) = E_{π_ref}[R · p_θ/π_ref].

  SFT bound:    mean_i R_i (1 + ℓ_θ,i − ℓ_ref,i)
  iw-SFT bound: mean_i R_i (q_i/π_ref,i) (1 + ℓ_θ,i − ℓ_q,i)
  with ℓ the per-sequence log-likelihoods (length-normalised if cfg.length_normalise, which keeps
  them finite for long sequences) and the ratio unclipped, un-tempered. The iw bound is ≥ the SFT
  bound where q is closer to π_θ than π_ref is. Arrays [B, T] / [B]; reward 0 marks padding rows.
  """
  ln = cfg.length_normalise
  l_theta = sequence_logprob(logp, mask, ln)
  l_q = sequence_logprob(logp_q, mask, ln)
  l_ref = sequence_logprob(logp_ref, mask, ln)
  n = jnp.maximum(jnp.sum(reward > 0), 1)
  sft = jnp.sum(reward * (1.0 + l_theta - l_ref)) / n
  ratio = jnp.exp(jnp.clip(l_q - l_ref, -30.0, 30.0))
  iw = jnp.sum(reward * ratio * (1.0 + l_theta - l_q)) / n
  return {"bound/sft": jax.lax.stop_gradient(sft), "bound/iw_sft": jax.lax.stop_gradient(iw)}


def iw_sft_loss(
  logp: Array,
  logp_q: Array | None,
  logp_ref: Array | None,
  mask: Array,
  weight: Array,
  cfg: ObjectiveConfig,
) -> tuple[Array, dict[str, Array]]:
  """The one loss every method uses: SFT/BC when cfg.importance_weighting == "none", else iw-SFT.

  Args:
    logp: [B, T] step log-probs under π_θ (the only differentiated input).
    logp_q: [B, T] under the auxiliary policy q (treated as constant), or None without weighting.
    logp_ref: [B, T] under the frozen reference π_ref, or None without weighting.
    mask: [B, T] step mask.
    weight: [B] per-sequence data weight: 1 for curated data, a quality weight for SFT(Q) in
      "weight" mode, 0 for padding rows.
  Returns:
    (loss scalar, metrics dict of scalars).
  """
  if cfg.uses_weights and (logp_q is None or logp_ref is None):
    missing = " and ".join(n for n, x in (("logp_q", logp_q), ("logp_ref", logp_ref)) if x is None)
    raise ValueError(
      f"importance_weighting={cfg.importance_weighting!r} needs q's and π_ref's log-probs: "
      f"{missing} is None (pass them, or use importance_weighting='none' for SFT)"
    )
  valid = (weight > 0).astype(logp.dtype)
  metrics: dict[str, Array] = {}
  seq_w = weight
  step_w = None
  if cfg.importance_weighting == "sequence":
    w, diag = sequence_weights(logp_q, logp_ref, mask, valid, cfg)
    seq_w = weight * w
    metrics.update(diag)
  elif cfg.importance_weighting == "step":
    step_w, diag = step_weights(logp_q, logp_ref, mask, cfg)
    metrics.update(diag)
  loss = weighted_nll(logp, mask, seq_w, step_w, cfg, valid)
  metrics["loss"] = loss
  metrics["nll"] = -jnp.sum(
    valid * sequence_logprob(logp, mask, cfg.length_normalise)
  ) / jnp.maximum(valid.sum(), 1)
  if logp_q is not None and logp_ref is not None:
    metrics.update(bound_estimates(logp, logp_q, logp_ref, mask, valid * weight, cfg))
  return loss, metrics


def token_logprobs(logits: Array, targets: Array) -> Array:
  """logits [B, T, V] (any float dtype) and targets [B, T] int -> [B, T] float32 log p(target).

  For a causal LM, pass the logits of positions 0..T-2 and the tokens 1..T-1."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
