"""The three training stages in one table: what each reads from a batch, its network and its loss.

Every place that behaves differently per stage reads this table (train.py, predict.py, the configs'
validation), so a stage is added or changed here and nowhere else.

  stage = stages.get(config.stage)
  model = stage.build_model(config)          # flax module: model.apply(variables, batch, train=...)
  loss_fn = stage.make_loss_fn(config)       # (outputs, batch, params) -> (loss, metrics)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections

from dpcr_jax import losses, models

# (outputs, batch, params, loss_config, ops_impl) -> (scalar loss, {'loss', 'cd', ...} scalar metrics)
LossFn = Callable[[dict, dict, Any, ml_collections.ConfigDict, str], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage.

  Attributes:
    name: 'sparse', 'dense' or 'finetune' (config.stage).
    inputs: batch keys the network reads ('image' for the stages that start from an image).
    targets: batch keys the loss reads.
    outputs: keys of the network's output dict.
    make_model: (config.model, ops_impl) -> flax module called as ``module(batch, train)``.
    loss: the stage loss (dpcr_jax/losses.py).
  """
  name: str
  inputs: tuple[str, ...]
  targets: tuple[str, ...]
  outputs: tuple[str, ...]
  make_model: Callable[[ml_collections.ConfigDict, str], nn.Module]
  loss: LossFn

  @property
  def batch_keys(self) -> tuple[str, ...]:
    """What a training batch must carry for this stage (input pipelines may yield more)."""
    return tuple(dict.fromkeys(self.inputs + self.targets))

  @property
  def predicts_from_images(self) -> bool:
    return self.inputs == ("image",)

  def build_model(self, config: ml_collections.ConfigDict) -> nn.Module:
    """The stage's network from a training config (config.model, config.ops_impl)."""
    return self.make_model(config.model, config.ops_impl)

  def make_loss_fn(self, config: ml_collections.ConfigDict) -> Callable[[dict, dict, Any], tuple]:
    """(outputs, batch, params) -> (loss, metrics) with config.loss and config.ops_impl bound."""
    return functools.partial(_bound_loss, self.loss, config.loss, config.ops_impl)


def _bound_loss(loss, loss_config, ops_impl, outputs, batch, params):
  return loss(outputs, batch, params, loss_config, ops_impl)


STAGES: dict[str, Stage] = {s.name: s for s in (
    # The sparse GT is 'points_dense' in the original (loss.sparse_gt_key); both counts are carried so that
    # either choice of that key works.
    Stage("sparse", inputs=("image",), targets=("points_sparse", "points_dense"), outputs=("sparse",),
          make_model=models.build_sparse, loss=losses.sparse_loss),
    Stage("dense", inputs=("points_sparse",), targets=("points_dense",), outputs=("mid", "dense"),
          make_model=models.build_dense, loss=losses.dense_loss),
    Stage("finetune", inputs=("image",), targets=("points_sparse", "points_dense"),
          outputs=("sparse", "mid", "dense"), make_model=models.build_finetune, loss=losses.finetune_loss),
)}
NAMES = tuple(STAGES)


def get(name: str) -> Stage:
  """The stage called ``name``; ValueError naming the valid ones otherwise."""
  if name not in STAGES:
    raise ValueError(f"stage must be one of {NAMES}, got {name!r}")
  return STAGES[name]
