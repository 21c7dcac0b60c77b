"""Pictures in numpy + PIL: point clouds as PNG, the qualitative grid, training curves.

``render_points`` is the original's ball splatter (docs/original.md §8, utils/render_balls_so.cpp + get_rendering): an
orthographic view from the input camera (camera-frame cloud, row = -Y, col = X, nearer = larger Z wins),
centred on the mean, the farthest point at image_size/2.2 px, each point a disk of ``radius`` px shaded by
its hemisphere (dz / r) times a depth cue min(1, 0.3 + 0.7 (z - zmin)/(zmax - zmin)).
"""
from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

CREAM = (248, 242, 220)


def render_points(points: np.ndarray, image_size: int = 256, radius: int = 2, color=CREAM,
                  background=(255, 255, 255)) -> np.ndarray:
  """Camera-frame points [N,3] -> uint8 RGB image [image_size, image_size, 3]."""
  points = np.asarray(points, np.float64)
  if points.ndim != 2 or points.shape[1] != 3:
    raise ValueError(f"points must be [N, 3], got {points.shape}")
  image = np.empty((image_size, image_size, 3), np.uint8)
  image[:] = background
  points = points[np.all(np.isfinite(points), axis=1)]
  if not len(points):
    return image
  centred = points - points.mean(axis=0)
  scale = (image_size / 2.2) / max(np.sqrt((centred ** 2).sum(axis=1)).max(), 1e-12)
  row = np.round(-centred[:, 1] * scale + image_size / 2).astype(np.int64)
  col = np.round(centred[:, 0] * scale + image_size / 2).astype(np.int64)
  z = centred[:, 2] * scale
  z_span = max(z.max() - z.min(), 1e-12)
  depth_cue = np.minimum(1.0, 0.3 + 0.7 * (z - z.min()) / z_span)

  dy, dx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
  inside = dx ** 2 + dy ** 2 <= radius ** 2
  dy, dx = dy[inside], dx[inside]
  dz = np.sqrt(np.maximum(radius ** 2 - dx ** 2 - dy ** 2, 0.0))  # [K]
  shade = (dz / radius)[None, :] * depth_cue[:, None]               # [N, K]
  rr, cc = row[:, None] + dy[None, :], col[:, None] + dx[None, :]
  zz = z[:, None] + dz[None, :]
  ok = (rr >= 0) & (rr < image_size) & (cc >= 0) & (cc < image_size)
  pix, zz, shade = (rr * image_size + cc)[ok], zz[ok], shade[ok]
  # z-buffer: for every pixel keep the candidate with the largest z.
  order = np.lexsort((zz, pix))
  pix, shade = pix[order], shade[order]
  last = np.r_[pix[1:] != pix[:-1], True]
  flat = image.reshape(-1, 3)
  flat[pix[last]] = np.clip(shade[last, None] * np.asarray(color, np.float64)[None], 0, 255).astype(np.uint8)
  return image


def to_uint8_image(image: np.ndarray, size: int) -> np.ndarray:
  """float [H,W,3] in [0,1] (or uint8) -> uint8 [size,size,3]."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
  if image.shape[:2] != (size, size):
    image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
  return image


def qualitative_grid(rows: Sequence[Sequence[np.ndarray]], column_titles: Sequence[str], path: str,
                     cell: int = 192, row_titles: Sequence[str] | None = None) -> None:
  """Writes a PNG grid. Each row: [input image (float or uint8 HxWx3), cloud, cloud, ...] where clouds are
  [N,3] camera-frame points (e.g. input | sparse | dense | ground truth)."""
  header, margin = 20, 0 if row_titles is None else 90
  canvas = Image.new("RGB", (margin + cell * len(column_titles), header + cell * len(rows)), "white")
  draw = ImageDraw.Draw(canvas)
  for j, title in enumerate(column_titles):
    draw.text((margin + j * cell + 4, 4), title, fill="black")
  for i, row in enumerate(rows):
    if row_titles is not None:
      draw.text((4, header + i * cell + cell // 2), row_titles[i], fill="black")
    for j, item in enumerate(row):
      item = np.asarray(item)
      tile = (to_uint8_image(item, cell) if item.ndim == 3 else render_points(item, cell, radius=1))
      canvas.paste(Image.fromarray(tile), (margin + j * cell, header + i * cell))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  canvas.save(path)


def read_metrics(jsonl_path: str) -> list[dict]:
  with open(jsonl_path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _nice_log_ticks(lo: float, hi: float) -> list[float]:
  return [10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]


def plot_training_curves(jsonl_path: str, path: str, keys: Sequence[str] = ("loss", "cd"),
                         title: str = "", width: int = 900, height: int = 360) -> None:
  """Line plots (log y) of train and eval ``keys`` over steps from metrics.jsonl, one panel per key."""
  records = read_metrics(jsonl_path)
  canvas = Image.new("RGB", (width, height * len(keys)), "white")
  draw = ImageDraw.Draw(canvas)
  colors = {"train": (31, 119, 180), "eval": (214, 39, 40)}
  left, right, top, bottom = 70, 20, 30, 40
  for panel, key in enumerate(keys):
    y0 = panel * height
    series = {}
    for split in colors:
      pts = [(r["step"], r[key]) for r in records if r["split"] == split and key in r and r[key] > 0]
      if pts:
        series[split] = pts
    draw.text((left, y0 + 8), f"{title}: {key} (log scale)   train: blue, eval: red", fill="black")
    box = (left, y0 + top, width - right, y0 + height - bottom)
    draw.rectangle(box, outline="black")
    if not series:
      continue
    steps = [s for pts in series.values() for s, _ in pts]
    values = [v for pts in series.values() for _, v in pts]
    s_lo, s_hi = min(steps), max(max(steps), min(steps) + 1)
    v_lo, v_hi = math.log10(min(values)), math.log10(max(values))
    if v_hi - v_lo < 1e-6:
      v_lo, v_hi = v_lo - 0.5, v_hi + 0.5

    def xy(s, v):
      x = box[0] + (s - s_lo) / (s_hi - s_lo) * (box[2] - box[0])
      y = box[3] - (math.log10(v) - v_lo) / (v_hi - v_lo) * (box[3] - box[1])
      return x, y

    for tick in _nice_log_ticks(10 ** v_lo, 10 ** v_hi):
      if v_lo <= math.log10(tick) <= v_hi:
        _, y = xy(s_lo, tick)
        draw.line((box[0] - 4, y, box[0], y), fill="black")
        draw.text((4, y - 6), f"{tick:.0e}", fill="black")
    for s in np.linspace(s_lo, s_hi, 5):
      x, _ = xy(s, 10 ** v_lo)
      draw.line((x, box[3], x, box[3] + 4), fill="black")
      draw.text((x - 10, box[3] + 8), str(int(s)), fill="black")
    for split, pts in series.items():
      line = [xy(s, v) for s, v in pts]
      if len(line) > 1:
        draw.line(line, fill=colors[split], width=2)
      for x, y in line:
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colors[split])
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  canvas.save(path)
