"""AttentionDPCR models (Flax linen): their config and one builder per stage network.

dpcr_jax/stages.py ties each training stage to its builder and loss. Every stage module is called as
``module.apply(variables, batch, train=...)`` with variable collections 'params' and 'batch_stats' (pass
``mutable=['batch_stats']`` when ``train=True``). Batch keys: 'image'
[B, S, S, 3] float32 in [0, 1], 'points_sparse' [B, P, 3] (the dense stage's input), 'points_dense'.
"""
from __future__ import annotations

import functools

import ml_collections

from dpcr_jax.models.dense import DenseLevel, DenseNet, EdgeConvFeature
from dpcr_jax.models.finetune import Finetune
from dpcr_jax.models.pointnet2 import PointNet2Feature
from dpcr_jax.models.sparse import SparseNet, decoder_kernels

OPS_IMPLS = ("ffi", "jnp")
__all__ = ["OPS_IMPLS", "build_dense", "build_finetune", "build_sparse", "decoder_kernels", "default_loss_config",
           "default_model_config", "point_counts"]


def default_model_config() -> ml_collections.ConfigDict:
  """Model hyperparameters; defaults reproduce the original code (docs/original.md §1, §2), quirks included."""
  c = ml_collections.ConfigDict()
  # The point ops' backend is not a model field: config.ops_impl (top level) selects it for the model, the
  # losses and the evaluation alike. Point counts are derived from these fields (point_counts below).
  c.image_size = 256  # input side S (multiple of 64); the decoder's map is S/8 x S/8 -> (S/8)^2 sparse points.
  c.width = 1.0  # channel multiplier of the sparse network (encoder and decoder); 1.0 = paper.
  # Sparse-network BN (hand-written in the original, docs/original.md §1.4): EMA decay 0.5 is the original's (docs/original.md §9 quirk 2;
  # flax momentum = TF decay); a sane fix is 0.99 (with shuffled data).
  c.sparse_bn_momentum = 0.5
  # Start the BN EMAs (sparse and pu_util BNs) at mean 0 / variance 0 as TF's ExponentialMovingAverage on a
  # tensor does (faithful); False starts the variance at 1 (flax's default). Matters only early in training.
  c.bn_zero_init_stats = True
  # tflearn BN in the dense network's global encoder and decoder: True = what the original ran, a learnable
  # affine over frozen 0/1 statistics (docs/original.md §2.3, docs/original.md §9 quirk 1); False = a real BN (eps 1e-5, decay 0.9).
  c.tflearn_frozen_bn = True

  c.dense = ml_collections.ConfigDict()
  c.dense.variant = "edgeconv"  # local feature: "edgeconv" (original DGCNN) or "pointnet2" (our PU-Net-style).
  c.dense.levels = 2  # upsampling levels (1024 -> 4096 -> 16384); outputs 'mid' (second last) and 'dense' (last).
  c.dense.upsample = 4  # points per input point per level (a perfect square: a sqrt x sqrt grid of codes).
  c.dense.grid_scale = 0.1  # grid codes linspace(-grid_scale, grid_scale, sqrt(upsample)) in x and y.
  c.dense.skip_weight = 0.2  # weight of the nearest previous-level point's feature (levels >= 2).
  c.dense.bn_momentum = 0.9  # pu_util BN EMA decay (eps 1e-3, moments over all axes but channels).
  c.dense.global_channels = (32, 64, 64)  # global PointNet MLP (tflearn conv_1d + tflearn BN + ReLU), max-pooled.
  c.dense.decoder_channels = (128, 128, 64)  # per-point decoder MLP (tflearn), then a linear conv to xyz.
  # False (the original, docs/original.md §2.2): the decoder regresses xyz directly. True (a deviation for short runs,
  # configs/quickstart.py): it regresses an offset from the input point each output copy comes from, with the
  # last decoder layer initialised to zero, so an untrained level returns its input points (the original
  # starts from random coordinates and needs thousands of steps to get back to its input's accuracy).
  c.dense.predict_offsets = False
  c.dense.agg_channels = 256  # local feature width (EdgeConv 'agg' / PointNet++ final PuConv).
  c.dense.k = 20  # edgeconv: kNN size, the point itself included.
  c.dense.edge_channels = (32, 64, 128)  # edgeconv: the three EdgeConv widths (dgcnn1, dgcnn2, dgcnn4).
  c.dense.pointnet2 = ml_collections.ConfigDict()  # pointnet2 variant only (see models/pointnet2.py).
  c.dense.pointnet2.downsample = (4, 4)  # FPS factor per set-abstraction level (1024 -> 256 -> 64).
  c.dense.pointnet2.radii = (0.1, 0.2)  # ball-query radii (scene units; objects are ~0.6-1 across).
  c.dense.pointnet2.nsample = 16  # points per ball.
  c.dense.pointnet2.sa_channels = ((32, 32, 64), (64, 64, 128))  # set-abstraction MLPs.
  c.dense.pointnet2.fp_channels = ((128, 128), (128, 128))  # feature-propagation MLPs, coarsest first.
  return c


def default_loss_config() -> ml_collections.ConfigDict:
  """Loss weights of the original (docs/original.md §4.1-4.3); see dpcr_jax/losses.py."""
  c = ml_collections.ConfigDict()
  # Sparse (docs/original.md §4.1): sparse_scale * (mean d(gt->pred) + w * mean d(pred->gt)) + l2_factor * sum wd/2 ||W||^2.
  c.sparse_scale = 1e4
  c.sparse_pred_to_gt_weight = 0.55
  c.sparse_gt_key = "points_dense"  # batch key of the sparse stage's GT: 16384 points (faithful, docs/original.md §9 quirk 6).
  c.decoder_weight_decay = 1e-5  # tflearn L2 on the 11 decoder kernels: wd * 0.5 * ||W||^2 each.
  c.decoder_l2_factor = 0.1  # the original multiplies the summed regularisation losses by 0.1.
  # Dense (docs/original.md §4.2): dense_scale * (CD(gt, mid) + CD(gt, dense)), GT = 'points_dense'.
  c.dense_scale = 1e4
  # Finetune (docs/original.md §4.3): sparse_weight * (CD(gt1024, sparse) + emd_scale * EMD(gt1024, sparse))
  #                  + dense_weight * (CD(gt16k, mid) + CD(gt16k, dense)); no 1e4, no L2.
  c.finetune_sparse_weight = 0.5
  c.finetune_emd_scale = 1e-3
  c.finetune_dense_weight = 1.0
  return c


def point_counts(config: ml_collections.ConfigDict) -> dict[str, int]:
  """The point counts a model config implies: {'n_sparse': (S/8)^2, 'n_mid', 'n_dense'}, each dense level
  multiplying by ``dense.upsample``; 'n_mid' is the second-last level's output (the 'mid' output)."""
  n_sparse = (config.image_size // 8) ** 2
  d = config.dense
  return {"n_sparse": n_sparse, "n_mid": n_sparse * d.upsample ** (d.levels - 1),
          "n_dense": n_sparse * d.upsample ** d.levels}


def _check_ops_impl(ops_impl: str) -> None:
  if ops_impl not in OPS_IMPLS:
    raise ValueError(f"ops_impl must be one of {OPS_IMPLS}, got {ops_impl!r}")


def build_sparse(config: ml_collections.ConfigDict, ops_impl: str = "ffi", name: str | None = None) -> SparseNet:
  """Stage 1: image [B,S,S,3] -> {'sparse': [B,(S/8)^2,3]} (uses no point op; ``ops_impl`` is checked only)."""
  _check_ops_impl(ops_impl)
  if config.image_size % 64:
    raise ValueError(f"model.image_size must be a multiple of 64, got {config.image_size}")
  return SparseNet(width=config.width, bn_momentum=config.sparse_bn_momentum,
                   bn_zero_init_stats=config.bn_zero_init_stats, name=name)


def build_dense(config: ml_collections.ConfigDict, ops_impl: str = "ffi", name: str | None = None) -> DenseNet:
  """Stage 2: points_sparse [B,P,3] -> {'mid': [B,P*r^(L-1),3], 'dense': [B,P*r^L,3]}."""
  _check_ops_impl(ops_impl)
  d = config.dense
  if d.levels < 2:
    raise ValueError(f"dense.levels must be >= 2 (outputs 'mid' and 'dense'), got {d.levels}")
  common = dict(agg_channels=d.agg_channels, bn_momentum=d.bn_momentum,
                bn_zero_init_stats=config.bn_zero_init_stats, ops_impl=ops_impl)
  if d.variant == "edgeconv":
    local = functools.partial(EdgeConvFeature, k=d.k, edge_channels=tuple(d.edge_channels), **common)
  elif d.variant == "pointnet2":
    p = d.pointnet2
    local = functools.partial(
        PointNet2Feature, downsample=tuple(p.downsample), radii=tuple(p.radii), nsample=p.nsample,
        sa_channels=tuple(map(tuple, p.sa_channels)), fp_channels=tuple(map(tuple, p.fp_channels)), **common)
  else:
    raise ValueError(f"dense.variant must be 'edgeconv' or 'pointnet2', got {d.variant!r}")
  level = functools.partial(DenseLevel, local, upsample=d.upsample, skip_weight=d.skip_weight,
                            grid_scale=d.grid_scale, global_channels=tuple(d.global_channels),
                            decoder_channels=tuple(d.decoder_channels), frozen_bn=config.tflearn_frozen_bn,
                            predict_offsets=d.predict_offsets, ops_impl=ops_impl)
  return DenseNet(level, levels=d.levels, name=name)


def build_finetune(config: ml_collections.ConfigDict, ops_impl: str = "ffi") -> Finetune:
  """Stage 3: image -> {'sparse', 'mid', 'dense'}, the two networks joined (submodules 'sparse', 'dense')."""
  return Finetune(sparse=build_sparse(config, ops_impl), dense=build_dense(config, ops_impl))
