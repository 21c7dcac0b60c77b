"""A PointNet++ / PU-Net-style local feature, the config alternative to EdgeConv in the dense levels.

Not in the original's live path (it only imports pointnet_util, docs/original.md §2.1); this is our variant so
that every xla_ops op has a real user: set abstraction = farthest point sampling + ball query +
group_points + shared MLP + max pool; feature propagation = three_nn + inverse_distance_weights +
three_interpolate + shared MLP, back up to every input point; then a PuConv to ``agg_channels``.
Output has the same shape as EdgeConvFeature's, so the rest of the dense level is unchanged.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

import xla_ops
from dpcr_jax.models.dense import PuConv


class PointNet2Feature(nn.Module):
  """points [B, N, 3] -> local feature [B, N, agg_channels].

  Attributes:
    downsample: per set-abstraction level, the factor from the previous level's point count (FPS).
    radii: ball-query radius per level (in the points' units).
    nsample: neighbours kept per ball.
    sa_channels: shared-MLP channels per set-abstraction level.
    fp_channels: shared-MLP channels per feature-propagation step, coarsest step first.
  """
  downsample: Sequence[int] = (4, 4)
  radii: Sequence[float] = (0.1, 0.2)
  nsample: int = 16
  sa_channels: Sequence[Sequence[int]] = ((32, 32, 64), (64, 64, 128))
  fp_channels: Sequence[Sequence[int]] = ((128, 128), (128, 128))
  agg_channels: int = 256
  bn_momentum: float = 0.9
  bn_zero_init_stats: bool = True
  ops_impl: str = "ffi"

  def _mlp(self, x, channels, train, name):
    for i, c in enumerate(channels, start=1):
      x = PuConv(c, self.bn_momentum, self.bn_zero_init_stats, name=f"{name}_{i}")(x, train)
    return x

  @nn.compact
  def __call__(self, points: jax.Array, train: bool) -> jax.Array:
    if not (len(self.downsample) == len(self.radii) == len(self.sa_channels) == len(self.fp_channels)):
      raise ValueError("downsample, radii, sa_channels and fp_channels must have one entry per level")
    impl = self.ops_impl
    xyz, features = [points], [None]
    for level, (factor, radius, channels) in enumerate(zip(self.downsample, self.radii, self.sa_channels), 1):
      prev_xyz, prev_features = xyz[-1], features[-1]
      npoint = prev_xyz.shape[1] // factor
      if npoint < 1:
        raise ValueError(f"set abstraction {level} leaves no points ({prev_xyz.shape[1]} // {factor})")
      centre_idx = xla_ops.farthest_point_sample(prev_xyz, npoint, impl=impl)  # [B, M]
      centres = xla_ops.group_points(prev_xyz, centre_idx[..., None], impl=impl)[:, :, 0]  # [B, M, 3]
      # Every centre is one of prev_xyz, so no ball is empty; padded slots repeat the first hit.
      idx, _ = xla_ops.ball_query(jax.lax.stop_gradient(prev_xyz), jax.lax.stop_gradient(centres), radius,
                                  self.nsample, impl=impl)  # [B, M, nsample]
      grouped = xla_ops.group_points(prev_xyz, idx, impl=impl) - centres[:, :, None, :]
      if prev_features is not None:
        grouped = jnp.concatenate([grouped, xla_ops.group_points(prev_features, idx, impl=impl)], axis=-1)
      xyz.append(centres)
      features.append(jnp.max(self._mlp(grouped, channels, train, f"sa{level}"), axis=2))

    coarse = features[-1]
    for step, channels in enumerate(self.fp_channels, start=1):  # coarsest to finest
      fine_xyz, fine_features = xyz[-1 - step], features[-1 - step]
      dist, idx = xla_ops.three_nn(jax.lax.stop_gradient(fine_xyz), jax.lax.stop_gradient(xyz[-step]), impl=impl)
      weight = xla_ops.inverse_distance_weights(dist)
      interpolated = xla_ops.three_interpolate(coarse, idx, weight, impl=impl)  # [B, n_fine, C]
      if fine_features is not None:
        interpolated = jnp.concatenate([interpolated, fine_features], axis=-1)
      coarse = self._mlp(interpolated, channels, train, f"fp{step}")
    return PuConv(self.agg_channels, self.bn_momentum, self.bn_zero_init_stats, name="agg")(coarse, train)
