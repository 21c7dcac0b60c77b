"""Helpers shared by the dataset sources: errors, skip bookkeeping, image conversion."""
import json
import logging
import os

import numpy as np
from PIL import Image
import trimesh


class DataError(ValueError):
  """A data file is missing, unreadable or has the wrong content (the message names the file)."""


class SkipLog:
  """Counts items dropped under skip_missing=True, and reports them once."""

  def __init__(self, source: str, skip_missing: bool):
    self.source = source
    self.skip_missing = skip_missing
    self.skipped: list[tuple[str, str]] = []  # (item, reason)

  def fail(self, item: str, reason: str, exc_type=DataError) -> None:
    """Raises, or records the item as skipped when skip_missing is set."""
    if not self.skip_missing:
      raise exc_type(f"{self.source}: {item}: {reason} (pass skip_missing=True to skip such items)")
    self.skipped.append((item, reason))

  def report(self) -> None:
    if self.skipped:
      logging.warning("%s: skipped %d item(s) with missing/bad data (skip_missing=True), e.g. %s: %s",
                      self.source, len(self.skipped), *self.skipped[0])


def require_file(path: str, what: str) -> str:
  if not os.path.isfile(path):
    raise DataError(f"missing {what}: {path}")
  return path


def read_json(path: str, what: str):
  """Parses the JSON file ``path``; a missing or invalid file raises DataError naming ``what`` and the path."""
  require_file(path, what)
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(f"{what} {path} is not valid JSON ({e})") from e


def to_float_image(image: np.ndarray, size: int | None) -> np.ndarray:
  """uint8 [h,w,3] -> float32 [size,size,3] in [0,1] (bilinear resize when the size differs)."""
  if size is not None and image.shape[:2] != (size, size):
    image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
  return image.astype(np.float32) / 255.0


def composite(rgba: np.ndarray, background: float) -> np.ndarray:
  """RGBA uint8 [h,w,4] -> RGB uint8 composited over a grey level in [0,1] (0 black, 1 white)."""
  alpha = rgba[..., 3:4].astype(np.float32) / 255.0
  rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * background * (1.0 - alpha)
  return np.round(rgb).astype(np.uint8)


def read_obj(path) -> tuple[np.ndarray, np.ndarray]:
  """Loads an OBJ (any polygons; materials ignored, groups merged) as triangles: (vertices [V,3] float64,
  faces [F,3] int64)."""
  mesh = trimesh.load(path, force="mesh", process=False)
  if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
    raise ValueError(f"{path}: no triangles found")
  return np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int64)
