"""Tiny stand-ins for the training tests: a model, a loss and an input iterator that follow the contracts of
dpcr_jax.models / dpcr_jax.losses / dpcr_jax.data but compile and run in well under a second.

Test-only code; ``patch_training`` swaps them into dpcr_jax.train for one run.
"""
from __future__ import annotations

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from xla_ops import chamfer_distance

IMAGE_SIZE, N_SPARSE, N_DENSE, NUM_EXAMPLES = 8, 16, 64, 64


class TinySparse(nn.Module):
  """image [B,8,8,3] -> {'sparse': [B,16,3]} through a conv, batch norm and a dense layer."""

  @nn.compact
  def __call__(self, batch, train: bool):
    x = nn.Conv(4, (3, 3), strides=2, use_bias=False)(batch["image"])  # a bias before BN has 0 gradient
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x).reshape(x.shape[0], -1)
    return {"sparse": nn.Dense(N_SPARSE * 3)(x).reshape(-1, N_SPARSE, 3)}


class TinyDense(nn.Module):
  """points_sparse [B,16,3] -> {'mid': [B,64,3], 'dense': [B,64,3]}."""

  @nn.compact
  def __call__(self, batch, train: bool):
    pts = batch["points_sparse"]
    offsets = nn.Dense(3 * 4)(pts).reshape(pts.shape[0], -1, 3) * 0.1
    dense = jnp.repeat(pts, 4, axis=1) + offsets
    return {"mid": dense, "dense": dense}


class TinyFinetune(nn.Module):
  """image -> sparse -> dense, with submodules named 'sparse' and 'dense' as the real finetune model."""

  def setup(self):
    self.sparse = TinySparse()
    self.dense = TinyDense()

  def __call__(self, batch, train: bool):
    sparse = self.sparse(batch, train)["sparse"]
    return {"sparse": sparse, **self.dense({"points_sparse": sparse}, train)}


def build_model(model_config, stage):
  del model_config
  return {"sparse": TinySparse, "dense": TinyDense, "finetune": TinyFinetune}[stage]()


def compute_loss(stage, outputs, batch, params, loss_config, ops_impl):
  del params, loss_config
  if stage == "sparse":
    cd = chamfer_distance(outputs["sparse"], batch["points_dense"], impl=ops_impl)
    loss = cd
  else:
    cd = chamfer_distance(outputs["dense"], batch["points_dense"], impl=ops_impl)
    loss = cd + chamfer_distance(outputs["mid"], batch["points_dense"], impl=ops_impl)
  return loss * 100.0, {"cd": cd}


class ArrayIterator:
  """Deterministic epochs of a fixed random dataset, reshuffled per epoch from (seed, epoch); stateful like
  grain's iterators (get_state / set_state)."""

  def __init__(self, batch_size, seed, shuffle, num_epochs=None):
    rng = np.random.default_rng(1234)
    self.data = {
        "image": rng.uniform(size=(NUM_EXAMPLES, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32),
        "points_dense": rng.normal(size=(NUM_EXAMPLES, N_DENSE, 3)).astype(np.float32),
        "category": (np.arange(NUM_EXAMPLES) % 13).astype(np.int32),
    }
    self.data["points_sparse"] = self.data["points_dense"][:, :N_SPARSE]
    self.batch_size, self.seed, self.shuffle, self.num_epochs = batch_size, seed, shuffle, num_epochs
    self.position = 0

  def __iter__(self):
    return self

  def __next__(self):
    per_epoch = NUM_EXAMPLES // self.batch_size
    epoch, k = divmod(self.position, per_epoch)
    if self.num_epochs is not None and epoch >= self.num_epochs:
      raise StopIteration
    order = np.arange(NUM_EXAMPLES)
    if self.shuffle:
      order = np.random.default_rng([self.seed, epoch]).permutation(NUM_EXAMPLES)
    idx = order[k * self.batch_size:(k + 1) * self.batch_size]
    self.position += 1
    return {key: v[idx] for key, v in self.data.items()}

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]


def make_iterators(config, local_batch):
  # Like dpcr_jax.train._make_iterators: every process shuffles with its own seed.
  train_iter = ArrayIterator(local_batch, config.seed + jax.process_index(), shuffle=True)
  return train_iter, lambda: ArrayIterator(local_batch, config.seed, shuffle=False, num_epochs=1)


def tiny_config(stage: str, root: str) -> ml_collections.ConfigDict:
  """A training config for the stand-ins (root must exist: validate_config checks it)."""
  config = ml_collections.ConfigDict()
  config.stage = stage
  config.model = ml_collections.ConfigDict({"ops_impl": "jnp", "image_size": IMAGE_SIZE})
  config.loss = ml_collections.ConfigDict()
  config.data = ml_collections.ConfigDict({"source": "standin", "root": root})
  config.batch_size = 8
  config.eval_batch_size = 8
  config.eval_split = "test"
  config.eval_batches = 2
  config.shuffle = True
  config.learning_rate = 1e-2
  config.lr_schedule, config.lr_warmup_steps, config.lr_final_fraction, config.lr_step_at = "constant", 0, 0.01, 0.9
  config.num_train_steps = 12
  config.log_every = 4
  config.eval_every = 6
  config.checkpoint_every = 4
  config.keep_checkpoints = 3
  config.nonfinite_policy = "stop"
  config.seed = 0
  config.init = ml_collections.ConfigDict({"sparse_checkpoint": "", "dense_checkpoint": ""})
  config.distributed = ml_collections.ConfigDict({
      "enabled": False, "coordinator_address": "", "num_processes": -1, "process_id": -1})
  return config


def patch_training(monkeypatch_setattr):
  """Swaps the stand-ins into dpcr_jax.train via ``monkeypatch_setattr(obj, name, value)``."""
  from dpcr_jax import train  # pylint: disable=g-import-not-at-top
  monkeypatch_setattr(train, "_build_model", lambda config: build_model(config.model, config.stage))
  monkeypatch_setattr(train, "make_loss_fn", lambda config: (
      lambda outputs, batch, params: compute_loss(config.stage, outputs, batch, params, config.loss, "jnp")))
  monkeypatch_setattr(train, "_make_iterators", make_iterators)


if __name__ == "__main__":
  # Subprocess entry for the kill-and-resume test: python tests/standins.py WORKDIR NUM_STEPS
  from absl import logging  # pylint: disable=g-import-not-at-top
  from dpcr_jax import train  # pylint: disable=g-import-not-at-top
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  patch_training(setattr)
  workdir, num_steps = sys.argv[1], int(sys.argv[2])
  cfg = tiny_config("sparse", os.path.dirname(os.path.abspath(__file__)))
  cfg.num_train_steps = num_steps
  cfg.checkpoint_every = 2
  cfg.keep_checkpoints = 100
  cfg.eval_every = 1000
  train.train_and_evaluate(cfg, workdir)
