"""Layers shared by the sparse and dense networks, matching the original TF 1.4 / tflearn layers.

- ``uniform_scaling``: tflearn's default initializer, U(-sqrt(3/fan_in), +sqrt(3/fan_in)) with
  fan_in = product of all kernel dims but the last (docs/original.md §1.3).
- ``BatchNorm``: one batch norm that covers the three flavours of the original (docs/original.md §1.4, §2.2, §2.3):
  the hand-written residual-block BN (eps 1e-3, EMA decay 0.5), ``pu_util.batch_norm_template``
  (eps 1e-3, decay 0.9) and tflearn's ``batch_normalization`` whose statistics never update (a
  learnable affine over fixed 0/1 statistics).
- ``tf_conv_transpose``: a transposed conv with TF's 'SAME' semantics for output = input * stride.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[..., jax.Array]

glorot_uniform = nn.initializers.glorot_uniform()  # tf.layers / pu_util default (Xavier uniform)
zeros = nn.initializers.zeros


def uniform_scaling(key, shape, dtype=jnp.float32):
  """tflearn 'uniform_scaling': U(-sqrt(3/fan_in), sqrt(3/fan_in)), fan_in = prod(shape[:-1])."""
  limit = np.sqrt(3.0 / np.prod(shape[:-1]))
  return jax.random.uniform(key, shape, dtype, -limit, limit)


def tflearn_gamma_init(key, shape, dtype=jnp.float32):
  """tflearn BN gamma: N(1, 0.002)."""
  return 1.0 + 0.002 * jax.random.normal(key, shape, dtype)


class BatchNorm(nn.Module):
  """Batch norm over every axis but the last, with an EMA of the batch moments for inference.

  Attributes:
    momentum: EMA decay: ``ra = momentum * ra + (1 - momentum) * batch_stat`` (TF ``decay``).
    epsilon: added to the variance.
    scale_init: initializer of gamma (beta starts at 0).
    frozen_stats: tflearn's never-trained BN (docs/original.md §2.3): always normalise with mean 0, variance 1
      (``y = gamma * x / sqrt(1 + eps) + beta``), in training too; no batch_stats variables.
    zero_init_stats: start the EMA of mean *and* variance at 0, as TF's ``ExponentialMovingAverage`` on a
      tensor does (no zero-debias). False: mean 0, variance 1 (flax's default).
  """
  momentum: float
  epsilon: float
  scale_init: Initializer = nn.initializers.ones
  frozen_stats: bool = False
  zero_init_stats: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """x [..., C] -> [..., C]."""
    channels = x.shape[-1]
    scale = self.param("scale", self.scale_init, (channels,))
    bias = self.param("bias", zeros, (channels,))
    if self.frozen_stats:
      return x * (scale / jnp.sqrt(1.0 + self.epsilon)) + bias
    var_init = zeros if self.zero_init_stats else nn.initializers.ones
    ra_mean = self.variable("batch_stats", "mean", zeros, None, (channels,))
    ra_var = self.variable("batch_stats", "var", var_init, None, (channels,))
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x, axis=axes)
      var = jnp.mean(jnp.square(x - mean), axis=axes)  # biased, as tf.nn.moments
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * var
    else:
      mean, var = ra_mean.value, ra_var.value
    return (x - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias


def tflearn_batch_norm(frozen: bool, name: str | None = None) -> BatchNorm:
  """tflearn ``batch_normalization`` defaults (eps 1e-5, decay 0.9, gamma ~ N(1, 0.002)).

  frozen=True is what the original actually ran (docs/original.md §2.3); False is a real BN (a deviation).
  """
  return BatchNorm(momentum=0.9, epsilon=1e-5, scale_init=tflearn_gamma_init, frozen_stats=frozen, name=name)


def tf_same_transpose_padding(kernel: int, stride: int) -> tuple[int, int]:
  """Padding of the stride-dilated input that reproduces TF ``conv2d_transpose(padding='SAME')``.

  TF's transposed conv is the gradient of a SAME conv from ``in * stride`` to ``in``: that conv pads
  ``total = max(kernel - stride, 0)`` split as (total // 2, total - total // 2) (extra at the end). Its
  gradient pads the dilated input by (kernel - 1 - before, kernel - 1 - after), e.g. (3, 2) for 5x5/2.
  """
  if kernel < stride:
    raise ValueError(f"kernel ({kernel}) must be >= stride ({stride}) for an output of input * stride")
  total = kernel - stride
  before = total // 2
  return kernel - 1 - before, kernel - 1 - (total - before)


def tf_conv_transpose(features: int, kernel_size: int, stride: int, name: str | None = None,
                      kernel_init: Initializer = uniform_scaling) -> nn.ConvTranspose:
  """TF/tflearn ``conv_2d_transpose(..., padding='same')`` with output size = input size * stride.

  Maps [B, H, W, C] -> [B, H*stride, W*stride, features]. The kernel layout is [k, k, out, in] as TF's
  (flax ``transpose_kernel=True``: spatially flipped, in/out swapped), so tflearn's uniform_scaling
  fan_in is k*k*out exactly as in the original. The padding is explicit so that the TF semantics are
  visible and tested (tests/test_models.py checks it against a scatter reference of TF's op); jax's own
  ``conv_transpose(padding='SAME')`` computes the same padding, so the one-pixel shift one might fear (docs/original.md §1.3) does
  not apply to it.
  """
  pad = tf_same_transpose_padding(kernel_size, stride)
  return nn.ConvTranspose(features, (kernel_size,) * 2, strides=(stride,) * 2, padding=(pad, pad),
                          transpose_kernel=True, kernel_init=kernel_init, bias_init=zeros, name=name)


def scaled(channels: int, width: float) -> int:
  """Channel count times the width multiplier (at least 1)."""
  return max(1, int(round(channels * width)))

