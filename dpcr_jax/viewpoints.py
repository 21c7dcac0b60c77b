"""Where each dataset's clouds sit relative to the camera of their input image, and fixed views to show them.

A model predicts clouds in the frame of the data it was trained on, and the frames differ (docs/data.md,
"Frames and cameras"):

  source                      cloud frame                                   input camera
  attdpcr_h5 (and synthetic)  camera frame of the view (OpenGL: x right,    identity; F = 284 S/256 px, centred
                              y up, looking down -z), object near z=-0.8
  r2n2, r2n2_frame='view'     the same, camera at 1.75 * ratio              identity; F = 137 * 35/32 px at 137
  r2n2, r2n2_frame='canonical' ShapeNet object frame (+Y up, front +X)      per view, from rendering_metadata.txt
  psgn                        PSGN's azimuth-aligned frame: x down,         fixed: 20 deg elevation, distance 4.5,
                              the camera's azimuth applied, not its         F = 506 px at 256x192 (fitted to the
                              elevation (psgn.dequantize_points)            depth masks, see PSGN_* below)
  pix3d                       canonical model frame                         unknown (not implemented)

``cloud_frame(data_config)`` returns a ``CloudFrame`` that knows the frame's up direction, the horizontal
direction its front view looks along, and the ``Camera`` of an input image (None where it is unknown: a
canonical-frame model shown an arbitrary photo). A ``Camera`` maps cloud-frame points to the pixels of the
model's input image (square, ``image_size``), so a cloud drawn with it lines up with the input.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

from absl import logging
import numpy as np

from dpcr_jax.data import camera as camera_lib

# PSGN renders (psgn.py; 192x256, padded to 256x256 by the loader). The points of psgn.dequantize_points, p,
# are in an azimuth-aligned frame; the render camera sees c = (p - [1,0,0]) @ V (V: the loader's 20-degree
# rotation about y) with column ~ c1, row ~ c0 and depth = PSGN_DISTANCE - c2. The distance, focal length and
# principal point are not published with the data: they were fitted (Nelder-Mead on the 2-D Chamfer
# distance between projected GT points and the depth>0 masks of the 32 samples of batch 15; the optimum is
# flat along focal/distance ~ 112 px, i.e. nearly orthographic, and the distance was fixed at 4.5 where the
# fit was best, mean 2-D Chamfer 1.40 px). tests/test_viewpoints.py checks the result on batches 00 and 15.
PSGN_ELEVATION_DEG = 20.0
PSGN_DISTANCE = 4.5
PSGN_FOCAL_256 = 506.0                # pixels, for the 256-wide render
PSGN_PRINCIPAL_192x256 = (125.6, 127.9)  # (row, col) in the 192x256 render
PSGN_HEIGHT, PSGN_WIDTH = 192, 256

# R2N2 renders' elevations are drawn from U[25, 30]; fixed views of a view-frame model use this nominal value
# when the example's elevation is unknown.
R2N2_NOMINAL_ELEVATION_DEG = 27.5


@dataclasses.dataclass(frozen=True)
class Camera:
  """A pinhole camera: camera-frame point = rotation @ p + translation (OpenGL: x right, y up, looking down
  -z); pixel (row, col) = principal + focal * (-y, x) / (-z), in an image of ``size`` = (height, width)."""
  rotation: np.ndarray                 # [3,3]
  translation: np.ndarray              # [3]
  focal: float                         # pixels
  principal: tuple[float, float]       # (row, col) pixels
  size: tuple[int, int]                # (height, width)

  def to_camera(self, points: np.ndarray) -> np.ndarray:
    """Cloud-frame points [N,3] -> camera frame [N,3]."""
    return np.asarray(points, np.float64) @ np.asarray(self.rotation).T + self.translation

  def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cloud-frame points [N,3] -> (pixel coordinates [N,2] as (row, col) floats, depth [N] along the view
    axis; points with depth <= 0 are behind the camera)."""
    cam = self.to_camera(points)
    depth = -cam[:, 2]
    safe = np.where(depth > 1e-9, depth, np.nan)
    rc = np.stack([self.principal[0] - self.focal * cam[:, 1] / safe,
                   self.principal[1] + self.focal * cam[:, 0] / safe], axis=-1)
    return rc, depth

  def scaled(self, height: int, width: int | None = None) -> "Camera":
    """The same camera for the image resized to (height, width) (default square)."""
    width = height if width is None else width
    sy, sx = height / self.size[0], width / self.size[1]
    if abs(sy - sx) > 1e-6 * max(sy, sx):
      raise ValueError(f"resizing {self.size} to {(height, width)} changes the aspect ratio")
    return dataclasses.replace(self, focal=self.focal * sx, size=(height, width),
                               principal=(self.principal[0] * sy, self.principal[1] * sx))

  @property
  def view_direction(self) -> np.ndarray:
    """[3] unit vector in the cloud frame along which the camera looks (its -z axis)."""
    return -np.asarray(self.rotation)[2]


@dataclasses.dataclass(frozen=True)
class CloudFrame:
  """The frame a dataset's clouds are in (see the module docstring).

  up: [3] unit vector, world up in cloud coordinates (nominal where the elevation varies per view);
  forward: [3] unit horizontal vector, the direction the 'front' view looks along;
  camera_fn: (image_size, example dict or None) -> the input image's Camera, or None when unknown.
  """
  name: str
  description: str
  up: np.ndarray
  forward: np.ndarray
  camera_fn: Callable[[int, dict | None], Camera | None]

  def input_camera(self, image_size: int, example: dict | None = None) -> Camera | None:
    """The camera of a (square, ``image_size``) model input; ``example`` (a dataset item) for the sources
    whose camera changes per example."""
    return self.camera_fn(image_size, example)

  def view_rotation(self, view: str, example_camera: Camera | None = None) -> np.ndarray:
    """[3,3] rotation from the cloud frame to an orthographic view frame (x right, y up, z towards the
    viewer) for view in FIXED_VIEWS ('front': horizontal, along ``forward``; 'side': from the right of the
    front view; 'top': from above, far side up) or 'input' (the example camera's rotation)."""
    if view == "input":
      if example_camera is None:
        raise ValueError("view 'input' needs the input camera; this frame has none for the example")
      return np.asarray(example_camera.rotation, np.float64)
    if view not in FIXED_VIEWS:
      raise ValueError(f"view must be 'input' or one of {FIXED_VIEWS}, got {view!r}")
    up, fwd = _unit(self.up), _unit(self.forward)
    if view == "front":
      y, z = up, -fwd
    elif view == "side":
      y, z = up, np.cross(up, -fwd)
    else:
      y, z = fwd, up
    return np.stack([np.cross(y, z), y, z])


FIXED_VIEWS = ("front", "side", "top")


def _unit(v) -> np.ndarray:
  v = np.asarray(v, np.float64)
  return v / np.linalg.norm(v)


def _horizontal(direction, up) -> np.ndarray:
  direction, up = _unit(direction), _unit(up)
  return _unit(direction - direction.dot(up) * up)


def _view_frame_up(elevation_deg: float) -> np.ndarray:
  """World up in the camera frame of a look-at camera with this elevation (camera.camera_info)."""
  el = np.deg2rad(elevation_deg)
  return np.array([0.0, np.cos(el), np.sin(el)])


def _centred_camera(focal: float, height: int, width: int) -> Camera:
  return Camera(np.eye(3), np.zeros(3), focal, (height / 2.0, width / 2.0), (height, width))


def attdpcr_frame() -> CloudFrame:
  up = _view_frame_up(camera_lib.ATTDPCR_ELEVATION)
  return CloudFrame(
      "attdpcr camera frame",
      "clouds in the camera frame of their view (AttentionDPCR / synthetic HDF5): drawn with the input camera",
      up, _horizontal([0, 0, -1], up),
      lambda size, example: _centred_camera(camera_lib.attdpcr_focal(size), size, size))


def r2n2_view_frame(lmnet_crop: bool = False) -> CloudFrame:
  up = _view_frame_up(R2N2_NOMINAL_ELEVATION_DEG)
  side = camera_lib.R2N2_IMAGE_SIZE
  render = _centred_camera(side * camera_lib.R2N2_FOCAL_PER_PIXEL, side, side)
  if lmnet_crop:  # [4:-5] crop: 128 px, principal point moved by -4
    render = dataclasses.replace(render, size=(128, 128), principal=(side / 2.0 - 4, side / 2.0 - 4))
  return CloudFrame("r2n2 view frame", "R2N2 clouds moved into each view's camera frame (r2n2_frame='view')",
                    up, _horizontal([0, 0, -1], up), lambda size, example: render.scaled(size))


def psgn_camera(image_size: int = 256) -> Camera:
  """The camera of a PSGN input (the 192x256 render padded to 256x256, resized to ``image_size``)."""
  b = np.deg2rad(PSGN_ELEVATION_DEG)
  v = np.array([[np.cos(b), 0, -np.sin(b)], [0, 1, 0], [np.sin(b), 0, np.cos(b)]])
  to_gl = np.array([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]])  # (c0 down, c1 right, c2 towards the camera) -> GL
  rotation = to_gl @ v.T
  translation = -rotation @ np.array([1.0, 0, 0]) + [0, 0, -PSGN_DISTANCE]
  pad = (PSGN_WIDTH - PSGN_HEIGHT) / 2.0
  render = Camera(rotation, translation, PSGN_FOCAL_256,
                  (PSGN_PRINCIPAL_192x256[0] + pad, PSGN_PRINCIPAL_192x256[1]), (PSGN_WIDTH, PSGN_WIDTH))
  return render.scaled(image_size)


def psgn_frame() -> CloudFrame:
  up = np.array([-1.0, 0, 0])
  return CloudFrame("psgn azimuth-aligned frame",
                    "PSGN clouds: x down, the view's azimuth applied, its 20-degree elevation not; drawn with "
                    "the fitted PSGN render camera", up, _horizontal(psgn_camera().view_direction, up),
                    lambda size, example: psgn_camera(size))


def canonical_frame(name: str, camera_fn=None) -> CloudFrame:
  return CloudFrame(name, "canonical object frame (+Y up, front +X): the input camera is known only for "
                    "dataset examples with rendering metadata", np.array([0.0, 1, 0]), np.array([-1.0, 0, 0]),
                    camera_fn or (lambda size, example: None))


def r2n2_metadata_camera(root: str, lmnet_crop: bool = False):
  """camera_fn for canonical R2N2 clouds: reads the example's view from
  <root>/ShapeNetRendering/<model_id>/rendering/rendering_metadata.txt (needs 'model_id' and 'view')."""

  def camera_fn(size: int, example: dict | None) -> Camera | None:
    if example is None or "model_id" not in example or int(example.get("view", -1)) < 0:
      return None
    path = os.path.join(root, "ShapeNetRendering", str(example["model_id"]), "rendering",
                        "rendering_metadata.txt")
    if not os.path.isfile(path):
      return None
    az, el, _, ratio, _ = camera_lib.read_rendering_metadata(path)[int(example["view"])]
    rot, pos = camera_lib.camera_info(az, el, ratio * camera_lib.R2N2_MAX_CAMERA_DIST)
    view = r2n2_view_frame(lmnet_crop).input_camera(size)
    return dataclasses.replace(view, rotation=rot, translation=-rot @ pos)

  return camera_fn


def cloud_frame(data_config) -> CloudFrame:
  """The CloudFrame of a run's data (``config.data``: source, r2n2_frame, root, r2n2_lmnet_crop); an unknown
  source gets a frame without an input camera (pictures then say so) and a warning."""
  source = data_config.source
  if source == "attdpcr_h5":
    return attdpcr_frame()
  if source == "psgn":
    return psgn_frame()
  if source == "r2n2":
    crop = bool(data_config.get("r2n2_lmnet_crop", False))
    if data_config.get("r2n2_frame", "canonical") == "view":
      return r2n2_view_frame(crop)
    return canonical_frame("r2n2 canonical frame", r2n2_metadata_camera(data_config.root, crop))
  if source == "pix3d":
    return canonical_frame("pix3d canonical frame")
  logging.warning("no frame convention for data.source %r: pictures use fixed views of a y-up frame", source)
  return CloudFrame(f"unknown frame ({source})", "no frame convention for this data source: the input camera is "
                    "unknown; clouds are shown as if y were up", np.array([0.0, 1, 0]), np.array([0.0, 0, -1]),
                    lambda size, example: None)
