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


def levels() -> list[float]:
  """The level of each round: -4^j for j = 7..-1, then 0."""
  return [0.0 if j == -2 else -(4.0 ** j) for j in range(7, -3, -1)]


def approx_match_factors(xyz1: np.ndarray, xyz2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The rounds of ``approx_match`` keeping only per-point state: returns ratio_l [10, n] and ratio_r [10, m]
  (float64) with match[l, k] = sum_r exp(level_r d2[l, k]) ratio_l[r, k] ratio_r[r, l]
  (``match_from_factors``). The column sums of each round are accumulated row by row, so nothing of size
  m x n is kept (the form of xla_ops_emd)."""
  p = xyz1.astype(np.float64)
  q = xyz2.astype(np.float64)
  n, m = len(p), len(q)
  mass_l, mass_r = masses(n, m)
  remain_l, remain_r = np.full(n, mass_l), np.full(m, mass_r)
  ratio_l, ratio_r = np.zeros((10, n)), np.zeros((10, m))
  for r, level in enumerate(levels()):
    col = np.zeros(n)
    for l in range(m):  # pass 1: column sums, one row at a time
      col += np.exp(level * ((q[l] - p) ** 2).sum(-1)) * remain_r[l]
    ratio_l[r] = remain_l / (1e-9 + col)
    used = np.zeros(n)
    for l in range(m):  # passes 2 and 3 of row l
      e = np.exp(level * ((q[l] - p) ** 2).sum(-1))
      s = remain_r[l] * (e * ratio_l[r]).sum()
      ratio_r[r, l] = min(remain_r[l] / (s + 1e-9), 1.0) * remain_r[l]
      remain_r[l] = max(0.0, remain_r[l] - s)
      used += e * ratio_l[r] * ratio_r[r, l]
    remain_l = np.maximum(0.0, remain_l - used)
  return ratio_l, ratio_r


def match_from_factors(xyz1: np.ndarray, xyz2: np.ndarray, ratio_l: np.ndarray, ratio_r: np.ndarray) -> np.ndarray:
  """match [m, n] rebuilt from ``approx_match_factors``."""
  p, q = xyz1.astype(np.float64), xyz2.astype(np.float64)
  d2 = ((q[:, None, :] - p[None, :, :]) ** 2).sum(-1)
  return sum(np.exp(level * d2) * ratio_l[r][None, :] * ratio_r[r][:, None] for r, level in enumerate(levels()))


def earth_mover_distance(xyz1: np.ndarray, xyz2: np.ndarray, normalize_scale: bool = False) -> float:
  """match_cost(xyz1, xyz2, approx_match(xyz1, xyz2)); with normalize_scale, s * EMD(xyz1 / s, xyz2 / s) where
  s is the largest side of the joint bounding box of both clouds (1 where 0)."""
  s = 1.0
  if normalize_scale:
    both = np.concatenate([xyz1, xyz2]).astype(np.float64)
    side = float((both.max(0) - both.min(0)).max())
    s = side if side > 0 else 1.0
  p, q = xyz1.astype(np.float64) / s, xyz2.astype(np.float64) / s
  return s * match_cost(p, q, approx_match(p, q))
