"""3D-R2N2 ShapeNetRendering images + 3D-LMNet/DensePCR ShapeNet_pointclouds (docs/original.md §10).

  <root>/ShapeNetRendering/<syn>/<id>/rendering/{00..23}.png, rendering_metadata.txt (az el inplane ratio fov)
  <root>/ShapeNet_pointclouds/<syn>/<id>/pointcloud_{1024,4096,16k}.npy   canonical object frame
  model lists: {"<syn>": ["<syn>/<id>", ...]} JSON (train_models.json / val_models.json)
Points are returned in the canonical frame (3D-LMNet/DensePCR) or, with frame='view', in the camera frame
of the view (camera at 1.75 ratio, the AttentionDPCR-style view-centred target).
"""
import os

import numpy as np
from PIL import Image

from dpcr_jax.data import camera
from dpcr_jax.data import categories
from dpcr_jax.data.common import DataError, SkipLog, composite, read_json, to_float_image

SPLIT_FILES = {"train": "train_models.json", "val": "val_models.json", "test": "val_models.json"}


def pointcloud_filename(n: int) -> str:
  """3D-LMNet/DensePCR naming: pointcloud_16k.npy for 16384 points, pointcloud_<n>.npy otherwise."""
  return "pointcloud_16k.npy" if n == 16384 else f"pointcloud_{n}.npy"


def read_split_file(path: str) -> dict[str, list[str]]:
  """{"<syn>": ["<syn>/<id>", ...]} -> {syn: [id, ...]} (validated)."""
  data = read_json(path, "split list")
  if not isinstance(data, dict):
    raise DataError(f"{path}: expected a dict synset -> list of '<syn>/<id>'")
  out = {}
  for syn, entries in data.items():
    ids = []
    for e in entries:
      parts = e.split("/")
      if len(parts) != 2 or parts[0] != syn:
        raise DataError(f"{path}: entry {e!r} under {syn!r} is not '{syn}/<model_id>'")
      ids.append(parts[1])
    out[syn] = ids
  return out


class R2N2Source:
  """Random-access (model, view) pairs of one split.

  Items: image [H,W,3] f32 in [0,1] (RGBA composited on `background`, optionally centre-cropped 137->128 like
  3D-LMNet, resized to image_size), points_sparse/points_mid/points_dense [n,3] f32, category, view, model_id.
  A missing pointcloud_<n_sparse>.npy falls back to the first n_sparse of pointcloud_<n_mid>.npy (DensePCR
  reads pointcloud_4096[:1024]; the files are FPS-ordered).
  """

  def __init__(self, root: str, split: str, split_file: str | None = None, image_size: int | None = 128,
               n_sparse: int = 1024, n_mid: int | None = 4096, n_dense: int = 16384, category_list=None,
               skip_missing: bool = False, views=None, background: float = 0.0, lmnet_crop: bool = False,
               frame: str = "canonical"):
    if split not in SPLIT_FILES:
      raise ValueError(f"split must be one of {list(SPLIT_FILES)}, got {split!r}")
    if frame not in ("canonical", "view"):
      raise ValueError(f"frame must be 'canonical' or 'view', got {frame!r}")
    self.root, self.image_size, self.background = root, image_size, background
    self.lmnet_crop, self.frame = lmnet_crop, frame
    self._sizes = {"points_sparse": n_sparse, "points_dense": n_dense}
    if n_mid:
      self._sizes["points_mid"] = n_mid
    split_file = split_file or os.path.join(root, "splits", SPLIT_FILES[split])
    lists = read_split_file(split_file)
    log = SkipLog("r2n2", skip_missing)
    self._models = []  # (category index, synset, model id, [view numbers])
    for syn in categories.resolve_categories(category_list):
      if syn not in lists:
        log.fail(split_file, f"no model list for category {syn}", DataError)
        continue
      for mid in lists[syn]:
        entry = self._check_model(syn, mid, views, log)
        if entry is not None:
          self._models.append(entry)
    log.report()
    self.skipped = log.skipped
    if not self._models:
      raise DataError(f"r2n2: no usable models in {split_file} under {root}")
    self._offsets = np.cumsum([0] + [len(m[3]) for m in self._models])

  def _paths(self, syn, mid):
    return (os.path.join(self.root, "ShapeNetRendering", syn, mid, "rendering"),
            os.path.join(self.root, "ShapeNet_pointclouds", syn, mid))

  def _point_file(self, pc_dir: str, key: str) -> tuple[str, int]:
    """(path, n) of the file holding `key`'s points, with the FPS-prefix fallback for the sparse set."""
    n = self._sizes[key]
    path = os.path.join(pc_dir, pointcloud_filename(n))
    if not os.path.isfile(path) and key == "points_sparse" and "points_mid" in self._sizes:
      path = os.path.join(pc_dir, pointcloud_filename(self._sizes["points_mid"]))
    return path, n

  def _check_model(self, syn, mid, views, log):
    item = f"{syn}/{mid}"
    render_dir, pc_dir = self._paths(syn, mid)
    meta = os.path.join(render_dir, "rendering_metadata.txt")
    if not os.path.isfile(meta):
      log.fail(item, f"model id in the split list has no renderings ({meta} missing)", FileNotFoundError)
      return None
    for key in self._sizes:
      path, _ = self._point_file(pc_dir, key)
      if not os.path.isfile(path):
        log.fail(item, f"missing point cloud {path}", FileNotFoundError)
        return None
    with open(meta) as f:
      n_meta = sum(1 for line in f if line.strip())
    model_views = list(range(n_meta)) if views is None else list(views)
    if model_views and max(model_views) >= n_meta:
      log.fail(item, f"view {max(model_views)} requested but {meta} lists {n_meta} views")
      return None
    return categories.SYNSET_TO_INDEX[syn], syn, mid, model_views

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def _load_points(self, pc_dir: str, key: str) -> np.ndarray:
    path, n = self._point_file(pc_dir, key)
    try:
      pts = np.load(path)
    except (OSError, ValueError) as e:
      raise DataError(f"r2n2: unreadable point cloud {path}: {e}") from e
    if pts.ndim != 2 or pts.shape[1] != 3 or pts.shape[0] < n:
      raise DataError(f"r2n2: {path} has shape {pts.shape}, expected [>={n},3]")
    return np.asarray(pts[:n], np.float32)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range [0, {len(self)})")
    m = int(np.searchsorted(self._offsets, index, side="right") - 1)
    cat, syn, mid, views = self._models[m]
    view = views[index - int(self._offsets[m])]
    render_dir, pc_dir = self._paths(syn, mid)
    png = os.path.join(render_dir, f"{view:02d}.png")
    try:
      img = np.asarray(Image.open(png).convert("RGBA"))
    except OSError as e:
      raise DataError(f"r2n2: unreadable image {png}: {e}") from e
    img = composite(img, self.background)
    if self.lmnet_crop:
      img = img[4:-5, 4:-5]
    out = {"image": to_float_image(img, self.image_size)}
    for key in self._sizes:
      out[key] = self._load_points(pc_dir, key)
    if self.frame == "view":
      az, el, _, ratio, _ = camera.read_rendering_metadata(os.path.join(render_dir, "rendering_metadata.txt"))[view]
      rot, cam_pos = camera.camera_info(az, el, ratio * camera.R2N2_MAX_CAMERA_DIST)
      for key in self._sizes:
        out[key] = camera.world_to_camera(out[key].astype(np.float64), rot, cam_pos).astype(np.float32)
    out["category"] = np.int32(cat)
    out["view"] = np.int32(view)
    out["model_id"] = f"{syn}/{mid}"
    return out
