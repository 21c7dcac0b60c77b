"""The medoid baselines of a training set, computed once per dataset and reused (an .npz per fingerprint).

The medoids (baselines.MedoidBaselines) depend only on the training data and on how it is read, not on the
model, so every evaluation of a run on the same data would recompute the same thing. ``medoid_baselines``
keys a cache file by a fingerprint of everything they depend on: the data config, the iterator's batch size,
seed and process count, the medoid settings, and the data files themselves (path, size and mtime of every
file under data.root, or of the first MAX_FINGERPRINT_FILES of them plus the count for larger trees). A
changed file, config field or setting gives a new key; a stale or unreadable cache file is recomputed.
"""
from __future__ import annotations

import hashlib
import json
import os

from absl import logging
import numpy as np

MAX_FINGERPRINT_FILES = 50000
CACHE_ENV = "DPCR_CACHE_DIR"


def default_cache_dir() -> str:
  """$DPCR_CACHE_DIR, else ~/.cache/dpcr_jax (never the data folder: it may be shared or read-only)."""
  return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "dpcr_jax")


def _files_fingerprint(root: str) -> dict:
  digest, count = hashlib.sha256(), 0
  for folder, dirs, files in os.walk(root):
    dirs.sort()
    for name in sorted(files):
      count += 1
      if count <= MAX_FINGERPRINT_FILES:
        path = os.path.join(folder, name)
        st = os.stat(path)
        digest.update(f"{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return {"files": count, "sha256": digest.hexdigest()}


def fingerprint(data_config, batch_size: int, seed: int, settings: dict) -> str:
  """Hex key of the medoids of ``data_config``'s training split read with these settings."""
  import jax  # pylint: disable=g-import-not-at-top
  data = data_config.to_dict() if hasattr(data_config, "to_dict") else dict(data_config)
  data["root"] = os.path.abspath(data["root"])
  for key in ("num_workers", "prefetch", "with_model_id"):  # how fast it is read, not what is read
    data.pop(key, None)
  key = {"data": data, "batch_size": batch_size, "seed": seed, "settings": settings,
         "process_count": jax.process_count(), "files": _files_fingerprint(data["root"])}
  return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _save(path: str, medoids) -> None:
  arrays = {"num_clouds": np.int64(medoids.num_clouds)}
  for view, cloud in medoids.blind.items():
    arrays[f"blind/{int(view)}"] = cloud
  for (cat, view), cloud in medoids.oracle.items():
    arrays[f"oracle/{int(cat)}/{int(view)}"] = cloud
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + f".tmp{os.getpid()}.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cache file


def _load(path: str):
  from dpcr_jax.baselines import MedoidBaselines  # pylint: disable=g-import-not-at-top
  with np.load(path) as f:
    blind = {int(k.split("/")[1]): f[k] for k in f.files if k.startswith("blind/")}
    oracle = {(int(k.split("/")[1]), int(k.split("/")[2])): f[k] for k in f.files if k.startswith("oracle/")}
    num_clouds = int(f["num_clouds"])
  if not blind or not oracle:
    raise ValueError(f"{path} holds no medoids")
  return MedoidBaselines.from_medoids(blind, oracle, num_clouds)


def medoid_baselines(data_config, batch_size: int, seed: int, max_per_group: int = 32, max_examples: int = 5000,
                     num_points: int = 512, impl: str = "ffi", cache_dir: str | None = None):
  """baselines.MedoidBaselines of the training split, from the cache when it holds them.

  Args: as MedoidBaselines, plus the iterator's ``batch_size`` and ``seed``; ``cache_dir`` None =
  default_cache_dir(), '' = no cache. Returns the MedoidBaselines; its ``cache`` attribute says
  'hit <path>', 'stored <path>' or 'off'.
  """
  from dpcr_jax.data import make_iterator  # pylint: disable=g-import-not-at-top
  from dpcr_jax.baselines import MedoidBaselines  # pylint: disable=g-import-not-at-top
  cache_dir = default_cache_dir() if cache_dir is None else cache_dir
  settings = {"max_per_group": max_per_group, "max_examples": max_examples, "num_points": num_points,
              "impl": impl}
  path = None
  if cache_dir:
    path = os.path.join(cache_dir, "medoids", fingerprint(data_config, batch_size, seed, settings) + ".npz")
    if os.path.isfile(path):
      try:
        medoids = _load(path)
        medoids.cache = f"hit {path}"
        return medoids
      except (OSError, ValueError, KeyError) as e:
        logging.warning("medoid cache %s unreadable (%s); recomputing", path, e)
  medoids = MedoidBaselines(make_iterator(data_config, "train", batch_size, seed=seed, shuffle=True, num_epochs=1,
                                          drop_remainder=False),
                            max_per_group=max_per_group, max_examples=max_examples, num_points=num_points, impl=impl)
  medoids.cache = "off"
  if path:
    try:
      _save(path, medoids)
      medoids.cache = f"stored {path}"
    except OSError as e:
      logging.warning("cannot write the medoid cache %s (%s)", path, e)
  return medoids
