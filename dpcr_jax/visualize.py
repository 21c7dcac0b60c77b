"""Pictures in numpy + PIL: point clouds as PNG, the qualitative grids, training curves.

``render_points`` is the original's ball splatter (docs/original.md §8, utils/render_balls_so.cpp +
get_rendering): each point a
disk of ``radius`` px shaded by its hemisphere (dz / r) times a depth cue min(1, 0.3 + 0.7 (z - zmin)/(zmax -
zmin)), nearer wins. It draws either from a ``viewpoints.Camera`` (perspective, pixel-aligned with the input
image) or orthographically (centred, the farthest point at image_size/2.2 px) from a view rotation.
``example_pictures`` makes every picture of a set of examples (predict, the main job, evaluate): each cloud
from its input camera, the frame's fixed front / side / top views, and the interactive viewer (viewer.py).
"""
from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from dpcr_jax import viewpoints  # noqa: F401  (Camera in annotations)

CREAM = (248, 242, 220)
CLOUD_KEYS = ("sparse", "dense", "ground truth")  # example_pictures' clouds, in column order


def render_points(points: np.ndarray, image_size: int = 256, radius: int = 2, color=CREAM,
                  background=(255, 255, 255), camera: "viewpoints.Camera | None" = None,
                  rotation: np.ndarray | None = None, fit_to: np.ndarray | None = None) -> np.ndarray:
  """Points [N,3] -> uint8 RGB image [image_size, image_size, 3].

  With ``camera`` (a viewpoints.Camera of the square input image): a perspective picture from that camera,
  pixel-aligned with the input image resized to image_size (points behind it or outside are dropped).
  Otherwise orthographic, centred and scaled to fit: the points are taken as view-frame coordinates
  (x right, y up, z towards the viewer) after ``rotation`` [3,3] (default: as given), framed by the mean and
  extent of ``fit_to`` [M,3] (default: the points themselves; pass the ground truth to draw several clouds at
  one scale).
  """
  points = np.asarray(points, np.float64)
  if points.ndim != 2 or points.shape[1] != 3:
    raise ValueError(f"points must be [N, 3], got {points.shape}")
  image = np.empty((image_size, image_size, 3), np.uint8)
  image[:] = background
  points = points[np.all(np.isfinite(points), axis=1)]
  if not len(points):
    return image
  if camera is not None:
    rc, depth = camera.scaled(image_size).project(points)
    front = (depth > 1e-9) & np.all(np.isfinite(rc), axis=1)
    if not front.any():
      return image
    rc, depth = rc[front], depth[front]
    # Sphere shading in pixel units: depth differences scaled by the pixels per unit at the mean depth.
    z = -depth * (camera.scaled(image_size).focal / np.mean(depth))
    _splat(image, rc[:, 0], rc[:, 1], z, radius, color)
    return image
  frame_points = points if fit_to is None else np.asarray(fit_to, np.float64).reshape(-1, 3)
  frame_points = frame_points[np.all(np.isfinite(frame_points), axis=1)]
  if not len(frame_points):
    frame_points = points
  if rotation is not None:
    points = points @ np.asarray(rotation, np.float64).T
    frame_points = frame_points @ np.asarray(rotation, np.float64).T
  mean = frame_points.mean(axis=0)
  centred = points - mean
  scale = (image_size / 2.2) / max(np.sqrt(((frame_points - mean) ** 2).sum(axis=1)).max(), 1e-12)
  _splat(image, -centred[:, 1] * scale + image_size / 2, centred[:, 0] * scale + image_size / 2,
         centred[:, 2] * scale, radius, color)
  return image


def _splat(image: np.ndarray, row: np.ndarray, col: np.ndarray, z: np.ndarray, radius: int, color) -> None:
  """Draws balls at float pixel positions row/col [N] into image [S,S,3] in place; larger z [N] (pixel
  units) is nearer. Shading: hemisphere dz/r times the depth cue min(1, 0.3 + 0.7 (z - zmin)/(zmax - zmin))."""
  size = image.shape[0]
  row, col = np.round(row).astype(np.int64), np.round(col).astype(np.int64)
  z_span = max(z.max() - z.min(), 1e-12)
  depth_cue = np.minimum(1.0, 0.3 + 0.7 * (z - z.min()) / z_span)
  dy, dx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
  inside = dx ** 2 + dy ** 2 <= radius ** 2
  dy, dx = dy[inside], dx[inside]
  dz = np.sqrt(np.maximum(radius ** 2 - dx ** 2 - dy ** 2, 0.0))  # [K]
  shade = (dz / max(radius, 1))[None, :] * depth_cue[:, None]       # [N, K]
  if radius == 0:
    shade = depth_cue[:, None]
  rr, cc = row[:, None] + dy[None, :], col[:, None] + dx[None, :]
  zz = z[:, None] + dz[None, :]
  ok = (rr >= 0) & (rr < size) & (cc >= 0) & (cc < size)
  pix, zz, shade = (rr * size + cc)[ok], zz[ok], shade[ok]
  if not len(pix):  # every point off the image
    return
  # z-buffer: for every pixel keep the candidate with the largest z.
  order = np.lexsort((zz, pix))
  pix, shade = pix[order], shade[order]
  last = np.r_[pix[1:] != pix[:-1], True]
  flat = image.reshape(-1, 3)
  flat[pix[last]] = np.clip(shade[last, None] * np.asarray(color, np.float64)[None], 0, 255).astype(np.uint8)


def splat_mask(points: np.ndarray, camera: "viewpoints.Camera", radius: float = 1.0) -> np.ndarray:
  """Silhouette of points [N,3] seen by ``camera``: bool [H,W], every pixel within ``radius`` px of a
  projected point (the projection check: compare with the input image's object mask)."""
  h, w = camera.size
  rc, depth = camera.project(points)
  rc = rc[(depth > 0) & np.all(np.isfinite(rc), axis=1)]
  mask = np.zeros((h, w), bool)
  r = int(np.ceil(radius))
  for dy in range(-r, r + 1):
    for dx in range(-r, r + 1):
      if dy * dy + dx * dx <= radius * radius:
        rr, cc = np.floor(rc[:, 0]).astype(np.int64) + dy, np.floor(rc[:, 1]).astype(np.int64) + dx
        ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        mask[rr[ok], cc[ok]] = True
  return mask


def overlay_points(image: np.ndarray, points: np.ndarray, camera: "viewpoints.Camera", size: int,
                   color=(255, 40, 40), alpha: float = 0.6) -> np.ndarray:
  """The input image (float [H,W,3] in [0,1] or uint8) resized to ``size``, with the points projected by
  ``camera`` drawn over it as 1-px dots -> uint8 [size,size,3]."""
  tile = to_uint8_image(image, size).astype(np.float64)
  mask = splat_mask(points, camera.scaled(size), radius=0.5)
  tile[mask] = (1 - alpha) * tile[mask] + alpha * np.asarray(color, np.float64)
  return tile.round().astype(np.uint8)


def to_uint8_image(image: np.ndarray, size: int) -> np.ndarray:
  """float [H,W,3] in [0,1] (or uint8) -> uint8 [size,size,3]."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
  if image.shape[:2] != (size, size):
    image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
  return image


def qualitative_grid(rows: Sequence[Sequence[np.ndarray]], column_titles: Sequence[str], path: str,
                     cell: int = 192, row_titles: Sequence[str] | None = None,
                     frame: "viewpoints.CloudFrame | None" = None,
                     cameras: "Sequence[viewpoints.Camera | None] | None" = None,
                     views: Sequence[str] = ("input",), overlay: int | None = None) -> None:
  """Writes a PNG grid. Each row: [input image (float or uint8 HxWx3), cloud [N,3], cloud, ...] (e.g. input |
  sparse | dense | ground truth), titled by ``column_titles`` (one per row item).

  With ``frame`` (the run's viewpoints.CloudFrame), every cloud is drawn once per entry of ``views``:
  'input' = from the row's camera in ``cameras`` (perspective, pixel-aligned with the input image; a row
  without one falls back to the frame's front view and says so in the tile), 'front' / 'side' / 'top' =
  the frame's fixed views (orthographic, framed by the row's last cloud, e.g. the ground truth, so that
  the clouds of a row share one scale). ``overlay`` = index of a row item whose cloud
  is also drawn over the input image with the row's camera (an 'on input' column after the input).
  Without ``frame`` the clouds are taken as view-frame coordinates (x right, y up, z towards the viewer)
  and drawn orthographically.
  """
  if frame is None and (overlay is not None or tuple(views) != ("input",)):
    raise ValueError("views other than 'input' and overlay need the cloud frame (frame=...)")
  cameras = list(cameras) if cameras is not None else [None] * len(rows)
  if len(cameras) != len(rows):
    raise ValueError(f"got {len(cameras)} cameras for {len(rows)} rows")
  titles, plan = [], []  # plan: (kind, item index, view)
  for j, title in enumerate(column_titles):
    if j == 0:
      titles.append(title)
      plan.append(("image", 0, None))
      if overlay is not None:
        titles.append(f"{column_titles[overlay]} on input")
        plan.append(("overlay", overlay, None))
      continue
    for view in views:
      titles.append(title if len(views) == 1 else f"{title}: {view}")
      plan.append(("cloud", j, view))
  header, margin = 20, 0 if row_titles is None else 90
  canvas = Image.new("RGB", (margin + cell * len(titles), header + cell * len(rows)), "white")
  draw = ImageDraw.Draw(canvas)
  for j, title in enumerate(titles):
    draw.text((margin + j * cell + 4, 4), title, fill="black")
  for i, row in enumerate(rows):
    if row_titles is not None:
      draw.text((4, header + i * cell + cell // 2), row_titles[i], fill="black")
    for j, (kind, k, view) in enumerate(plan):
      note = ""
      if kind == "image":
        tile = to_uint8_image(np.asarray(row[0]), cell)
      elif kind == "overlay":
        if cameras[i] is None:
          tile, note = to_uint8_image(np.asarray(row[0]), cell), "no input camera"
        else:
          tile = overlay_points(row[0], row[k], cameras[i], cell)
      elif frame is None:
        tile = render_points(row[k], cell, radius=1)
      elif view == "input" and cameras[i] is not None:
        tile = render_points(row[k], cell, radius=1, camera=cameras[i])
      else:
        if view == "input":
          view, note = "front", "front view (no input camera)"
        tile = render_points(row[k], cell, radius=1, rotation=frame.view_rotation(view), fit_to=row[-1])
      if kind == "cloud" and not note and (tile == 255).all():
        note = "cloud outside this view"
      x, y = margin + j * cell, header + i * cell
      canvas.paste(Image.fromarray(tile), (x, y))
      if note:
        draw.text((x + 4, y + cell - 14), note, fill=(200, 0, 0))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  canvas.save(path)


def example_pictures(examples: Sequence[dict], frame: "viewpoints.CloudFrame", image_size: int,
                     path_prefix: str, names: Sequence[str] | None = None, cell: int = 160,
                     title: str = "", html_path: str | None = None) -> dict[str, str]:
  """The pictures of a set of examples, every cloud drawn from its input camera (see viewpoints).

  Args:
    examples: dicts with 'image' [S,S,3] (the model input), clouds under any of CLOUD_KEYS ('sparse',
      'dense', 'ground truth'; [N,3] in the run's cloud frame), and what the frame needs for a per-example
      camera (R2N2 canonical: 'model_id', 'view').
    frame: the run's viewpoints.CloudFrame (viewpoints.cloud_frame(config.data)).
    image_size: the model's input size.
  Writes <prefix>.png (input | densest cloud on input | each cloud from the input camera),
  <prefix>_views.png (each cloud from the frame's front / side / top) and ``html_path`` (default
  <prefix>.html; the interactive viewer, dpcr_jax.viewer). Returns {'png', 'views_png', 'html'}.
  """
  from dpcr_jax import viewer  # pylint: disable=g-import-not-at-top
  if not examples:
    raise ValueError("no examples to draw")
  keys = [k for k in CLOUD_KEYS if k in examples[0]]
  if not keys:
    raise ValueError(f"examples have none of the cloud keys {CLOUD_KEYS}")
  rows = [[e["image"]] + [e[k] for k in keys] for e in examples]
  cameras = [frame.input_camera(image_size, e) for e in examples]
  overlay = 1 + keys.index("dense" if "dense" in keys else keys[-1])
  paths = {"png": path_prefix + ".png", "views_png": path_prefix + "_views.png", "html": html_path or path_prefix + ".html"}
  qualitative_grid(rows, ["input"] + keys, paths["png"], cell=cell, row_titles=names, frame=frame,
                   cameras=cameras, overlay=overlay)
  view_keys = [k for k in ("dense", "ground truth") if k in keys] or keys
  qualitative_grid([[e["image"]] + [e[k] for k in view_keys] for e in examples], ["input"] + view_keys,
                   paths["views_png"], cell=cell, row_titles=names, frame=frame, cameras=cameras,
                   views=viewpoints.FIXED_VIEWS)
  viewer.write_viewer(paths["html"], [
      {"name": names[i] if names is not None else f"example {i}", "image": e["image"],
       "clouds": {k: e[k] for k in keys}, "camera": cameras[i]} for i, e in enumerate(examples)],
      frame, title=title)
  return paths


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


def evaluation_pictures(examples: dict, run_dir: str, output_prefix: str, data_root: str | None = None,
                        max_examples: int = 8) -> dict[str, str]:
  """example_pictures() of evaluation.evaluate_predictions' 'examples' (the first batch: 'image' [B,S,S,3],
  'gt', 'dense', optionally 'sparse') for the run in ``run_dir``: writes <prefix>_examples.png,
  <prefix>_examples_views.png and <prefix>_viewer.html."""
  from dpcr_jax import predict  # pylint: disable=g-import-not-at-top
  config = predict.load_run_config(run_dir)
  if data_root:
    config.data.root = data_root
  n = min(max_examples, len(examples["image"]))
  rows = [{"image": examples["image"][i], "ground truth": examples["gt"][i],
           **{k: examples[k][i] for k in ("sparse", "dense") if k in examples}} for i in range(n)]
  return example_pictures(rows, viewpoints.cloud_frame(config.data), config.model.image_size,
                          output_prefix + "_examples", title=f"evaluation examples of {run_dir}",
                          html_path=output_prefix + "_viewer.html")
