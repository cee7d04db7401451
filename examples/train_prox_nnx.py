"""Train a small Flax NNX MLP to 2:4 sparsity with proximal gradient, then fine-tune with the mask fixed.

Run: ``python examples/train_prox_nnx.py`` (well under a minute on a laptop CPU).

1. dense phase: plain adam on a synthetic regression task;
2. prox phase: ``optax.chain(optax.adam(lr), proxjax.prox_24_update(λ_t, lr))``, proximal gradient on
   ``loss + λ_t R`` with an increasing ``λ_t``, until every kernel is 2:4 (exact zeros from the prox);
3. fine-tune: masks ``kernel != 0`` and ``optax.chain(optax.adam(lr / 10), proxjax.masked_updates(masks))``: the pruned
   weights stay exactly zero while the kept ones (and biases, norms) are trained.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import proxjax


class MLP(nnx.Module):
  """``d_in -> hidden -> hidden -> 1`` with LayerNorm and GELU."""

  def __init__(self, d_in: int, hidden: int, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(d_in, hidden, rngs=rngs)
    self.norm = nnx.LayerNorm(hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.gelu(self.norm(self.fc1(x)))
    x = nnx.gelu(self.fc2(x))
    return self.out(x)[..., 0]


def make_data(key: jax.Array, n: int = 1024, d_in: int = 16) -> tuple[jax.Array, jax.Array]:
  """Synthetic regression: ``y = sin(x W1) · w2 + noise`` with a random teacher."""
  k1, k2, k3, k4 = jax.random.split(key, 4)
  x = jax.random.normal(k1, (n, d_in))
  w1 = jax.random.normal(k2, (d_in, 32)) / jnp.sqrt(d_in)
  w2 = jax.random.normal(k3, (32,)) / jnp.sqrt(32.0)
  y = jnp.sin(2.0 * x @ w1) @ w2 + 0.01 * jax.random.normal(k4, (n,))
  return x, y


def loss_fn(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean((model(x) - y) ** 2)


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads)
  return loss


def kernels(model: MLP) -> dict[str, jax.Array]:
  """The sparsified leaves (default spec: the 2-D ``kernel`` params), by path."""
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  spec = proxjax.resolve_spec(params)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  axes = jax.tree.leaves(spec, is_leaf=lambda v: v is None)
  return {jax.tree_util.keystr(p): x for (p, x), ax in zip(flat, axes) if ax is not None}


def all_24(model: MLP) -> bool:
  return all(bool(proxjax.is_nm(k)) for k in kernels(model).values())


def main(dense_steps: int = 300, prox_steps: int = 1500, finetune_steps: int = 300, lr: float = 1e-2,
         seed: int = 0, verbose: bool = True) -> dict:
  """Runs the three phases; returns the losses and the final per-kernel 2:4 checks and zero fractions."""
  log = print if verbose else (lambda *a, **k: None)
  x, y = make_data(jax.random.key(seed))
  model = MLP(x.shape[1], 64, rngs=nnx.Rngs(seed))

  # 1. Dense training.
  opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)
  for _ in range(dense_steps):
    train_step(model, opt, x, y)
  dense_loss = float(loss_fn(model, x, y))
  log(f"dense loss:            {dense_loss:.5f}")

  # 2. Proximal gradient on loss + λ_t R, λ_t growing geometrically (x10 every prox_steps / 5 steps); scaling = lr.
  lam = optax.exponential_decay(0.1, transition_steps=max(prox_steps // 5, 1), decay_rate=10.0)
  tx = optax.chain(optax.adam(lr), proxjax.prox_24_update(lam, lr))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  steps = 0
  while steps < prox_steps and not all_24(model):
    for _ in range(50):
      train_step(model, opt, x, y)
    steps += 50
  prox_loss = float(loss_fn(model, x, y))
  log(f"after prox ({steps} steps): {prox_loss:.5f}   all kernels 2:4: {all_24(model)}")

  # 3. Fine-tune with the sparsity pattern fixed. Masks: kernel != 0 on the spec's leaves, None elsewhere.
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  spec = proxjax.resolve_spec(params)
  masks = jax.tree.map(lambda ax, p: None if ax is None else p != 0, spec, params, is_leaf=lambda v: v is None)
  # A fresh adam at a lower learning rate: its first steps have size ~lr on every weight.
  opt = nnx.Optimizer(model, optax.chain(optax.adam(lr / 10), proxjax.masked_updates(masks)), wrt=nnx.Param)
  for _ in range(finetune_steps):
    train_step(model, opt, x, y)
  final_loss = float(loss_fn(model, x, y))
  log(f"after fine-tuning:     {final_loss:.5f}")

  checks = {name: bool(proxjax.is_nm(k)) for name, k in kernels(model).items()}
  zeros = {name: float(jnp.mean(k == 0)) for name, k in kernels(model).items()}
  for name in checks:
    log(f"  {name:12s} 2:4: {checks[name]}   zeros: {zeros[name]:.3f}")
  return {"dense_loss": dense_loss, "prox_loss": prox_loss, "final_loss": final_loss, "prox_steps": steps,
          "is_24": checks, "zero_fraction": zeros}


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dense-steps", type=int, default=300)
  parser.add_argument("--prox-steps", type=int, default=1500)
  parser.add_argument("--finetune-steps", type=int, default=300)
  args = parser.parse_args()
  main(args.dense_steps, args.prox_steps, args.finetune_steps)
