"""iw-SFT inside your own training loop: only the core (`pip install iwsft`), optax and a toy model.

The model is a bigram policy over a vocabulary of V tokens: logits [V] for the first token and
[V, V] for each next one. π_ref is a fixed random bigram model; we sample sequences from it, keep
the ones with a sparse reward (at least K zeros: "curated"), and fine-tune θ (initialised at π_ref)
on them with SFT and with iw-SFT. q is an exponential moving average of θ (iwsft.update_q). The
success rate J(θ) = P(reward) is estimated by sampling from θ before and after.

  python examples/own_training_loop.py [--steps 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import optax

import iwsft

V, T, K = 6, 12, 5  # vocabulary, sequence length, zeros needed for reward 1


def logprobs(params, tokens):
  """params {"first": [V], "next": [V, V]}, tokens [B, T] int -> [B, T] log π(x_t | x_<t)."""
  first = jax.nn.log_softmax(params["first"])[tokens[:, 0]]
  prev, nxt = tokens[:, :-1], tokens[:, 1:]
  rest = iwsft.token_logprobs(params["next"][prev], nxt)  # logits [B, T-1, V]
  return jnp.concatenate([first[:, None], rest], axis=1)


def sample(params, key, n):
  """n sequences [n, T] from the bigram model."""
  k0, key = jax.random.split(key)
  tok = jax.random.categorical(k0, params["first"], shape=(n,))
  out = [tok]
  for k in jax.random.split(key, T - 1):
    tok = jax.random.categorical(k, params["next"][tok])
    out.append(tok)
  return jnp.stack(out, axis=1)


def reward(tokens):
  return (jnp.sum(tokens == 0, axis=1) >= K).astype(jnp.float32)


def train(cfg: iwsft.ObjectiveConfig, ref, data, steps, seed):
  """A plain optax loop: θ from π_ref, q = EMA of θ, π_ref's log-probs computed once."""
  opt = optax.adam(3e-2)
  params, q, opt_state = ref, ref, opt.init(ref)
  mask = jnp.ones(data.shape, jnp.float32)
  logp_ref = logprobs(ref, data)  # π_ref is frozen: once, ahead

  @jax.jit
  def update(params, q, opt_state, idx):
    batch, m, lr = data[idx], mask[idx], logp_ref[idx]

    def loss_fn(p):
      logp = logprobs(p, batch)
      logp_q = jax.lax.stop_gradient(logprobs(q, batch))
      weight = jnp.ones(batch.shape[0])
      return iwsft.iw_sft_loss(logp, logp_q, lr, m, weight, cfg)

    grads, metrics = jax.grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state)
    params = optax.apply_updates(params, updates)
    return params, iwsft.update_q(q, params, cfg.q_decay), opt_state, metrics

  key = jax.random.key(seed)
  for _ in range(steps):
    key, sub = jax.random.split(key)
    idx = jax.random.randint(sub, (64,), 0, data.shape[0])
    params, q, opt_state, metrics = update(params, q, opt_state, idx)
  return params, metrics


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  k_ref, k_data, k_eval = jax.random.split(jax.random.key(args.seed), 3)
  ref = {
    "first": jax.random.normal(k_ref, (V,)),
    "next": jax.random.normal(jax.random.fold_in(k_ref, 1), (V, V)),
  }
  pool = sample(ref, k_data, 20_000)
  curated = pool[reward(pool) > 0]
  success = lambda p: float(reward(sample(p, k_eval, 20_000)).mean())
  print(f"curated {curated.shape[0]} of {pool.shape[0]} sequences from π_ref")
  print(f"J(π_ref) = {success(ref):.3f}")
  sft = dataclasses.replace(iwsft.recipes.SFT)
  iw = dataclasses.replace(iwsft.recipes.CONTROL, temperature=1.0, w_max=10.0, q_decay=0.9)
  for name, cfg in (("sft", sft), ("iw_sft", iw)):
    params, metrics = train(cfg, ref, curated, args.steps, args.seed)
    ess = metrics.get("iw/ess_fraction", jnp.nan)
    loss = float(metrics["loss"])
    print(f"J({name}) = {success(params):.3f}  (last batch: loss {loss:.3f}, ESS {ess:.2f})")


if __name__ == "__main__":
  main()
