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


def _pair_sq_dist(x, y, idx):
  """float64 squared distances of x [..., N, 3] to y[idx] [..., N, 3]."""
  y_idx = np.take_along_axis(y.astype(np.float64), idx[..., None].astype(np.int64), axis=-2)
  return np.sum((x.astype(np.float64) - y_idx) ** 2, axis=-1)


def chamfer_distance(a, b, weight_ab: float = 1.0, weight_ba: float = 1.0, reduction: str = "mean", *,
                     point_reduction: str = "mean", single_directional: bool = False, squared: bool = True,
                     weights=None):
  """The Chamfer distance with xla_ops.chamfer_distance's options, in float64 from the float32 nearest pairs.

  Defaults: ``weight_ab * mean_i d(a_i, b) + weight_ba * mean_j d(b_j, a)`` per example [...], or its mean.
  """
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  _, idx_ab, _, idx_ba = nn_distance(a, b)
  f_ab, f_ba = _pair_sq_dist(a, b, idx_ab), _pair_sq_dist(b, a, idx_ba)
  if not squared:
    f_ab, f_ba = np.sqrt(f_ab), np.sqrt(f_ba)
  w = None if weights is None else np.asarray(weights, np.float64)
  if point_reduction == "none":
    out_ab = weight_ab * f_ab * (1.0 if w is None else w[..., None])
    out_ba = weight_ba * f_ba * (1.0 if w is None else w[..., None])
    return out_ab if single_directional else (out_ab, out_ba)
  reduce = {"mean": np.mean, "sum": np.sum, "max": np.max}[point_reduction]
  r_ab, r_ba = weight_ab * reduce(f_ab, axis=-1), weight_ba * reduce(f_ba, axis=-1)
  if single_directional:
    per_example = r_ab
  elif point_reduction == "max":
    per_example = np.maximum(r_ab, r_ba)
  else:
    per_example = r_ab + r_ba
  if w is not None:
    per_example = per_example * w
  if reduction == "none":
    return per_example
  if reduction == "sum":
    return per_example.sum()
  if w is None:
    return per_example.mean()
  return per_example.sum() / w.sum() if w.sum() != 0 else 0.0


def chamfer_distance_options_grad(a, b, weight_ab: float = 1.0, weight_ba: float = 1.0, reduction: str = "mean",
                                  *, point_reduction: str = "mean", single_directional: bool = False,
                                  squared: bool = True, weights=None):
  """Gradient w.r.t. (a, b) of ``chamfer_distance(...)`` with the same options (float64, analytic).

  reduction "none" / point_reduction "none": the gradient of the sum of the outputs. With the nearest pairs
  fixed, each term is ``c * g(e)`` with ``e = |x - y|^2``, ``g(e) = e`` (squared) or ``sqrt(e)`` (0 slope at
  e = 0), contributing ``c * g'(e) * 2 (x - y)`` to x and the negative to y; "max" picks the first largest
  point (and direction) only (tests avoid ties).
  """
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  _, idx_ab, _, idx_ba = nn_distance(a, b)
  a64, b64 = a.astype(np.float64), b.astype(np.float64)
  e_ab, e_ba = _pair_sq_dist(a, b, idx_ab), _pair_sq_dist(b, a, idx_ba)
  f_ab, f_ba = (e_ab, e_ba) if squared else (np.sqrt(e_ab), np.sqrt(e_ba))
  batch = a.shape[:-2]
  w = np.ones(batch) if weights is None else np.asarray(weights, np.float64)
  if reduction == "mean":
    example_coef = w / (w.sum() if weights is not None else w.size) if (weights is None or w.sum() != 0) else 0 * w
  else:
    example_coef = w
  grad_a, grad_b = np.zeros_like(a64), np.zeros_like(b64)
  for i in np.ndindex(*batch):
    coefs = []
    for f, weight in ((f_ab[i], weight_ab), (f_ba[i], weight_ba)):
      if point_reduction in ("mean", "none", "sum"):
        c = np.full(f.shape, weight / (len(f) if point_reduction == "mean" else 1.0))
      else:
        c = np.zeros(f.shape)
        c[np.argmax(f)] = weight
      coefs.append(c)
    if single_directional:
      coefs[1] = 0 * coefs[1]
    elif point_reduction == "max":
      keep = 0 if weight_ab * f_ab[i].max() >= weight_ba * f_ba[i].max() else 1
      coefs[1 - keep] = 0 * coefs[1 - keep]
    for (x, y, gx, gy, idx, e), c in zip(((a64[i], b64[i], grad_a[i], grad_b[i], idx_ab[i], e_ab[i]),
                                         (b64[i], a64[i], grad_b[i], grad_a[i], idx_ba[i], e_ba[i])), coefs):
      slope = np.ones_like(e) if squared else np.where(e > 0, 0.5 / np.sqrt(np.where(e > 0, e, 1.0)), 0.0)
      g = (example_coef[i] * c * slope * 2.0)[:, None] * (x - y[idx])
      gx += g
      np.add.at(gy, idx, -g)
  return grad_a, grad_b


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
