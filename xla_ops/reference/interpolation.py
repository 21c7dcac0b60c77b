"""numpy references for three_nn, three_interpolate (and its gradient) and inverse_distance_weights.

All functions take one example (no batch dims); tests loop over the batch.
"""
from __future__ import annotations

import numpy as np


def three_nn(unknown: np.ndarray, known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """unknown [n, 3], known [m, 3] -> squared dist [n, 3] ascending (float64), idx [n, 3] int32.

  Ties go to the lowest index (stable sort); with m < 3 the missing slots are idx 0, dist +inf.
  """
  d = ((unknown[:, None, :].astype(np.float64) - known[None, :, :].astype(np.float64)) ** 2).sum(-1)
  order = np.argsort(d, axis=1, kind="stable")[:, :3]
  dist = np.take_along_axis(d, order, axis=1)
  k = order.shape[1]
  idx = np.zeros((unknown.shape[0], 3), np.int32)
  out = np.full((unknown.shape[0], 3), np.inf)
  idx[:, :k] = order
  out[:, :k] = dist
  return out, idx


def three_interpolate(features: np.ndarray, idx: np.ndarray, weight: np.ndarray) -> np.ndarray:
  """features [m, C], idx [n, 3], weight [n, 3] -> [n, C] = sum_i weight_i * features[idx_i]."""
  return np.einsum("nk,nkc->nc", weight.astype(np.float64), features.astype(np.float64)[idx])


def three_interpolate_grad(grad_out: np.ndarray, idx: np.ndarray, weight: np.ndarray, npoints: int):
  """Gradients of sum(grad_out * three_interpolate(...)): (to features [m, C], to weight [n, 3])."""
  grad_features = np.zeros((npoints, grad_out.shape[-1]))
  for j in range(3):
    np.add.at(grad_features, idx[:, j], weight[:, j:j + 1].astype(np.float64) * grad_out)
  return grad_features


def three_interpolate_weight_grad(grad_out: np.ndarray, features: np.ndarray, idx: np.ndarray) -> np.ndarray:
  """Gradient of sum(grad_out * three_interpolate(features, idx, weight)) w.r.t. weight: [n, 3]."""
  return np.einsum("nc,nkc->nk", grad_out.astype(np.float64), features.astype(np.float64)[idx])


def inverse_distance_weights(dist: np.ndarray) -> np.ndarray:
  """dist [..., 3] -> (1 / max(d, 1e-10)) normalised over the last axis."""
  w = 1.0 / np.maximum(dist.astype(np.float64), 1e-10)
  return w / w.sum(-1, keepdims=True)
