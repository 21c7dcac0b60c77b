"""Stage 1, the sparse network: image [B, S, S, 3] -> points [B, (S/8)^2, 3] (docs/original.md §1).

Residual-attention encoder (tf.layers convs: Glorot-uniform kernels, zero biases, linear) and a tflearn
conv / transposed-conv decoder with U-Net skips from the three pooled encoder maps (uniform_scaling
kernels, L2 weight decay on the 11 decoder kernels only, which live under the ``decoder`` submodule).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpcr_jax.models.layers import BatchNorm, glorot_uniform, scaled, tf_conv_transpose, uniform_scaling, zeros


def _conv(features: int, kernel: int, stride: int = 1, name: str | None = None) -> nn.Conv:
  """tf.layers.conv2d(padding='same'), linear, Glorot-uniform kernel, zero bias."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME",
                 kernel_init=glorot_uniform, bias_init=zeros, name=name)


def _tflearn_conv(features: int, kernel: int, stride: int = 1, name: str | None = None) -> nn.Conv:
  """tflearn conv_2d(padding='same'), uniform_scaling kernel, zero bias (activation applied by caller)."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME",
                 kernel_init=uniform_scaling, bias_init=zeros, name=name)


def _max_pool(x: jax.Array, window: int) -> jax.Array:
  """Max pool window x window, stride 2, TF 'SAME' (pads with -inf at the end)."""
  return nn.max_pool(x, (window, window), strides=(2, 2), padding="SAME")


def _upsample_nearest(x: jax.Array) -> jax.Array:
  """Keras UpSampling2D([2, 2]): [B, H, W, C] -> [B, 2H, 2W, C]."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class ResidualBlock(nn.Module):
  """Pre-activation residual block (``basic_layers.ResidualBlock``): [B,H,W,Cin] -> [B,H,W,out_channels].

  BN-ReLU, 1x1 conv, BN-ReLU, 3x3 conv; plus the input, projected by a 1x1 conv on the *raw* input when
  the channel count changes. No activation after the add.
  """
  out_channels: int
  bn_momentum: float
  bn_zero_init_stats: bool

  def _bn_relu(self, x, train, name):
    bn = BatchNorm(momentum=self.bn_momentum, epsilon=1e-3, zero_init_stats=self.bn_zero_init_stats, name=name)
    return nn.relu(bn(x, train))

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = self._bn_relu(x, train, "bn1")
    y = _conv(self.out_channels, 1, name="conv1")(y)
    y = self._bn_relu(y, train, "bn2")
    y = _conv(self.out_channels, 3, name="conv2")(y)
    shortcut = x if x.shape[-1] == self.out_channels else _conv(self.out_channels, 1, name="shortcut")(x)
    return y + shortcut


class AttentionModule(nn.Module):
  """Residual attention module (p=1, t=2, r=1), spatial size and channels preserved (docs/original.md §1.1).

  out = RB((1 + M) * T) with trunk T = RB(RB(u)), u = RB(x), and the soft mask M from a two-level
  max-pool / nearest-upsample hourglass on u ending in two 1x1 convs and a sigmoid.
  """
  bn_momentum: float
  bn_zero_init_stats: bool

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """x [B, H, W, C] (H, W divisible by 4) -> [B, H, W, C]."""
    channels = x.shape[-1]

    def rb(name):
      return ResidualBlock(channels, self.bn_momentum, self.bn_zero_init_stats, name=name)

    u = rb("first")(x, train)
    trunk = rb("trunk_2")(rb("trunk_1")(u, train), train)
    m1 = rb("down_1")(_max_pool(u, 2), train)
    skip = rb("skip")(m1, train)
    m2 = rb("down_2")(_max_pool(m1, 2), train)
    m = _upsample_nearest(rb("up_1")(m2, train)) + skip
    m = _upsample_nearest(rb("up_2")(m, train))
    m = _conv(channels, 1, name="mask_conv1")(m)
    mask = nn.sigmoid(_conv(channels, 1, name="mask_conv2")(m))
    return rb("last")((1.0 + mask) * trunk, train)


class Encoder(nn.Module):
  """Linear stem, three attention stages, three residual blocks (docs/original.md §1.2).

  Returns (features [B, S/32, S/32, 512w], x1 [B, S/8, S/8, 128w], x2 [B, S/16, ., 256w], x3 [B, S/32, ., 512w]).
  """
  width: float
  bn_momentum: float
  bn_zero_init_stats: bool

  @nn.compact
  def __call__(self, image: jax.Array, train: bool):
    c = lambda n: scaled(n, self.width)  # noqa: E731
    x = _conv(c(16), 5, 2, name="stem_1")(image)
    x = _conv(c(32), 3, name="stem_2")(x)
    x = _conv(c(32), 3, name="stem_3")(x)
    x = _conv(c(64), 3, 2, name="stem_4")(x)
    pooled = []
    for i, channels in enumerate((c(128), c(256), c(512)), start=1):
      x = AttentionModule(self.bn_momentum, self.bn_zero_init_stats, name=f"attention_{i}")(x, train)
      x = ResidualBlock(channels, self.bn_momentum, self.bn_zero_init_stats, name=f"residual_{i}")(x, train)
      x = _max_pool(x, 3)
      pooled.append(x)
    for i in range(4, 7):
      x = ResidualBlock(c(512), self.bn_momentum, self.bn_zero_init_stats, name=f"residual_{i}")(x, train)
    return (x, *pooled)


class Decoder(nn.Module):
  """tflearn decoder (docs/original.md §1.3); its convs are exactly the 11 L2-decayed tflearn layers.

  For an S x S image: features and x3 [B, S/32, S/32, .], x2 [B, S/16, ...], x1 [B, S/8, ...] ->
  points [B, (S/8)^2, 3] with point index = (S/8) * row + col. conv_1 (5x5/2) goes to S/64, then three
  transposed convs (5x5/2) back up to S/32, S/16, S/8, each added to a 3x3 conv of the encoder map.
  """
  width: float

  @nn.compact
  def __call__(self, features, x1, x2, x3):
    c = lambda n: scaled(n, self.width)  # noqa: E731
    x = nn.relu(_tflearn_conv(c(512), 5, 2, name="conv_1")(features))
    for i, (channels, skip) in enumerate(((c(256), x3), (c(128), x2), (c(64), x1)), start=2):
      up = tf_conv_transpose(channels, 5, 2, name=f"deconv_{i}")(x)
      x = nn.relu(up + _tflearn_conv(channels, 3, name=f"skip_{i}")(skip))
      x = nn.relu(_tflearn_conv(channels, 3, name=f"conv_{i}")(x))
    x = _tflearn_conv(3, 3, name="conv_out")(x)
    return x.reshape(x.shape[0], -1, 3)


class SparseNet(nn.Module):
  """image [B, S, S, 3] in [0, 1] -> {'sparse': [B, (S/8)^2, 3]} (camera-frame xyz)."""
  width: float = 1.0
  bn_momentum: float = 0.5
  bn_zero_init_stats: bool = True

  @nn.compact
  def reconstruct(self, image: jax.Array, train: bool) -> jax.Array:
    """image [B, S, S, 3] (S divisible by 64) -> points [B, (S/8)^2, 3]."""
    size = image.shape[1]
    if image.ndim != 4 or image.shape[2] != size or image.shape[3] != 3 or size % 64:
      raise ValueError(f"image must have shape [B, S, S, 3] with S divisible by 64, got {image.shape}")
    encoder = Encoder(self.width, self.bn_momentum, self.bn_zero_init_stats, name="encoder")
    return Decoder(self.width, name="decoder")(*encoder(image, train))

  def __call__(self, batch: dict, train: bool) -> dict:
    return {"sparse": self.reconstruct(batch["image"], train)}


def decoder_kernels(sparse_params) -> list[jax.Array]:
  """The 11 tflearn decoder kernels (the only L2-regularised weights, docs/original.md §4.1) of SparseNet params."""
  return [layer["kernel"] for layer in sparse_params["decoder"].values()]
