"""The training config's invariants: sizes derived from the model, and one check of everything before compiling.

A training config (configs/default.py) has the fields stage, ops_impl, model, loss, data, the optimiser and
loop settings, init and distributed. Each setting has one home: the data's image size and point counts are
*derived* from config.model through ml_collections field references (``link_data_to_model``), so changing
``model.image_size`` or ``model.dense.upsample`` moves the data with it; ``validate_config`` still checks them,
so a config that breaks the links (an edited config.json, a hand-made ConfigDict, ``--config.data.n_sparse``)
is rejected with a message naming both fields instead of training at the wrong size.
"""
from __future__ import annotations

import os

import jax
import ml_collections

from dpcr_jax import nonfinite
from dpcr_jax import stages
from dpcr_jax.models import OPS_IMPLS, point_counts

LR_SCHEDULES = ("constant", "step", "cosine")
SPARSE_GT_KEYS = ("points_sparse", "points_dense")


def link_data_to_model(config: ml_collections.ConfigDict) -> None:
  """Makes config.data.{image_size, n_sparse, n_mid, n_dense} references to values derived from config.model:
  image_size = model.image_size; n_sparse = (image_size / 8)^2; n_mid, n_dense = n_sparse * upsample^(levels - 1),
  n_sparse * upsample^levels (``dpcr_jax.models.point_counts``)."""
  model, data = config.model, config.data
  image_size = model.get_ref("image_size")
  upsample, levels = model.dense.get_ref("upsample"), model.dense.get_ref("levels")
  n_sparse = (image_size // 8) ** 2
  data.image_size = image_size
  data.n_sparse = n_sparse
  data.n_mid = n_sparse * upsample ** (levels - 1)
  data.n_dense = n_sparse * upsample ** levels


def check_sizes(config: ml_collections.ConfigDict) -> None:
  """ValueError when config.data's image size or point counts disagree with what config.model produces."""
  model, data = config.model, config.data
  if model.image_size % 64:
    raise ValueError(f"config.model.image_size must be a multiple of 64, got {model.image_size}")
  if data.image_size != model.image_size:
    raise ValueError(f"config.data.image_size={data.image_size} differs from config.model.image_size="
                     f"{model.image_size}; the data must be read at the network's input size")
  counts = point_counts(model)
  if data.n_sparse != counts["n_sparse"]:
    raise ValueError(f"config.data.n_sparse={data.n_sparse} differs from the sparse network's output: "
                     f"config.model.image_size={model.image_size} gives ({model.image_size} / 8)^2 = "
                     f"{counts['n_sparse']} points")
  upsampling = (f"config.model.dense.upsample={model.dense.upsample}, "
                f"config.model.dense.levels={model.dense.levels}")
  if data.n_dense != counts["n_dense"]:
    raise ValueError(f"config.data.n_dense={data.n_dense} differs from the dense network's output: "
                     f"{counts['n_sparse']} sparse points with {upsampling} give {counts['n_dense']}")
  if data.n_mid not in (0, counts["n_mid"]):  # 0: no points_mid in batches (no loss reads them)
    raise ValueError(f"config.data.n_mid={data.n_mid} differs from the dense network's 'mid' output: "
                     f"{counts['n_sparse']} sparse points with {upsampling} give {counts['n_mid']} (or set 0)")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for a config that cannot run, before any data is read or anything compiled."""
  if "ops_impl" in config.model:
    raise ValueError("config.model.ops_impl has moved to config.ops_impl (it selects the ops of the model, the "
                     "losses and the evaluation)")
  stages.get(config.stage)  # ValueError naming the stages
  if config.get("ops_impl") not in OPS_IMPLS:
    raise ValueError(f"config.ops_impl must be one of {OPS_IMPLS}, got {config.get('ops_impl')!r}")
  num_devices = jax.device_count()
  for name in ("batch_size", "eval_batch_size"):
    value = config.get(name)
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"config.{name} must be a positive int, got {value!r}")
    if value % num_devices:
      raise ValueError(f"config.{name}={value} must be divisible by the number of devices ({num_devices}); "
                       f"use a multiple of {num_devices}")
  if config.num_train_steps <= 0:
    raise ValueError(f"config.num_train_steps must be > 0, got {config.num_train_steps}")
  if config.learning_rate <= 0:
    raise ValueError(f"config.learning_rate must be > 0, got {config.learning_rate}")
  if config.lr_schedule not in LR_SCHEDULES:
    raise ValueError(f"config.lr_schedule must be one of {LR_SCHEDULES}, got {config.lr_schedule!r}")
  if not 0 <= config.lr_final_fraction <= 1:
    raise ValueError(f"config.lr_final_fraction must be in [0, 1], got {config.lr_final_fraction}")
  if not 0 <= config.lr_warmup_steps < config.num_train_steps:
    raise ValueError(f"config.lr_warmup_steps must be in [0, num_train_steps={config.num_train_steps}), "
                     f"got {config.lr_warmup_steps}")
  if config.lr_schedule == "step":
    if not 0 < config.lr_step_at <= 1:
      raise ValueError(f"config.lr_step_at must be in (0, 1], got {config.lr_step_at}")
    if round(config.lr_step_at * config.num_train_steps) <= config.lr_warmup_steps:
      raise ValueError(f"config.lr_step_at={config.lr_step_at} puts the step inside the warm-up "
                       f"({config.lr_warmup_steps} steps)")
  if config.nonfinite_policy not in nonfinite.POLICIES:
    raise ValueError(f"config.nonfinite_policy must be one of {nonfinite.POLICIES}, got "
                     f"{config.nonfinite_policy!r}")
  for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
    if config[name] <= 0:
      raise ValueError(f"config.{name} must be > 0, got {config[name]}")
  if config.loss.get("sparse_gt_key", "points_dense") not in SPARSE_GT_KEYS:
    raise ValueError(f"config.loss.sparse_gt_key must be one of {SPARSE_GT_KEYS}, got {config.loss.sparse_gt_key!r}")
  check_sizes(config)
  root = config.data.get("root")
  if not root or not os.path.exists(root):
    raise ValueError(f"config.data.root={root!r} does not exist (source {config.data.get('source')!r}); "
                     "point it at a dataset (experiments/main.py makes a synthetic one)")
  if config.stage == "finetune":
    for name in ("sparse_checkpoint", "dense_checkpoint"):
      path = config.init.get(name)
      if path and not os.path.isdir(path):
        raise ValueError(f"config.init.{name}={path!r} is not a directory")
