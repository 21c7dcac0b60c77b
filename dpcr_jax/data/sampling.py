"""Area-weighted surface sampling and farthest point sampling (FPS)."""
import logging

import numpy as np


def face_areas(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
  """vertices [V,3], faces [F,3] int -> areas [F]."""
  tri = vertices[faces]
  return 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=-1)


def _points_in_faces(vertices, faces, face_idx, rng) -> np.ndarray:
  """One uniform point inside each listed face (barycentric reflection trick)."""
  u = rng.random((len(face_idx), 2))
  flip = u.sum(-1) > 1.0
  u[flip] = 1.0 - u[flip]
  tri = vertices[faces[face_idx]]
  return tri[:, 0] + u[:, :1] * (tri[:, 1] - tri[:, 0]) + u[:, 1:] * (tri[:, 2] - tri[:, 0])


def sample_surface_deterministic(vertices: np.ndarray, faces: np.ndarray, n: int,
                                 rng: np.random.Generator) -> np.ndarray:
  """AttentionDPCR `sample_faces`: per-face counts from rounded cumulative areas (total exactly n).

  Points are ordered by face index, as in the original (FPS with start index 0 therefore starts on
  the first sampled face). Returns [n,3] float32.
  """
  areas = face_areas(vertices, faces)
  total = areas.sum()
  if not total > 0:
    raise ValueError("sample_surface_deterministic: mesh has zero surface area")
  cum = np.round(np.cumsum(areas) / total * n).astype(np.int64)
  counts = np.diff(cum, prepend=0)
  face_idx = np.repeat(np.arange(len(faces)), counts)
  return _points_in_faces(vertices, faces, face_idx, rng).astype(np.float32)


def sample_surface_iid(vertices: np.ndarray, faces: np.ndarray, n: int,
                       rng: np.random.Generator) -> np.ndarray:
  """n iid points, faces drawn with probability proportional to area (trimesh.sample_surface). [n,3] f32."""
  areas = face_areas(vertices, faces)
  total = areas.sum()
  if not total > 0:
    raise ValueError("sample_surface_iid: mesh has zero surface area")
  face_idx = rng.choice(len(faces), size=n, p=areas / total)
  return _points_in_faces(vertices, faces, face_idx, rng).astype(np.float32)


def sample_surface(vertices, faces, n, rng, method: str = "deterministic") -> np.ndarray:
  """Dispatches to the 'deterministic' (AttentionDPCR parity) or 'iid' sampler."""
  if method == "deterministic":
    return sample_surface_deterministic(vertices, faces, n, rng)
  if method == "iid":
    return sample_surface_iid(vertices, faces, n, rng)
  raise ValueError(f"method must be 'deterministic' or 'iid', got {method!r}")


def _fps_single(points: np.ndarray, n: int, start: int) -> np.ndarray:
  num = points.shape[0]
  x, y, z = (np.ascontiguousarray(points[:, i], dtype=np.float64) for i in range(3))
  min_d = np.full(num, np.inf)
  idx = np.empty(n, np.int32)
  last = start
  for k in range(n):
    idx[k] = last
    d = (x - x[last]) ** 2 + (y - y[last]) ** 2 + (z - z[last]) ** 2
    np.minimum(min_d, d, out=min_d)
    last = int(np.argmax(min_d))
  return idx


def farthest_point_indices_numpy(points: np.ndarray, n: int, start: int = 0) -> np.ndarray:
  """Reference FPS: points [...,N,3] -> indices [...,n] int32, starting at `start` (the original uses 0).

  Loops over the batch (a batched numpy version is slower: it is memory bound).
  """
  points = np.asarray(points)
  if points.ndim < 2 or points.shape[-1] != 3:
    raise ValueError(f"points must be [...,N,3], got {points.shape}")
  num = points.shape[-2]
  if not 0 < n <= num:
    raise ValueError(f"n must be in [1, {num}], got {n}")
  flat = points.reshape(-1, num, 3)
  idx = np.stack([_fps_single(p, n, start) for p in flat])
  return idx.reshape(points.shape[:-2] + (n,))


_XLA_FPS = None  # resolved on first use: xla_ops' FFI op, or False when unavailable


def _xla_fps():
  global _XLA_FPS
  if _XLA_FPS is None:
    try:
      from xla_ops import farthest_point_sample  # pylint: disable=g-import-not-at-top
    except ImportError:
      try:
        from xla_ops.sampling import farthest_point_sample  # pylint: disable=g-import-not-at-top
      except ImportError:
        farthest_point_sample = None
    _XLA_FPS = farthest_point_sample or False
  return _XLA_FPS


def farthest_point_indices(points: np.ndarray, n: int) -> np.ndarray:
  """FPS indices [...,n] int32 for points [...,N,3], with start index 0, so prefixes are FPS subsets
  (fps(P,4096)[:1024] == fps(P,1024)).

  Uses xla_ops.farthest_point_sample (C++ FFI, ~5x faster) when it is importable and runs, else the numpy
  reference (with a one-line warning if the op exists but fails, e.g. a stale build).
  """
  global _XLA_FPS
  fps = _xla_fps()
  if fps:
    try:
      return np.asarray(fps(np.asarray(points, np.float32), n)).astype(np.int32)
    except Exception as e:  # pylint: disable=broad-except
      if isinstance(e, ValueError):
        raise
      logging.warning("xla_ops.farthest_point_sample failed (%s: %s); using the numpy FPS.", type(e).__name__, e)
      _XLA_FPS = False
  return farthest_point_indices_numpy(points, n)
