"""Input pipeline on grain: config, dataset construction, and a checkpointable batch iterator.

Epoch and sharding semantics: every epoch is one permutation of the whole dataset, drawn from `seed` and the
epoch number (grain's index shuffle) and the same on every process; it is cut into global batches of
`batch_size`, and process p of n reads rows [p * batch_size / n, (p + 1) * batch_size / n) of each one. So the
processes of a multi-host run read disjoint shards of every epoch, and together exactly the global batches a
single process would read with the same seed. With drop_remainder the last partial batch of every epoch is
dropped, so batches never mix two epochs. The iterator is grain's DatasetIterator: get_state() is a small
dict ({'next_index': k}) to store in a checkpoint, and set_state() resumes mid-epoch with identical batches.
"""
import logging
import os
import threading

import grain
import ml_collections
import numpy as np

from dpcr_jax.data.attdpcr_h5 import AttDPCRH5Source
from dpcr_jax.data.common import DataError
from dpcr_jax.data.pix3d import Pix3DSource
from dpcr_jax.data.psgn import PSGNSource
from dpcr_jax.data.r2n2 import R2N2Source

SOURCES = ("attdpcr_h5", "r2n2", "psgn", "pix3d")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED_DATA = os.path.join(REPO_ROOT, "..", "shared", "data")


def default_data_config() -> ml_collections.ConfigDict:
  """Data options shared by training and evaluation.

  Fields:
    source: 'attdpcr_h5' (AttentionDPCR per-category HDF5; also the synthetic root), 'r2n2' (ShapeNetRendering +
      ShapeNet_pointclouds + split lists), 'psgn' (PSGN zlib batches), 'pix3d' (pix3d.json; evaluation only).
    root: dataset folder (synthetic root, attdpcr folder, R2N2 root, PSGN folder or Pix3D root).
    image_size: network input side; images are resized when stored at another size.
    n_sparse, n_mid, n_dense: point counts (sparse/mid are FPS subsets; n_mid = 0 drops points_mid).
    shuffle: shuffle each epoch (the original AttentionDPCR fetcher never shuffles and is category-blocked;
      True is our default).
    categories: list of names or synsets; None = all 13.
    skip_missing: skip (and count/report) models or files with missing/bad data instead of raising.
    num_workers: reader threads (each builds whole batches); 2 suits a 2-core machine.
    prefetch: batches buffered ahead of the consumer.
    with_model_id: add 'model_id' (numpy str array) to batches.
    shard_by_process: each jax process reads its own rows of every global batch (multi-host; see the
      module doc); False: every process reads whole global batches (single-process tools).
    r2n2_split_file: model-list JSON ('' = <root>/splits/{train,val}_models.json); the real lists are in
      ../shared/data/shapenet-splits.
    r2n2_background: grey level under transparent pixels (0 black = AttentionDPCR look, 1 white = R2N2).
    r2n2_lmnet_crop: crop 137 -> 128 ([4:-5]) like 3D-LMNet before resizing.
    r2n2_frame: 'canonical' (object frame, as stored) or 'view' (camera frame of each view).
    pix3d_pad: Pix3D long side = image_size - pad (70 at 256, like LMNet's 35 at 128).
    psgn_mask_background: black out PSGN's grey background with the depth mask.
    psgn_split_dir: R2N2 split lists used to map PSGN model ids to categories ('' = ../shared path).
  """
  c = ml_collections.ConfigDict()
  c.source = "attdpcr_h5"
  c.root = ""
  c.image_size = 256
  c.n_sparse = 1024
  c.n_mid = 4096
  c.n_dense = 16384
  c.shuffle = True
  c.categories = ml_collections.config_dict.placeholder(tuple)  # a tuple: settable from the command line
  c.skip_missing = False
  c.num_workers = 2
  c.prefetch = 2
  c.with_model_id = False
  c.shard_by_process = True
  c.r2n2_split_file = ""
  c.r2n2_background = 0.0
  c.r2n2_lmnet_crop = False
  c.r2n2_frame = "canonical"
  c.pix3d_pad = 70
  c.psgn_mask_background = True
  c.psgn_split_dir = ""
  return c


def make_source(config, split: str):
  """The random-access source (len / getitem -> example dict) for a config and split."""
  if config.source not in SOURCES:
    raise ValueError(f"data.source must be one of {SOURCES}, got {config.source!r}")
  if not config.root:
    raise ValueError("data.root is empty: set it to the dataset folder")
  if not os.path.isdir(config.root):
    raise FileNotFoundError(f"data.root {config.root!r} is not a folder")
  cats = list(config.categories) if config.categories is not None else None
  n_mid = config.n_mid or None
  common = dict(image_size=config.image_size, n_sparse=config.n_sparse, n_mid=n_mid, n_dense=config.n_dense,
                skip_missing=config.skip_missing)
  if config.source == "attdpcr_h5":
    split = {"val": "test"}.get(split, split)
    return AttDPCRH5Source(config.root, split, category_list=cats, **common)
  if config.source == "r2n2":
    return R2N2Source(config.root, split, split_file=config.r2n2_split_file or None, category_list=cats,
                      background=config.r2n2_background, lmnet_crop=config.r2n2_lmnet_crop,
                      frame=config.r2n2_frame, **common)
  if config.source == "psgn":
    split_dir = config.psgn_split_dir or os.path.join(SHARED_DATA, "shapenet-splits")
    return PSGNSource(config.root, split, mask_background=config.psgn_mask_background,
                      split_dir=split_dir if os.path.isdir(split_dir) else None, **common)
  return Pix3DSource(config.root, pad=config.pix3d_pad, category_list=cats, **common)  # no splits: all = test


class _Examples:
  """Drops keys the config did not ask for (model_id) so that batches are numeric by default.

  With skip_missing, an example that fails to load while training (a file damaged or removed after the
  source was opened) is replaced by the next loadable one in index order (deterministic, so a resumed run
  sees the same batches), with one warning per bad example naming its file; at most MAX_CONSECUTIVE_BAD in a
  row. Without skip_missing the DataError (which names the file) propagates.
  """
  MAX_CONSECUTIVE_BAD = 100

  def __init__(self, source, with_model_id: bool, skip_missing: bool = False):
    self._source, self._with_model_id, self._skip_missing = source, with_model_id, skip_missing
    self._reported: set[int] = set()
    self._lock = threading.Lock()

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    errors = []
    for attempt in range(min(len(self), self.MAX_CONSECUTIVE_BAD)):
      i = (int(index) + attempt) % len(self)
      try:
        ex = self._source[i]
      except (DataError, OSError) as e:
        if not self._skip_missing:
          raise
        errors.append(e)
        with self._lock:
          if i not in self._reported:
            self._reported.add(i)
            logging.warning("skip_missing: example %d failed to load (%s); using the next loadable example "
                            "(%d bad examples so far)", i, e, len(self._reported))
        continue
      if not self._with_model_id:
        ex.pop("model_id", None)
      return ex
    raise DataError(f"{len(errors)} consecutive examples from {index} failed to load; the last: {errors[-1]}")


def make_dataset(config, split: str) -> grain.MapDataset:
  """grain.MapDataset of example dicts (unshuffled, unsharded, unbatched)."""
  return grain.MapDataset.source(_Examples(make_source(config, split), config.with_model_id, config.skip_missing))


def _process_shard(shard_by_process: bool) -> tuple[int, int]:
  if not shard_by_process:
    return 0, 1
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index(), jax.process_count()


def make_iterator(config, split: str, batch_size: int, seed: int, shuffle: bool | None = None,
                  num_epochs: int | None = None, drop_remainder: bool = True) -> grain.DatasetIterator:
  """Checkpointable iterator of numpy batch dicts: this process's rows of each global batch.

  Batches: image [b,H,W,3] f32 in [0,1]; points_sparse [b,n_sparse,3], points_mid [b,n_mid,3] (if n_mid),
  points_dense [b,n_dense,3] f32; category [b] int32; view [b] int32; model_id [b] str (with_model_id),
  where b = batch_size / process count (config.shard_by_process) or batch_size.
  Args:
    batch_size: the GLOBAL batch size (over all processes).
    shuffle: None = config.shuffle.
    num_epochs: None = repeat forever.
    drop_remainder: drop the last partial batch of each epoch (else each epoch ends with a smaller batch).
  """
  shard_index, shard_count = _process_shard(config.shard_by_process)
  return batch_iterator(make_dataset(config, split), batch_size, seed,
                        shuffle=config.shuffle if shuffle is None else shuffle, num_epochs=num_epochs,
                        drop_remainder=drop_remainder, shard_index=shard_index, shard_count=shard_count,
                        num_threads=config.num_workers, prefetch=config.prefetch, name=split)


def batch_iterator(examples, batch_size: int, seed: int, shuffle: bool = True, num_epochs: int | None = None,
                   drop_remainder: bool = True, shard_index: int = 0, shard_count: int = 1, num_threads: int = 2,
                   prefetch: int = 2, name: str = "dataset") -> grain.DatasetIterator:
  """The batching and sharding of make_iterator over any random-access ``examples`` (len, getitem -> dict).

  Global batch g of epoch e holds positions [g * batch_size, (g + 1) * batch_size) of epoch e's permutation
  (identity when not shuffling); shard s of n yields the s-th contiguous 1/n of those rows.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index must be in [0, shard_count={shard_count}), got {shard_index}")
  if batch_size % shard_count:
    raise ValueError(f"batch_size={batch_size} must be divisible by the number of shards (processes) {shard_count}")
  if shard_count > 1 and not drop_remainder:
    raise ValueError("drop_remainder=False needs a single shard: a partial last batch cannot be split evenly")
  num_examples = len(examples)
  batches_per_epoch = num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)
  if batches_per_epoch == 0:
    raise ValueError(f"{name}: {num_examples} examples < batch_size {batch_size} with drop_remainder=True")
  local = batch_size // shard_count
  order = grain.MapDataset.range(num_examples)
  if shuffle:
    order = order.shuffle(seed % 2**32)  # order[e * num_examples + j] = position j of epoch e's permutation

  def load_batch(step, _):
    epoch, b = divmod(step, batches_per_epoch)
    start = b * batch_size + shard_index * local
    positions = range(start, min(start + local, num_examples))
    return _stack([examples[int(order[epoch * num_examples + j])] for j in positions])

  ds = grain.MapDataset.range(batches_per_epoch).repeat(num_epochs).map_with_index(load_batch)
  options = grain.ReadOptions(num_threads=max(num_threads, 1), prefetch_buffer_size=max(prefetch, 1))
  return iter(ds.to_iter_dataset(options))


def _stack(examples: list[dict]) -> dict:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
