"""Benchmark: one jitted finetune training step (value_and_grad + Adam) at paper shapes, ffi vs jnp ops.

image [B, 256, 256, 3] -> 1024 -> 4096 -> 16384 points, the finetune loss (CD + approximate EMD on 1024,
CD on 4096 and 16384 against 16384 GT). Prints compile time, the median step time and images/s per
point-op backend, and the jnp / ffi ratio. Same parameters and batch for both backends, on the default
device (the GPU where there is one). ``--stage`` times the sparse or dense stage instead; ``--json`` also
writes the numbers (experiments/gpu_check.py reads them).

  python -m experiments.bench_step --batch_size=2 --steps=3
  python -m experiments.bench_step --batch_size=10 --steps=5 --json=DIR/bench_step.json   # on a GPU (paper batch)
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import statistics
import time
from typing import Any, Callable

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
_STAGE = flags.DEFINE_enum("stage", "finetune", ["sparse", "dense", "finetune"], "Training stage to time.")
_JSON = flags.DEFINE_string("json", None, "Also write the results as JSON here.")
_MODEL_MODULE = flags.DEFINE_string(
    "model_module", None, "Take build_model / compute_loss and the shapes IMAGE_SIZE, N_SPARSE, N_DENSE from this "
    "module instead of dpcr_jax (experiments/gpu_check.py --cpu-smoke: tests/standins.py's tiny models).")


LEARNING_RATE = 3e-5  # Adam; experiments/gpu_check.py's train smoke uses it too (same step, cached compile)


@dataclasses.dataclass
class ModelApi:
  """What a training step needs: the stage table (network builder and loss per stage) and the data shapes."""
  stage: Callable[[str], stages.Stage]  # stage name -> Stage (dpcr_jax.stages.get, or a stand-in's)
  model_config: Any  # passed to Stage.make_model
  loss_config: Any
  image_size: int
  n_sparse: int
  n_dense: int

  def build(self, stage: str, ops_impl: str):
    """The stage's flax module with the given point-op backend."""
    return self.stage(stage).make_model(self.model_config, ops_impl)

  def compute_loss(self, stage: str, outputs, batch, params, loss_config, ops_impl):
    return self.stage(stage).loss(outputs, batch, params, loss_config, ops_impl)


def model_api(module_name: str | None = None, image_size: int = 256) -> ModelApi:
  """The paper's network (dpcr_jax) at ``image_size``, or a stand-in module with the same contracts (its
  ``stage(name)`` and IMAGE_SIZE, N_SPARSE, N_DENSE)."""
  if module_name:
    mod = importlib.import_module(module_name)
    return ModelApi(mod.stage, None, None, mod.IMAGE_SIZE, mod.N_SPARSE, mod.N_DENSE)
  config = default_model_config()
  config.image_size = image_size
  counts = point_counts(config)
  return ModelApi(stages.get, config, default_loss_config(), image_size, counts["n_sparse"], counts["n_dense"])


def synthetic_batch(api: ModelApi, batch_size: int, seed: int = 0) -> dict:
  """Random images and Gaussian clouds of the model's shapes (timing only: nothing to learn)."""
  rng = np.random.default_rng(seed)
  return {"image": rng.random((batch_size, api.image_size, api.image_size, 3), dtype=np.float32),
          "points_sparse": (0.3 * rng.standard_normal((batch_size, api.n_sparse, 3))).astype(np.float32),
          "points_dense": (0.3 * rng.standard_normal((batch_size, api.n_dense, 3))).astype(np.float32)}


def _make_step(model, loss_config, ops_impl, optimizer, stage, stage_loss):
  """jit(step)(params, batch_stats, opt_state, batch) -> (params, batch_stats, opt_state, loss), donating."""
  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step(params, batch_stats, opt_state, batch):
    def loss_fn(p):
      outputs, state = model.apply({"params": p, "batch_stats": batch_stats}, batch, train=True,
                                   mutable=["batch_stats"])
      value, _ = stage_loss(stage, outputs, batch, p, loss_config, ops_impl)
      return value, state["batch_stats"]

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  return step


def main(argv):
  del argv
  api = model_api(_MODEL_MODULE.value, _IMAGE.value)
  b, stage = _BATCH.value, _STAGE.value
  batch = jax.device_put(synthetic_batch(api, b))
  optimizer = optax.adam(LEARNING_RATE)
  # rbg keys: the threefry init graph of this model takes minutes to compile on CPU.
  init_model = api.build(stage, "ffi")
  variables = jax.jit(functools.partial(init_model.init, train=False))(jax.random.key(0, impl="rbg"), batch)
  print(f"devices: {jax.devices()}; {stage} step, batch {b}, image {api.image_size}, points "
        f"{api.n_sparse} -> {api.n_dense}", flush=True)

  medians, results = {}, {}
  for impl in _IMPLS.value:
    model = api.build(stage, impl)
    step = _make_step(model, api.loss_config, impl, optimizer, stage, api.compute_loss)
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
    results[impl] = dict(compile_s=compile_s, median_s=medians[impl], steps_s=times[1:], losses=losses,
                         images_per_s=b / medians[impl])
    print(f"{impl}: compile {compile_s:.1f} s, step median {medians[impl]:.3f} s ({b / medians[impl]:.1f} images/s) "
          f"(steps {', '.join(f'{t:.3f}' for t in times[1:])}), losses {', '.join(f'{l:.6f}' for l in losses)}",
          flush=True)
  ratio = None
  if {"ffi", "jnp"} <= medians.keys():
    ratio = medians["jnp"] / medians["ffi"]
    print(f"jnp / ffi step time: {ratio:.2f}x")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(dict(stage=stage, batch_size=b, image_size=api.image_size, device=str(jax.devices()[0]),
                     impls=results, jnp_over_ffi=ratio), f, indent=1)


if __name__ == "__main__":
  app.run(main)
