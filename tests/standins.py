"""Tiny stand-ins for the training-loop tests: a model and a loss per stage that follow the contracts of
dpcr_jax.stages but compile and run in well under a second, and a small in-memory dataset read through the
real batching and sharding of dpcr_jax.data (``batch_iterator``).

They enter ``train.train_and_evaluate`` through its seams (``stage=``, ``inputs_fn=``), not by patching; the
real models, losses and data pipeline are run end to end by tests/test_end_to_end.py.
"""
from __future__ import annotations

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import default
from dpcr_jax import stages, train
from dpcr_jax.data.pipeline import batch_iterator
from xla_ops import chamfer_distance

# The sizes of configs/default.py's derivation at 64 px: (64 / 8)^2 = 64 sparse points, x4, x4.
IMAGE_SIZE, N_SPARSE, N_MID, N_DENSE, NUM_EXAMPLES = 64, 64, 256, 1024, 64


class TinySparse(nn.Module):
  """image [B,64,64,3] -> {'sparse': [B,64,3]} through a strided conv, batch norm and a dense layer."""

  @nn.compact
  def __call__(self, batch, train: bool):
    x = nn.Conv(4, (8, 8), strides=8, use_bias=False)(batch["image"])  # a bias before BN has 0 gradient
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x).reshape(x.shape[0], -1)
    return {"sparse": nn.Dense(N_SPARSE * 3)(x).reshape(-1, N_SPARSE, 3)}


class TinyDense(nn.Module):
  """points_sparse [B,64,3] -> {'mid': [B,256,3], 'dense': [B,1024,3]}: per-point offsets, x4 twice."""

  @nn.compact
  def __call__(self, batch, train: bool):
    mid = batch["points_sparse"]
    for _ in range(2):
      dense = jnp.repeat(mid, 4, axis=1) + 0.1 * nn.Dense(3 * 4)(mid).reshape(mid.shape[0], -1, 3)
      mid, prev = dense, mid
    return {"mid": prev, "dense": dense}


class TinyFinetune(nn.Module):
  """image -> sparse -> dense, with submodules named 'sparse' and 'dense' as the real finetune model."""

  def setup(self):
    self.sparse = TinySparse()
    self.dense = TinyDense()

  def __call__(self, batch, train: bool):
    sparse = self.sparse(batch, train)["sparse"]
    return {"sparse": sparse, **self.dense({"points_sparse": sparse}, train)}


_MODELS = {"sparse": TinySparse, "dense": TinyDense, "finetune": TinyFinetune}


def tiny_loss(outputs, batch, params, loss_config, ops_impl):
  """100 x mean squared error of each output against the first points of points_dense (smooth, unlike Chamfer,
  whose nearest-neighbour choices flip under float32 reordering and make sharded vs unsharded runs diverge);
  metric 'cd': Chamfer of the last output."""
  del params, loss_config
  gt = batch["points_dense"]
  mse = lambda pred: jnp.mean(jnp.square(pred - gt[:, :pred.shape[1]]))  # noqa: E731
  last = outputs["dense"] if "dense" in outputs else outputs["sparse"]
  loss = mse(last) + (mse(outputs["mid"]) if "mid" in outputs else 0.0)
  return loss * 100.0, {"cd": chamfer_distance(last, gt, impl=ops_impl)}


def stage(name: str) -> stages.Stage:
  """The real stage's batch contract with the tiny model and loss."""
  real = stages.get(name)
  return stages.Stage(name, real.inputs, real.targets, real.outputs,
                      make_model=lambda model_config, ops_impl: _MODELS[name](), loss=tiny_loss)


def examples(num: int = NUM_EXAMPLES) -> list[dict]:
  """A fixed random dataset of ``num`` example dicts (numpy), 13 categories round robin."""
  rng = np.random.default_rng(1234)
  dense = rng.normal(size=(num, N_DENSE, 3)).astype(np.float32)
  images = rng.uniform(size=(num, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  return [{"image": images[i], "points_sparse": dense[i, :N_SPARSE], "points_mid": dense[i, :N_MID],
           "points_dense": dense[i], "category": np.int32(i % 13), "view": np.int32(i % 12)} for i in range(num)]


def inputs(config: ml_collections.ConfigDict) -> train.Inputs:
  """``examples()`` through the real batching: global batches, this process's rows of each."""
  data = examples()
  shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
  return train.Inputs(
      train=batch_iterator(data, config.batch_size, config.seed, shuffle=config.data.shuffle, **shard),
      eval=lambda: batch_iterator(data, config.eval_batch_size, config.seed, shuffle=False, num_epochs=1, **shard))


def tiny_config(stage_name: str, root: str) -> ml_collections.ConfigDict:
  """configs/default.py at 64 px (64 -> 256 -> 1024 points), jnp ops, short loop settings.
  (root must exist: validate_config checks it.)"""
  config = default.base_config(stage_name)
  config.ops_impl = "jnp"
  config.model.image_size = IMAGE_SIZE
  config.data.root = root
  config.batch_size = config.eval_batch_size = 8
  config.eval_batches = 2
  config.learning_rate = 1e-2
  config.num_train_steps = 12
  config.log_every = 4
  config.eval_every = 6
  config.checkpoint_every = 4
  return config


def run_training(config: ml_collections.ConfigDict, workdir: str) -> train.TrainState:
  """train.train_and_evaluate with the stand-in stage and inputs."""
  return train.train_and_evaluate(config, workdir, stage=stage(config.stage), inputs_fn=inputs)


if __name__ == "__main__":
  # Subprocess entry for the kill-and-resume test: python tests/standins.py WORKDIR NUM_STEPS
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  workdir, num_steps = sys.argv[1], int(sys.argv[2])
  cfg = tiny_config("sparse", os.path.dirname(os.path.abspath(__file__)))
  cfg.num_train_steps = num_steps
  cfg.checkpoint_every = 2
  cfg.keep_checkpoints = 100
  cfg.eval_every = 1000
  run_training(cfg, workdir)
