"""PSGN (Fan et al. 2017) training batches of real ShapeNet renders + 16k GT points (docs/original.md §10).

Each batch_NN.zlib is a raw zlib stream of 32 samples: color uint8 [32,192,256,3] (textured, grey
background), depth uint16 [32,192,256] (0 = background), rotmat f32 [32,3,3], ptcloud uint8 [32,16384,3],
reeb uint16 [32,1024,4], then newline-separated model ids. The colour channels are BGR (OpenCV order) and
are flipped to RGB here [inferred: red cars and brown wood only look right flipped, and the foreground
means then give R > G > B]. Split: validation = batch 15, train = the rest.
Points are de-quantised into PSGN's view-aligned frame (not the AttentionDPCR camera frame): evaluate
after the per-cloud unit-cube normalisation. points_sparse / points_mid are FPS subsets computed on first
access of each file and cached in memory.
"""
import collections
import glob
import json
import os
import re
import threading
import zlib

import numpy as np

from dpcr_jax.data import categories
from dpcr_jax.data import sampling
from dpcr_jax.data.common import DataError, SkipLog, to_float_image

BATCH = 32
HEIGHT, WIDTH, N_POINTS = 192, 256, 16384
VALIDATION_BATCHES = (15,)
_SIZES = [("color", np.uint8, (BATCH, HEIGHT, WIDTH, 3)), ("depth", np.uint16, (BATCH, HEIGHT, WIDTH)),
          ("rotmat", np.float32, (BATCH, 3, 3)), ("ptcloud", np.uint8, (BATCH, N_POINTS, 3)),
          ("reeb", np.uint16, (BATCH, 1024, 4))]


def decode_batch(path: str) -> dict:
  """Decodes one batch file into color, depth, rotmat, ptcloud (raw uint8), reeb and model_ids."""
  try:
    with open(path, "rb") as f:
      raw = zlib.decompress(f.read())
  except OSError as e:
    raise DataError(f"psgn: cannot read {path}: {e}") from e
  except zlib.error as e:
    raise DataError(f"psgn: {path} is not a valid zlib stream ({e})") from e
  out, pos = {}, 0
  for name, dtype, shape in _SIZES:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if pos + nbytes > len(raw):
      raise DataError(f"psgn: {path} is truncated: {len(raw)} bytes, field '{name}' needs bytes "
                      f"[{pos}, {pos + nbytes})")
    out[name] = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"), count=int(np.prod(shape)),
                              offset=pos).reshape(shape)
    pos += nbytes
  ids = raw[pos:].decode("ascii", errors="replace").split()
  if len(ids) != BATCH:
    raise DataError(f"psgn: {path}: expected {BATCH} model ids after the arrays, found {len(ids)}")
  out["model_ids"] = ids
  return out


def dequantize_points(ptcloud: np.ndarray, rotmat: np.ndarray) -> np.ndarray:
  """uint8 [B,N,3] + rotmat [B,3,3] -> float32 [B,N,3] in PSGN's view frame (README of the data folder)."""
  beta = np.deg2rad(20.0)
  v = np.array([[np.cos(beta), 0, -np.sin(beta)], [0, 1, 0], [np.sin(beta), 0, np.cos(beta)]])
  r = rotmat.astype(np.float64) @ np.linalg.inv(v)
  p = (ptcloud.astype(np.float64) / 255.0 - [0.7, 0.5, 0.5]) / 0.4
  return (np.einsum("bnj,bjk->bnk", p, r) + [1.0, 0.0, 0.0]).astype(np.float32)


def _model_synsets(split_dir: str | None) -> dict[str, str]:
  """model id -> synset from the R2N2 split lists (PSGN covers more ShapeNet categories than these 13)."""
  out = {}
  if split_dir is None:
    return out
  for name in ("train_models.json", "val_models.json"):
    path = os.path.join(split_dir, name)
    if os.path.isfile(path):
      with open(path) as f:
        for syn, entries in json.load(f).items():
          for e in entries:
            out[e.split("/")[-1]] = syn
  return out


class PSGNSource:
  """Random access over the samples of the PSGN batch files of one split.

  Items: image [S,S,3] f32 (192x256 padded to 256x256, then resized to image_size; background and padding black
  when mask_background, else PSGN's grey background and black padding), points_sparse/points_mid/points_dense
  f32, category (index into CATEGORIES, -1 when the model is not in the 13 R2N2 categories), view (-1: unknown),
  model_id.
  """

  def __init__(self, root: str, split: str, image_size: int | None = 256, n_sparse: int = 1024,
               n_mid: int | None = 4096, n_dense: int = 16384, skip_missing: bool = False,
               mask_background: bool = True, split_dir: str | None = None, cache_files: int = 32):
    if split not in ("train", "val", "test"):
      raise ValueError(f"split must be 'train' or 'val'/'test' (batch 15), got {split!r}")
    if not 0 < n_dense <= N_POINTS:
      raise ValueError(f"n_dense must be in [1, {N_POINTS}] for PSGN (the files hold {N_POINTS} points; fewer are "
                       f"an FPS subset), got {n_dense}")
    files = sorted(glob.glob(os.path.join(root, "batch_*.zlib")))
    if not files:
      raise DataError(f"psgn: no batch_NN.zlib files in {root}")
    number = lambda p: int(re.search(r"batch_(\d+)\.zlib$", p).group(1))
    val = split in ("val", "test")
    self._files = [p for p in files if (number(p) in VALIDATION_BATCHES) == val]
    if not self._files:
      raise DataError(f"psgn: no {split} batch files in {root} (validation = batch {VALIDATION_BATCHES})")
    self.image_size, self.mask_background = image_size, mask_background
    self.n_sparse, self.n_mid, self.n_dense = n_sparse, n_mid, n_dense
    self._synsets = _model_synsets(split_dir)
    log = SkipLog("psgn", skip_missing)
    if skip_missing:  # validate every file up front (~0.15 s each) so that bad ones can be dropped
      good = []
      for path in self._files:
        try:
          decode_batch(path)
          good.append(path)
        except DataError as e:
          log.fail(path, str(e))
      self._files = good
      log.report()
      if not good:
        raise DataError(f"psgn: no usable {split} batch files in {root} ({len(log.skipped)} bad)")
    self.skipped = log.skipped
    self._cache = collections.OrderedDict()
    self._cache_files = cache_files
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return BATCH * len(self._files)

  def _load(self, file_idx: int) -> dict:
    with self._lock:
      if file_idx in self._cache:
        self._cache.move_to_end(file_idx)
        return self._cache[file_idx]
    raw = decode_batch(self._files[file_idx])
    dense = dequantize_points(raw["ptcloud"], raw["rotmat"])
    subset_sizes = [self.n_sparse, self.n_mid or 0, self.n_dense if self.n_dense < N_POINTS else 0]
    fps = sampling.farthest_point_indices(dense, max(subset_sizes))  # prefixes are FPS subsets
    subset = lambda n: np.take_along_axis(dense, fps[..., :n, None], 1)  # noqa: E731
    entry = {"color": raw["color"], "mask": raw["depth"] > 0, "model_ids": raw["model_ids"],
             "points_sparse": subset(self.n_sparse),
             "points_dense": dense if self.n_dense == N_POINTS else subset(self.n_dense)}
    if self.n_mid:
      entry["points_mid"] = subset(self.n_mid)
    with self._lock:
      self._cache[file_idx] = entry
      while len(self._cache) > self._cache_files:
        self._cache.popitem(last=False)
    return entry

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range [0, {len(self)})")
    f, i = divmod(index, BATCH)
    entry = self._load(f)
    color = entry["color"][i][..., ::-1]  # BGR -> RGB
    if self.mask_background:
      color = color * entry["mask"][i][..., None]
    pad = (WIDTH - HEIGHT) // 2
    image = np.zeros((WIDTH, WIDTH, 3), np.uint8)
    image[pad:pad + HEIGHT] = color
    mid = entry["model_ids"][i]
    syn = self._synsets.get(mid)
    out = {"image": to_float_image(image, self.image_size),
           "points_sparse": entry["points_sparse"][i], "points_dense": entry["points_dense"][i],
           "category": np.int32(categories.SYNSET_TO_INDEX[syn] if syn else -1), "view": np.int32(-1),
           "model_id": mid}
    if self.n_mid:
      out["points_mid"] = entry["points_mid"][i]
    return out
