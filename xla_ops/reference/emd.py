"""numpy references for approx_match, match_cost and its gradient (one example, float64).

approx_match follows the GPU kernel of the original (metric/tf_approxmatch_g.cu) as described in
docs/original.md §5, written here over the dense [m, n] matrices: 10 rounds, level = -4^j for
j = 7..-1 and 0 in the last round; masses 1 and floor(n/m) (or floor(m/n) and 1).
"""
from __future__ import annotations

import numpy as np


def masses(n: int, m: int) -> tuple[float, float]:
  """(mass of each xyz1 point, mass of each xyz2 point)."""
  return (1.0, float(n // m)) if n >= m else (float(m // n), 1.0)


def approx_match(xyz1: np.ndarray, xyz2: np.ndarray) -> np.ndarray:
  """xyz1 [n, 3], xyz2 [m, 3] -> match [m, n] (float64)."""
  p = xyz1.astype(np.float64)
  q = xyz2.astype(np.float64)
  n, m = len(p), len(q)
  d2 = ((q[:, None, :] - p[None, :, :]) ** 2).sum(-1)  # [m, n]
  mass_l, mass_r = masses(n, m)
  remain_l = np.full(n, mass_l)
  remain_r = np.full(m, mass_r)
  match = np.zeros((m, n))
  for j in range(7, -3, -1):
    level = 0.0 if j == -2 else -(4.0 ** j)
    e = np.exp(level * d2)
    ratio_l = remain_l / (1e-9 + (e * remain_r[:, None]).sum(0))
    s = remain_r * (e * ratio_l[None, :]).sum(1)
    ratio_r = np.minimum(remain_r / (s + 1e-9), 1.0) * remain_r
    remain_r = np.maximum(0.0, remain_r - s)
    w = e * ratio_l[None, :] * ratio_r[:, None]
    match += w
    remain_l = np.maximum(0.0, remain_l - w.sum(0))
  return match


def match_cost(xyz1: np.ndarray, xyz2: np.ndarray, match: np.ndarray) -> float:
  """sum_{l,k} match[l, k] * ||xyz1[k] - xyz2[l]|| (Euclidean, not squared)."""
  diff = xyz1.astype(np.float64)[None, :, :] - xyz2.astype(np.float64)[:, None, :]  # [m, n, 3]
  return float((match * np.sqrt((diff ** 2).sum(-1))).sum())


def match_cost_grad(xyz1: np.ndarray, xyz2: np.ndarray, match: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Gradient of match_cost w.r.t. (xyz1 [n, 3], xyz2 [m, 3]), distances floored at 1e-10."""
  diff = xyz1.astype(np.float64)[None, :, :] - xyz2.astype(np.float64)[:, None, :]  # p_k - q_l, [m, n, 3]
  norm = np.maximum(np.sqrt((diff ** 2).sum(-1)), 1e-10)
  g = match[:, :, None] * diff / norm[:, :, None]
  return g.sum(0), -g.sum(1)
