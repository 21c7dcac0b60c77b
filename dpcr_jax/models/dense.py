"""Stage 2, the dense network ``pu_dense_dgcnn``: points [B, N, 3] -> [B, 4N, 3] -> [B, 16N, 3] (docs/original.md §2).

Each level (``level_1``, ``level_2``; no weight sharing) builds a per-point feature
concat[xyz (3), global PointNet feature (64), local feature (256)] = 323 channels, adds 0.2 x the
feature of the nearest previous-level input point (levels >= 2), repeats every point ``upsample`` times
with a 2-D grid code appended (output point r*i + c = input point i with code c) and decodes each copy to
xyz with a shared MLP. The local feature is EdgeConv/DGCNN (the original) or, by config, a
PointNet++-style set-abstraction / feature-propagation network (``pointnet2.py``).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

import xla_ops
from dpcr_jax.models.layers import (BatchNorm, Initializer, glorot_uniform, tflearn_batch_norm, uniform_scaling,
                                    zeros)


class PuConv(nn.Module):
  """``pu_util.conv2d`` with a 1x1 kernel: Glorot kernel, zero bias, BN (eps 1e-3, over all but C), ReLU."""
  features: int
  bn_momentum: float = 0.9
  bn_zero_init_stats: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """x [..., C] -> [..., features]."""
    x = nn.Dense(self.features, kernel_init=glorot_uniform, bias_init=zeros, name="conv")(x)
    x = BatchNorm(self.bn_momentum, 1e-3, zero_init_stats=self.bn_zero_init_stats, name="bn")(x, train)
    return nn.relu(x)


class TflearnMLP(nn.Module):
  """tflearn conv_1d (kernel 1, uniform_scaling, zero bias) + tflearn BN + ReLU per layer
  (``encoder_with_convs_and_symmetry`` / ``decoder_with_convs_only``); ``out_features`` adds a last linear
  conv with no BN. x [..., C] -> [..., channels[-1] or out_features]."""
  channels: Sequence[int]
  frozen_bn: bool
  out_features: int | None = None
  out_kernel_init: Initializer = uniform_scaling

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i, channels in enumerate(self.channels, start=1):
      x = nn.Dense(channels, kernel_init=uniform_scaling, bias_init=zeros, name=f"conv_{i}")(x)
      x = nn.relu(tflearn_batch_norm(self.frozen_bn, name=f"bn_{i}")(x, train))
    if self.out_features is not None:
      x = nn.Dense(self.out_features, kernel_init=self.out_kernel_init, bias_init=zeros, name="conv_out")(x)
    return x


class EdgeConvFeature(nn.Module):
  """Dynamic-graph EdgeConv local feature (DGCNN part of docs/original.md §2.2): points [B, N, 3] -> [B, N, agg].

  Three EdgeConvs (scopes dgcnn1, dgcnn2, dgcnn4 as in the original), each with its kNN (self included)
  recomputed in the previous layer's feature space, edge feature [x_i, x_j - x_i], PuConv, max over the
  k neighbours; then ``agg`` (PuConv) on the concatenation of the three.
  """
  k: int = 20
  edge_channels: Sequence[int] = (32, 64, 128)
  agg_channels: int = 256
  bn_momentum: float = 0.9
  bn_zero_init_stats: bool = True
  ops_impl: str = "ffi"

  @nn.compact
  def __call__(self, points: jax.Array, train: bool) -> jax.Array:
    features, per_layer = points, []
    for name, channels in zip(("dgcnn1", "dgcnn2", "dgcnn4"), self.edge_channels):
      graph = jax.lax.stop_gradient(features)  # the original's top_k indices carry no gradient
      _, idx = xla_ops.knn(graph, graph, self.k, impl=self.ops_impl)  # [B, N, k]
      neighbours = xla_ops.group_points(features, idx, impl=self.ops_impl)  # [B, N, k, C]
      centre = jnp.broadcast_to(features[:, :, None, :], neighbours.shape)
      edge = jnp.concatenate([centre, neighbours - centre], axis=-1)
      conv = PuConv(channels, self.bn_momentum, self.bn_zero_init_stats, name=name)
      features = jnp.max(conv(edge, train), axis=2)
      per_layer.append(features)
    agg = PuConv(self.agg_channels, self.bn_momentum, self.bn_zero_init_stats, name="agg")
    return agg(jnp.concatenate(per_layer, axis=-1), train)


def grid_codes(upsample: int, scale: float) -> jax.Array:
  """The original's 2-D grid codes [upsample, 2]: meshgrid('xy') of linspace(-scale, scale, sqrt(upsample)),
  flattened row-major; for 4: (-s,-s), (s,-s), (-s,s), (s,s)."""
  side = math.isqrt(upsample)
  if side * side != upsample:
    raise ValueError(f"upsample must be a perfect square, got {upsample}")
  line = jnp.linspace(-scale, scale, side, dtype=jnp.float32)
  gx, gy = jnp.meshgrid(line, line, indexing="xy")
  return jnp.stack([gx, gy], axis=-1).reshape(upsample, 2)


def expand_with_grid(features: jax.Array, upsample: int, scale: float) -> jax.Array:
  """[B, N, C] -> [B, upsample*N, C+2]: row r*i + c is point i's feature with grid code c."""
  b, n, c = features.shape
  repeated = jnp.repeat(features, upsample, axis=1)
  codes = jnp.tile(grid_codes(upsample, scale), (n, 1))
  return jnp.concatenate([repeated, jnp.broadcast_to(codes, (b, n * upsample, 2))], axis=-1)


class DenseLevel(nn.Module):
  """One x``upsample`` level: points [B, N, 3] (+ previous level's points and feature) ->
  (points [B, upsample*N, 3], concat feature [B, N, 3 + global + local]) (docs/original.md §2.2)."""
  local_feature: Callable[..., nn.Module]  # e.g. functools.partial(EdgeConvFeature, k=20): [B,N,3] -> [B,N,C]
  upsample: int = 4
  skip_weight: float = 0.2
  grid_scale: float = 0.1
  global_channels: Sequence[int] = (32, 64, 64)
  decoder_channels: Sequence[int] = (128, 128, 64)
  frozen_bn: bool = True
  predict_offsets: bool = False  # True: output = input point + decoded offset (a deviation, see default config)
  ops_impl: str = "ffi"

  @nn.compact
  def __call__(self, points: jax.Array, skip: tuple[jax.Array, jax.Array] | None, train: bool):
    b, n, _ = points.shape
    global_feature = jnp.max(TflearnMLP(self.global_channels, self.frozen_bn, name="global")(points, train), axis=1)
    local = self.local_feature(name="local")(points, train)
    feature = jnp.concatenate(
        [points, jnp.broadcast_to(global_feature[:, None, :], (b, n, global_feature.shape[-1])), local], axis=-1)
    if skip is not None:  # nearest previous-level input point (by xyz), its feature scaled by skip_weight
      prev_points, prev_feature = skip
      _, idx = xla_ops.knn(jax.lax.stop_gradient(points), jax.lax.stop_gradient(prev_points), 1, impl=self.ops_impl)
      feature = feature + self.skip_weight * xla_ops.group_points(prev_feature, idx, impl=self.ops_impl)[:, :, 0]
    expanded = expand_with_grid(feature, self.upsample, self.grid_scale)
    # With offsets the last layer starts at zero: an untrained level returns its input points.
    decoder = TflearnMLP(self.decoder_channels, self.frozen_bn, out_features=3,
                         out_kernel_init=zeros if self.predict_offsets else uniform_scaling, name="decoder")
    new_points = decoder(expanded, train)
    if self.predict_offsets:  # row r*i + c comes from input point i
      new_points = new_points + jnp.repeat(points, self.upsample, axis=1)
    return new_points, feature


class DenseNet(nn.Module):
  """points [B, N, 3] -> {'mid': [B, r*N, 3], 'dense': [B, r^2*N, 3]} for 2 levels (r = upsample).

  With ``levels`` L >= 2, 'dense' is the last level's output and 'mid' the one before.
  """
  level: Callable[..., DenseLevel]  # e.g. functools.partial(DenseLevel, local_feature, upsample=4); no shared weights
  levels: int = 2

  @nn.compact
  def upsample_points(self, points: jax.Array, train: bool) -> list[jax.Array]:
    """points [B, N, 3] -> [[B, r*N, 3], [B, r^2*N, 3], ...] (one per level)."""
    if points.ndim != 3 or points.shape[-1] != 3:
      raise ValueError(f"points must have shape [B, N, 3], got {points.shape}")
    outputs, skip = [], None
    for level in range(1, self.levels + 1):
      new_points, feature = self.level(name=f"level_{level}")(points, skip, train)
      skip, points = (points, feature), new_points
      outputs.append(points)
    return outputs

  def __call__(self, batch: dict, train: bool) -> dict:
    *_, mid, dense = self.upsample_points(batch["points_sparse"], train)
    return {"mid": mid, "dense": dense}
