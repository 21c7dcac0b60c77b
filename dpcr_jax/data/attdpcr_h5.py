"""AttentionDPCR per-category HDF5 files (docs/original.md §6.1).

  <root>/{train,test}/image_<H>_<W>_12/<syn>.h5   dataset 'image' uint8 [N*12,H,W,3] (black background)
  <root>/{train,test}/point_<P>_12/<syn>.h5       dataset 'point' float32 [N*12,P,3] (camera frame)
Row i = model i // 12, view i % 12. `root` may also be the synthetic dataset root (its 'attdpcr' subfolder).
"""
import glob
import os
import threading

import h5py
import numpy as np

from dpcr_jax.data import categories
from dpcr_jax.data.common import DataError, SkipLog, to_float_image


def _resolve_root(root: str) -> str:
  if not os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "attdpcr")):
    return os.path.join(root, "attdpcr")
  return root


def _find_image_folder(split_dir: str, n_views: int, image_size: int | None) -> str:
  """image_<H>_<W>_<V>: the one of the requested size if present, else the only one (resized on load)."""
  if image_size is not None:
    exact = os.path.join(split_dir, f"image_{image_size}_{image_size}_{n_views}")
    if os.path.isdir(exact):
      return exact
  found = sorted(glob.glob(os.path.join(split_dir, f"image_*_*_{n_views}")))
  found = [f for f in found if not f.endswith("_with_texture")]
  if not found:
    raise DataError(f"no image_<H>_<W>_{n_views} folder in {split_dir}")
  if len(found) > 1 and "image_256_256_12" in [os.path.basename(f) for f in found]:
    return os.path.join(split_dir, "image_256_256_12")
  return found[0]


class AttDPCRH5Source:
  """Random-access source over the per-category HDF5 files of one split.

  Items: dict(image [H,W,3] f32 in [0,1], points_sparse/points_mid/points_dense [n,3] f32 (points_mid only
  when n_mid is set), category int32, view int32).
  """

  def __init__(self, root: str, split: str, image_size: int | None = None, n_sparse: int = 1024,
               n_mid: int | None = 4096, n_dense: int = 16384, category_list=None, skip_missing: bool = False,
               n_views: int = 12):
    if split not in ("train", "test"):
      raise ValueError(f"split must be 'train' or 'test' for attdpcr_h5, got {split!r}")
    self.root = _resolve_root(root)
    split_dir = os.path.join(self.root, split)
    if not os.path.isdir(split_dir):
      raise DataError(f"attdpcr_h5: missing split folder {split_dir}")
    self.image_size = image_size
    self.n_views = n_views
    self._keys = {"points_sparse": n_sparse, "points_dense": n_dense}
    if n_mid:
      self._keys["points_mid"] = n_mid
    image_dir = _find_image_folder(split_dir, n_views, image_size)
    log = SkipLog("attdpcr_h5", skip_missing)
    self._files = []  # per category: (category index, {key: path}, rows)
    for syn in categories.resolve_categories(category_list):
      paths = {"image": os.path.join(image_dir, f"{syn}.h5")}
      for key, n in self._keys.items():
        paths[key] = os.path.join(split_dir, f"point_{n}_{n_views}", f"{syn}.h5")
      rows = self._check(paths, log)
      if rows is not None:
        self._files.append((categories.SYNSET_TO_INDEX[syn], paths, rows))
    log.report()
    self.skipped = log.skipped
    if not self._files:
      raise DataError(f"attdpcr_h5: no readable category files under {split_dir}")
    self._offsets = np.cumsum([0] + [rows for _, _, rows in self._files])
    self._local = threading.local()

  def _check(self, paths: dict, log: SkipLog) -> int | None:
    """Validates the files of one category; returns the row count (None = skipped)."""
    rows = None
    for key, path in paths.items():
      if not os.path.isfile(path):
        log.fail(path, "missing file", FileNotFoundError)
        return None
      try:
        with h5py.File(path, "r") as f:
          name = "image" if key == "image" else "point"
          if name not in f:
            log.fail(path, f"no dataset '{name}' (has {list(f.keys())})")
            return None
          shape, dtype = f[name].shape, f[name].dtype
      except OSError as e:
        log.fail(path, f"unreadable/corrupt HDF5 ({e})")
        return None
      if key == "image":
        ok = len(shape) == 4 and shape[3] == 3 and dtype == np.uint8
        expected = "[N,H,W,3] uint8"
      else:
        ok = len(shape) == 3 and shape[1:] == (self._keys[key], 3)
        expected = f"[N,{self._keys[key]},3]"
      if not ok:
        log.fail(path, f"dataset has shape {shape} dtype {dtype}, expected {expected}")
        return None
      if shape[0] % self.n_views:
        log.fail(path, f"{shape[0]} rows is not a multiple of {self.n_views} views")
        return None
      if rows is not None and shape[0] != rows:
        log.fail(path, f"{shape[0]} rows but the image file of this category has {rows}")
        return None
      rows = shape[0]
    return rows

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def _dataset(self, file_idx: int, key: str):
    """Lazily opened h5py datasets, one set per thread (h5py handles are not shared across threads)."""
    cache = self._local.__dict__.setdefault("handles", {})
    if (file_idx, key) not in cache:
      path = self._files[file_idx][1][key]
      cache[(file_idx, key)] = h5py.File(path, "r")["image" if key == "image" else "point"]
    return cache[(file_idx, key)]

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range [0, {len(self)})")
    f = int(np.searchsorted(self._offsets, index, side="right") - 1)
    row = index - int(self._offsets[f])
    out = {}
    try:
      out["image"] = to_float_image(self._dataset(f, "image")[row], self.image_size)
      for key in self._keys:
        out[key] = np.asarray(self._dataset(f, key)[row], np.float32)
    except OSError as e:
      raise DataError(f"attdpcr_h5: failed reading row {row} of {self._files[f][1]}: {e}") from e
    out["category"] = np.int32(self._files[f][0])
    out["view"] = np.int32(row % self.n_views)
    return out

  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_local"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._local = threading.local()
