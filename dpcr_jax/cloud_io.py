"""Point clouds to and from files: binary PLY through trimesh (x, y, z float32 per vertex), NPY through numpy."""
from __future__ import annotations

import numpy as np
import trimesh


def write_ply(path: str, points: np.ndarray) -> None:
  """points [N,3] -> binary little-endian PLY with float32 x, y, z per vertex."""
  points = np.asarray(points, np.float32)
  if points.ndim != 2 or points.shape[1] != 3:
    raise ValueError(f"points must be [N, 3], got shape {points.shape}")
  trimesh.PointCloud(points).export(path, file_type="ply")


def read_ply(path: str) -> np.ndarray:
  """The vertices of a PLY file (point cloud or mesh) -> [N,3] float32."""
  loaded = trimesh.load(path, file_type="ply", process=False)
  if not hasattr(loaded, "vertices"):
    raise ValueError(f"{path}: no vertices found")
  return np.asarray(loaded.vertices, np.float32)
