"""Pix3D (Sun et al. 2018) real photos with aligned CAD models (docs/original.md §10).

  <root>/pix3d.json                       list of dicts: img, mask, category, bbox [x0,y0,x1,y1], model,
                                          truncated, occluded, slightly_occluded, rot_mat, cam_position, ...
  <root>/img/<cat>/<id>.{png,jpg}, <root>/mask/<cat>/<id>.png, <root>/model/<cat>/<name>/model*.obj
Selection (3D-LMNet / AttentionDPCR): category in {chair, sofa, table}, not truncated, not (slightly) occluded.
Preprocessing (3D-LMNet fetch_batch_pix3d): mask the background to black, crop to bbox, resize the long side
to image_size - pad keeping the aspect ratio, zero-pad symmetrically (pad 70 at 256 ~ LMNet's 35 at 128).
GT: area-weighted samples of the model OBJ scaled by 0.57, in the canonical Pix3D model frame (as
AttentionDPCR's gen_pix3d.py); sampled once per model (seeded by the model path) and cached in memory.
"""
import os
import threading
import zlib

import numpy as np
from PIL import Image

from dpcr_jax.data import camera
from dpcr_jax.data import categories
from dpcr_jax.data import sampling
from dpcr_jax.data.common import DataError, SkipLog, read_json, read_obj

PIX3D_CATEGORIES = ("chair", "sofa", "table")


def preprocess_image(image: np.ndarray, mask: np.ndarray, bbox, size: int, pad: int) -> np.ndarray:
  """Photo uint8 [h,w,3] + mask [h,w] + bbox [x0,y0,x1,y1] -> uint8 [size,size,3], object long side size-pad."""
  image = image * (mask != 0)[..., None].astype(np.uint8)
  x0, y0, x1, y1 = (int(round(v)) for v in bbox)
  crop = image[max(y0, 0):y1, max(x0, 0):x1]
  if crop.size == 0:
    raise ValueError(f"empty crop for bbox {bbox} in an image of shape {image.shape}")
  h, w = crop.shape[:2]
  long_side = size - pad
  scale = long_side / max(h, w)
  nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
  crop = np.asarray(Image.fromarray(crop).resize((nw, nh), Image.BILINEAR))
  out = np.zeros((size, size, 3), np.uint8)
  top, left = (size - nh) // 2, (size - nw) // 2
  out[top:top + nh, left:left + nw] = crop
  return out


class Pix3DSource:
  """Random access over the selected Pix3D images.

  Items: image [S,S,3] f32, points_sparse/points_mid/points_dense f32 (canonical model frame, x0.57),
  category (index into CATEGORIES), view (-1), model_id (the model path in pix3d.json).
  """

  def __init__(self, root: str, image_size: int = 256, pad: int = 70, n_sparse: int = 1024,
               n_mid: int | None = 4096, n_dense: int = 16384, category_list=None, skip_missing: bool = False,
               sampling_method: str = "deterministic"):
    ann_path = os.path.join(root, "pix3d.json")
    entries = read_json(ann_path, "pix3d annotation file")
    wanted = set(PIX3D_CATEGORIES)
    if category_list is not None:
      wanted = {categories.NAMES[categories.SYNSET_TO_INDEX[s]] for s in categories.resolve_categories(category_list)}
      if not wanted <= set(PIX3D_CATEGORIES):
        raise ValueError(f"pix3d categories must be among {PIX3D_CATEGORIES}, got {sorted(wanted)}")
    self.root, self.image_size, self.pad = root, image_size, pad
    self.n_sparse, self.n_mid, self.n_dense = n_sparse, n_mid, n_dense
    self.sampling_method = sampling_method
    log = SkipLog("pix3d", skip_missing)
    self._entries = []
    required = ("img", "mask", "category", "bbox", "model")
    for k, e in enumerate(entries):
      missing = [key for key in required if key not in e]
      if missing:
        raise DataError(f"pix3d: {ann_path} entry {k} lacks fields {missing}")
      if e["category"] not in wanted or e.get("truncated") or e.get("occluded") or e.get("slightly_occluded"):
        continue
      bad = [p for p in (e["img"], e["mask"], e["model"]) if not os.path.isfile(os.path.join(root, p))]
      if bad:
        log.fail(f"entry {k} ({e['img']})", f"missing file(s) {[os.path.join(root, p) for p in bad]}",
                 FileNotFoundError)
        continue
      self._entries.append(e)
    log.report()
    self.skipped = log.skipped
    if not self._entries:
      raise DataError(f"pix3d: no usable entries in {ann_path} for categories {sorted(wanted)}")
    self._points = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._entries)

  def _model_points(self, model: str) -> dict:
    with self._lock:
      if model in self._points:
        return self._points[model]
    path = os.path.join(self.root, model)
    try:
      vertices, faces = read_obj(path)
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f"pix3d: cannot load model {path}: {e}") from e
    rng = np.random.default_rng(zlib.crc32(model.encode()))
    dense = sampling.sample_surface(vertices, faces, self.n_dense, rng, self.sampling_method) * camera.ATTDPCR_SCALE
    fps = sampling.farthest_point_indices(dense, max(self.n_sparse, self.n_mid or 0))
    pts = {"points_dense": dense, "points_sparse": dense[fps[:self.n_sparse]]}
    if self.n_mid:
      pts["points_mid"] = dense[fps[:self.n_mid]]
    with self._lock:
      self._points[model] = pts
    return pts

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range [0, {len(self)})")
    e = self._entries[index]
    img_path, mask_path = os.path.join(self.root, e["img"]), os.path.join(self.root, e["mask"])
    try:
      image = np.asarray(Image.open(img_path).convert("RGB"))
      mask = np.asarray(Image.open(mask_path).convert("L"))
    except OSError as err:
      raise DataError(f"pix3d: unreadable image or mask ({img_path}, {mask_path}): {err}") from err
    if mask.shape != image.shape[:2]:
      raise DataError(f"pix3d: mask {mask_path} has shape {mask.shape}, image {img_path} has {image.shape[:2]}")
    image = preprocess_image(image, mask, e["bbox"], self.image_size, self.pad)
    out = {"image": image.astype(np.float32) / 255.0}
    out.update(self._model_points(e["model"]))
    out["category"] = np.int32(categories.SYNSET_TO_INDEX[categories.NAME_TO_SYNSET[e["category"]]])
    out["view"] = np.int32(-1)
    out["model_id"] = e["model"]
    return out
