"""numpy references for ball_query, group_points (and its gradient) and knn (the test oracle).

Written from the semantics in docs/ops.md, independently of the C++ code: per-query loops and a stable
sort. Distances are float32 ``(dx*dx + dy*dy) + dz*dz`` for ball_query; knn ranks float64 distances (exact
ties, e.g. duplicate points, are exact in both precisions; test data has no near-ties), NaN ranked as +inf.
"""
from __future__ import annotations

import numpy as np


def _flat(x: np.ndarray, core: int) -> np.ndarray:
  return x.reshape((-1,) + x.shape[x.ndim - core:])


def ball_query(xyz: np.ndarray, new_xyz: np.ndarray, radius: float, nsample: int):
  """xyz [..., N, 3], new_xyz [..., M, 3] -> (idx int32 [..., M, nsample], count int32 [..., M])."""
  xyz, new_xyz = np.asarray(xyz, np.float32), np.asarray(new_xyz, np.float32)
  r2 = np.float32(radius) * np.float32(radius)
  px, pq = _flat(xyz, 2), _flat(new_xyz, 2)
  idx = np.zeros(pq.shape[:2] + (nsample,), np.int32)
  count = np.zeros(pq.shape[:2], np.int32)
  with np.errstate(invalid="ignore", over="ignore"):
    for b in range(len(pq)):
      for m, q in enumerate(pq[b]):
        diff = px[b] - q
        d = (diff[:, 0] * diff[:, 0] + diff[:, 1] * diff[:, 1]) + diff[:, 2] * diff[:, 2]
        hits = np.flatnonzero(d < r2)[:nsample]
        count[b, m] = len(hits)
        if len(hits):
          idx[b, m, :] = hits[0]
          idx[b, m, :len(hits)] = hits
  batch = new_xyz.shape[:-2]
  return idx.reshape(batch + idx.shape[1:]), count.reshape(batch + count.shape[1:])


def group_points(points: np.ndarray, idx: np.ndarray) -> np.ndarray:
  """points [..., N, C], idx [..., M, K] -> [..., M, K, C]."""
  points, idx = np.asarray(points), np.asarray(idx)
  pp, pi = _flat(points, 2), _flat(idx, 2)
  out = np.stack([pp[b][pi[b]] for b in range(len(pp))])
  return out.reshape(idx.shape + points.shape[-1:])


def group_points_grad(grad_out: np.ndarray, idx: np.ndarray, npoints: int) -> np.ndarray:
  """grad_out [..., M, K, C], idx [..., M, K] -> grad_points [..., npoints, C] (scatter-add, float64)."""
  grad_out, idx = np.asarray(grad_out, np.float64), np.asarray(idx)
  pg, pi = _flat(grad_out, 3), _flat(idx, 2)
  out = np.zeros((len(pg), npoints, grad_out.shape[-1]))
  for b in range(len(pg)):
    np.add.at(out[b], pi[b].reshape(-1), pg[b].reshape(-1, grad_out.shape[-1]))
  return out.reshape(idx.shape[:-2] + out.shape[1:])


def knn(query: np.ndarray, ref: np.ndarray, k: int):
  """query [..., M, C], ref [..., N, C] -> (squared dist float64 [..., M, k] ascending, idx int32 [..., M, k]).

  Ties go to the lowest index (stable sort); NaN distances rank as +inf (the distance reported is NaN).
  """
  query, ref = np.asarray(query, np.float64), np.asarray(ref, np.float64)
  pq, pr = _flat(query, 2), _flat(ref, 2)
  dist = np.zeros(pq.shape[:2] + (k,))
  idx = np.zeros(pq.shape[:2] + (k,), np.int32)
  with np.errstate(invalid="ignore", over="ignore"):
    for b in range(len(pq)):
      for m, q in enumerate(pq[b]):
        d = np.sum((pr[b] - q) ** 2, axis=-1)
        order = np.argsort(np.where(np.isnan(d), np.inf, d), kind="stable")[:k]
        idx[b, m], dist[b, m] = order, d[order]
  batch = query.shape[:-2]
  return dist.reshape(batch + dist.shape[1:]), idx.reshape(batch + idx.shape[1:])
