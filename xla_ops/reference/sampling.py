"""numpy reference for farthest point sampling (the test oracle; a plain loop over picks)."""
from __future__ import annotations

import numpy as np


def farthest_point_sample(xyz: np.ndarray, npoint: int, start=None) -> np.ndarray:
  """xyz [..., N, 3] -> int32 [..., npoint]: FPS from index 0 (or ``start`` [...] mod N), ties to the
  lowest index (with a start s: the first index in the cyclic order s, s+1, ..., N-1, 0, ..., s-1).

  Running squared distances (float32, ``(dx*dx + dy*dy) + dz*dz``) start at +inf; a NaN distance never
  replaces a running minimum; a picked point's distance becomes -1, so no point is picked twice.
  """
  xyz = np.asarray(xyz, np.float32)
  flat = xyz.reshape((-1,) + xyz.shape[-2:])
  out = np.zeros((flat.shape[0], npoint), np.int32)
  n = xyz.shape[-2]
  starts = np.zeros(len(flat), np.int64) if start is None else np.asarray(start, np.int64).reshape(-1) % n
  with np.errstate(invalid="ignore", over="ignore"):
    for b, points in enumerate(flat):
      dist = np.full(len(points), np.inf, np.float32)
      pick = int(starts[b])
      out[b, 0] = pick
      for t in range(1, npoint):
        dist[pick] = -1.0
        diff = points - points[pick]
        d = (diff[:, 0] * diff[:, 0] + diff[:, 1] * diff[:, 1]) + diff[:, 2] * diff[:, 2]
        closer = d < dist
        dist[closer] = d[closer]
        best = np.flatnonzero(dist == dist.max())
        pick = int(best[np.argmin((best - starts[b]) % n)])  # the first maximum in cyclic order from the start
        out[b, t] = pick
  return out.reshape(xyz.shape[:-2] + (npoint,))
