"""numpy reference for farthest point sampling (the test oracle; a plain loop over picks)."""
from __future__ import annotations

import numpy as np


def farthest_point_sample(xyz: np.ndarray, npoint: int) -> np.ndarray:
  """xyz [..., N, 3] -> int32 [..., npoint]: FPS from index 0, ties to the lowest index.

  Running squared distances (float32, ``(dx*dx + dy*dy) + dz*dz``) start at +inf; a NaN distance never
  replaces a running minimum; a picked point's distance becomes -1, so no point is picked twice.
  """
  xyz = np.asarray(xyz, np.float32)
  flat = xyz.reshape((-1,) + xyz.shape[-2:])
  out = np.zeros((flat.shape[0], npoint), np.int32)
  with np.errstate(invalid="ignore", over="ignore"):
    for b, points in enumerate(flat):
      dist = np.full(len(points), np.inf, np.float32)
      pick = 0
      for t in range(1, npoint):
        dist[pick] = -1.0
        diff = points - points[pick]
        d = (diff[:, 0] * diff[:, 0] + diff[:, 1] * diff[:, 1]) + diff[:, 2] * diff[:, 2]
        closer = d < dist
        dist[closer] = d[closer]
        pick = int(np.argmax(dist))  # the first maximum
        out[b, t] = pick
  return out.reshape(xyz.shape[:-2] + (npoint,))
