"""Look-at camera shared by every dataset (docs/original.md §6.3).

World = ShapeNet OBJ frame (+Y up, front +X). The camera sits at
d (cos el cos az, sin el, cos el sin az), looks at the origin with up +Y, and looks down its -Z axis
with +X right and +Y up (OpenGL). Pixels: col = F X/(-Z) + W/2, row = F (-Y)/(-Z) + H/2.
"""
import numpy as np

# AttentionDPCR's 12 fixed views (rendering_metadata.txt): azimuth deg, elevation 27, distance 0.8
# on a mesh scaled by 0.57.
ATTDPCR_AZIMUTHS = (30, 45, 60, 120, 135, 150, 210, 225, 240, 300, 315, 330)
ATTDPCR_ELEVATION = 27.0
ATTDPCR_DISTANCE = 0.8
ATTDPCR_SCALE = 0.57
ATTDPCR_FOCAL_256 = 284.0  # pixels at 256x256; scale linearly with the image size.

# 3D-R2N2 ShapeNetRendering: the camera distance is ratio * 1.75 on the unscaled mesh, and Blender's
# default 35 mm lens on a 32 mm sensor gives F = W * 35 / 32 (the fov column is ignored by the renderer).
R2N2_MAX_CAMERA_DIST = 1.75
R2N2_IMAGE_SIZE = 137
R2N2_FOCAL_PER_PIXEL = 35.0 / 32.0


def attdpcr_focal(image_size: int) -> float:
  """AttentionDPCR focal length in pixels for a square image of this size."""
  return ATTDPCR_FOCAL_256 * image_size / 256.0


def camera_info(azimuth_deg: float, elevation_deg: float, distance: float) -> tuple[np.ndarray, np.ndarray]:
  """Returns (R [3,3] rows = camera x,y,z axes in world coords, cam_pos [3])."""
  th, ph = np.deg2rad(azimuth_deg), np.deg2rad(elevation_deg)
  cam_pos = distance * np.array([np.cos(ph) * np.cos(th), np.sin(ph), np.cos(ph) * np.sin(th)])
  z = cam_pos / np.linalg.norm(cam_pos)
  x = np.cross([0.0, 1.0, 0.0], z)
  x /= np.linalg.norm(x)
  y = np.cross(z, x)
  return np.stack([x, y, z]), cam_pos


def world_to_camera(points: np.ndarray, rotation: np.ndarray, cam_pos: np.ndarray) -> np.ndarray:
  """points [...,3] world -> camera frame [...,3]: (p - cam_pos) R^T."""
  return (points - cam_pos) @ rotation.T


def project(points_cam: np.ndarray, focal: float, height: int, width: int) -> np.ndarray:
  """Camera-frame points [N,3] -> pixel coordinates [N,2] as (row, col) floats."""
  depth = -points_cam[:, 2]
  col = focal * points_cam[:, 0] / depth + width / 2.0
  row = focal * -points_cam[:, 1] / depth + height / 2.0
  return np.stack([row, col], axis=-1)


def view_matrix(rotation: np.ndarray, cam_pos: np.ndarray) -> np.ndarray:
  """4x4 world->camera matrix (OpenGL view matrix)."""
  v = np.eye(4)
  v[:3, :3] = rotation
  v[:3, 3] = -rotation @ cam_pos
  return v


def projection_matrix(focal: float, height: int, width: int, near: float = 0.05, far: float = 10.0) -> np.ndarray:
  """4x4 OpenGL projection for a pinhole with focal length `focal` pixels, principal point at the centre."""
  p = np.zeros((4, 4))
  p[0, 0] = 2.0 * focal / width
  p[1, 1] = 2.0 * focal / height
  p[2, 2] = -(far + near) / (far - near)
  p[2, 3] = -2.0 * far * near / (far - near)
  p[3, 2] = -1.0
  return p


def attdpcr_views(n_views: int = 12) -> list[tuple[float, float, float]]:
  """The (azimuth, elevation, distance) triples of AttentionDPCR's fixed views."""
  return [(float(a), ATTDPCR_ELEVATION, ATTDPCR_DISTANCE) for a in ATTDPCR_AZIMUTHS[:n_views]]


def read_rendering_metadata(path) -> np.ndarray:
  """Parses an R2N2 rendering_metadata.txt into [V,5] float64 (az, el, inplane, distance_ratio, fov)."""
  rows = []
  with open(path) as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      fields = line.split()
      if len(fields) != 5:
        raise ValueError(f"{path}:{line_no}: expected 5 space-separated floats "
                         f"(azimuth elevation inplane distance_ratio fov), got {line.strip()!r}")
      rows.append([float(v) for v in fields])
  if not rows:
    raise ValueError(f"{path}: empty rendering metadata")
  return np.asarray(rows)


def write_rendering_metadata(path, views: np.ndarray) -> None:
  """Writes [V,5] (az, el, inplane, ratio, fov) in the R2N2 text layout."""
  with open(path, "w") as f:
    for row in views:
      f.write(" ".join(repr(float(v)) for v in row) + "\n")
