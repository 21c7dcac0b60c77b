"""Benchmark: one jitted finetune training step (value_and_grad + Adam) at paper shapes, ffi vs jnp ops.

image [B, 256, 256, 3] -> 1024 -> 4096 -> 16384 points, the finetune loss (CD + approximate EMD on 1024,
CD on 4096 and 16384 against 16384 GT). Prints compile time and the median step time per point-op
backend, and the jnp / ffi ratio. Same parameters and batch for both backends.

  python -m experiments.bench_step --batch_size=2 --steps=3
"""
from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from dpcr_jax import stages
from dpcr_jax.models import default_loss_config, default_model_config, point_counts

_BATCH = flags.DEFINE_integer("batch_size", 2, "Examples per step.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps after the compile (median reported).")
_IMAGE = flags.DEFINE_integer("image_size", 256, "Image side (multiple of 64); points = (side/8)^2 * 16.")
_IMPLS = flags.DEFINE_list("impls", ["ffi", "jnp"], "Point-op backends to compare.")


def _make_step(model, loss_config, ops_impl, optimizer):
  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step(params, batch_stats, opt_state, batch):
    def loss_fn(p):
      outputs, state = model.apply({"params": p, "batch_stats": batch_stats}, batch, train=True,
                                   mutable=["batch_stats"])
      loss, _ = stages.get("finetune").loss(outputs, batch, p, loss_config, ops_impl)
      return loss, state["batch_stats"]

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  return step


def main(argv):
  del argv
  config = default_model_config()
  config.image_size = _IMAGE.value
  n_sparse = point_counts(config)["n_sparse"]
  rng = np.random.default_rng(0)
  b = _BATCH.value
  batch = {"image": rng.random((b, config.image_size, config.image_size, 3), dtype=np.float32),
           "points_sparse": (0.3 * rng.standard_normal((b, n_sparse, 3))).astype(np.float32),
           "points_dense": (0.3 * rng.standard_normal((b, 16 * n_sparse, 3))).astype(np.float32)}
  optimizer = optax.adam(3e-5)
  # rbg keys: the threefry init graph of this model takes minutes to compile on CPU.
  finetune = stages.get("finetune")
  init_model = finetune.make_model(config, "ffi")
  variables = jax.jit(functools.partial(init_model.init, train=False))(jax.random.key(0, impl="rbg"), batch)
  print(f"devices: {jax.devices()}; batch {b}, image {config.image_size}, points "
        f"{n_sparse} -> {4 * n_sparse} -> {16 * n_sparse}", flush=True)

  medians = {}
  for impl in _IMPLS.value:
    model = finetune.make_model(config, impl)
    step = _make_step(model, default_loss_config(), impl, optimizer)
    state = jax.tree.map(jnp.copy, (variables["params"], variables["batch_stats"]))
    state = (*state, optimizer.init(state[0]))
    start = time.perf_counter()
    compiled = step.lower(*state, batch).compile()
    compile_s = time.perf_counter() - start
    times, losses = [], []
    for _ in range(_STEPS.value + 1):  # the first run also warms up the allocator and thread pools
      start = time.perf_counter()
      *state, loss = compiled(*state, batch)
      loss.block_until_ready()
      times.append(time.perf_counter() - start)
      losses.append(float(loss))
    medians[impl] = statistics.median(times[1:])
    # The first loss is at the shared initial parameters (comparable across backends); later ones are
    # not: Adam's first steps move every parameter by ~lr whatever the gradient's size, so float32
    # rounding differences in near-zero gradients change the trajectory.
    print(f"{impl}: compile {compile_s:.1f} s, step median {medians[impl]:.3f} s "
          f"(steps {', '.join(f'{t:.3f}' for t in times[1:])}), losses {', '.join(f'{l:.6f}' for l in losses)}",
          flush=True)
  if {"ffi", "jnp"} <= medians.keys():
    print(f"jnp / ffi step time: {medians['jnp'] / medians['ffi']:.2f}x")


if __name__ == "__main__":
  app.run(main)
