"""User images for inference, decoded without guessing, and distinct output names for them.

The model was trained on renders of an object over a black background, so:
  - transparency (RGBA, LA, a palette or grey image with a transparent colour) is composited over black, as
    the R2N2 loader does (data/common.composite); a transparent white background would otherwise read as
    white;
  - 16-bit images ('I;16' and 'I' grey, as PNG stores them) are scaled by 65535, not clipped to 255; 32-bit
    float images ('F') are refused (no agreed range);
  - the EXIF orientation is applied (the picture as a viewer shows it);
  - a file that cannot be decoded (truncated, not an image) raises ImageError naming the path, so a caller
    can skip it and go on with the others.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from dpcr_jax.data.common import composite

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


class ImageError(ValueError):
  """An input image cannot be read or interpreted; the message starts with its path."""


def read_rgb(path: str) -> np.ndarray:
  """An image file -> float32 [h,w,3] in [0,1], transparency composited over black (module doc)."""
  try:
    with Image.open(path) as image:
      image = ImageOps.exif_transpose(image)
      image.load()
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ImageError(f"{path}: cannot decode the image ({type(e).__name__}: {e})") from e
  mode = image.mode
  if mode in _SIXTEEN_BIT or mode == "I":
    gray = np.asarray(image, np.float64)
    if gray.min() < 0 or gray.max() > 65535:
      raise ImageError(f"{path}: 32-bit integer image with values outside [0, 65535]; save it as 8 or 16 bit")
    return np.repeat((gray / 65535.0).astype(np.float32)[..., None], 3, axis=-1)
  if mode == "F":
    raise ImageError(f"{path}: floating-point image (mode F) has no agreed value range; save it as 8 or 16 bit")
  if "A" in mode or "transparency" in image.info:
    return composite(np.asarray(image.convert("RGBA")), background=0.0).astype(np.float32) / 255.0
  return np.asarray(image.convert("RGB"), np.float32) / 255.0


def load_image(path: str, size: int, mask_path: str | None = None) -> np.ndarray:
  """An image file -> float32 [size,size,3] in [0,1]: masked to a black background, padded square, resized.

  ``mask_path``: white (> 0.5 after decoding like the image) = object; must have the image's size.
  Raises ImageError (naming the file) for an unreadable image or mask.
  """
  array = read_rgb(path)
  if mask_path is not None:
    mask = read_rgb(mask_path).mean(axis=-1) > 0.5
    if mask.shape != array.shape[:2]:
      raise ImageError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]}, image {path} is "
                       f"{array.shape[1]}x{array.shape[0]}")
    array = array * mask[..., None]
  h, w = array.shape[:2]
  side = max(h, w)
  square = np.zeros((side, side, 3), np.float32)
  square[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = array
  resized = Image.fromarray((square * 255).round().astype(np.uint8)).resize((size, size), Image.BILINEAR)
  return np.asarray(resized, np.float32) / 255.0


def output_stems(paths: Sequence[str]) -> list[str]:
  """Distinct output names (no extension) for input paths: the file stem where it is unique, else the path
  relative to the inputs' common folder with '/' -> '__' and '.' -> '_' ('a/x.png' -> 'a__x_png', 'x.jpg'
  -> 'x_jpg'), then '-2', '-3', ... if a name is still taken."""
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  counts: dict[str, int] = {}
  for s in stems:
    counts[s] = counts.get(s, 0) + 1
  folders = [os.path.dirname(os.path.abspath(p)) for p in paths]
  common = os.path.commonpath(folders) if folders else ""
  names, taken = [], set()
  for path, stem in zip(paths, stems):
    name = stem
    if counts[stem] > 1:
      name = os.path.relpath(os.path.abspath(path), common).replace(os.sep, "__").replace(".", "_")
    candidate, n = name, 2
    while candidate in taken:
      candidate, n = f"{name}-{n}", n + 1
    taken.add(candidate)
    names.append(candidate)
  return names
