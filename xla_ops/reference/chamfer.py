"""numpy references for nn_distance and the Chamfer distance (value and gradient), by brute force.

Distances are float32 ``(dx*dx + dy*dy) + dz*dz``, the order the C++ handler uses, so nearest indices agree
exactly, near-ties included. Ties go to the lowest index. Non-finite input follows the documented ffi
semantics: NaN distances never win and a query with no finite candidate distance gets (+inf, index 0).
"""
from __future__ import annotations

import numpy as np


def _nearest(x: np.ndarray, y: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
  """x [N, 3], y [M, 3] (float32) -> (squared distance [N] f32, index [N] i32) of each x's nearest y."""
  dist = np.empty(len(x), np.float32)
  idx = np.empty(len(x), np.int32)
  with np.errstate(invalid="ignore", over="ignore"):
    for start in range(0, len(x), chunk):
      q = x[start:start + chunk, None, :]
      diff = y[None, :, :] - q  # [chunk, M, 3], float32
      d = (diff[..., 0] * diff[..., 0] + diff[..., 1] * diff[..., 1]) + diff[..., 2] * diff[..., 2]
      d = np.where(np.isnan(d), np.float32(np.inf), d)
      j = np.argmin(d, axis=1)  # first minimum: the lowest index; 0 when every distance is +inf
      dist[start:start + chunk] = d[np.arange(len(j)), j]
      idx[start:start + chunk] = j
  return dist, idx


def nn_distance(a: np.ndarray, b: np.ndarray):
  """a [..., N, 3], b [..., M, 3] -> (dist_ab [..., N], idx_ab [..., N], dist_ba [..., M], idx_ba [..., M])."""
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  batch = a.shape[:-2]
  out = (np.empty(batch + a.shape[-2:-1], np.float32), np.empty(batch + a.shape[-2:-1], np.int32),
         np.empty(batch + b.shape[-2:-1], np.float32), np.empty(batch + b.shape[-2:-1], np.int32))
  for i in np.ndindex(*batch):
    out[0][i], out[1][i] = _nearest(a[i], b[i])
    out[2][i], out[3][i] = _nearest(b[i], a[i])
  return out


def chamfer_distance(a, b, weight_ab: float = 1.0, weight_ba: float = 1.0, reduction: str = "mean"):
  """``weight_ab * mean_i d(a_i, b) + weight_ba * mean_j d(b_j, a)`` per example [...] (float64), or its mean."""
  d_ab, _, d_ba, _ = nn_distance(a, b)
  per_example = weight_ab * d_ab.astype(np.float64).mean(-1) + weight_ba * d_ba.astype(np.float64).mean(-1)
  return per_example.mean() if reduction == "mean" else per_example


def chamfer_distance_grad(a, b, weight_ab: float = 1.0, weight_ba: float = 1.0):
  """Gradient of ``chamfer_distance(a, b, ..., reduction="mean")`` w.r.t. (a, b), float64.

  With the nearest pairs held fixed, d(a_i, b_j) = |a_i - b_j|^2 contributes 2 (a_i - b_j) to a_i and the
  negative to b_j (the original NnDistanceGrad).
  """
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  _, idx_ab, _, idx_ba = nn_distance(a, b)
  a64, b64 = a.astype(np.float64), b.astype(np.float64)
  grad_a, grad_b = np.zeros_like(a64), np.zeros_like(b64)
  num_examples = int(np.prod(a.shape[:-2]))
  n, m = a.shape[-2], b.shape[-2]
  for i in np.ndindex(*a.shape[:-2]):
    g = 2.0 * weight_ab / (num_examples * n) * (a64[i] - b64[i][idx_ab[i]])  # [N, 3]
    grad_a[i] += g
    np.add.at(grad_b[i], idx_ab[i], -g)
    g = 2.0 * weight_ba / (num_examples * m) * (b64[i] - a64[i][idx_ba[i]])  # [M, 3]
    grad_b[i] += g
    np.add.at(grad_a[i], idx_ba[i], -g)
  return grad_a, grad_b
