"""Cached medoid baselines (dpcr_jax.baseline_cache): identical to recomputing, keyed by data and settings."""
import os

import numpy as np
import pytest

from dpcr_jax import baseline_cache, evaluation
from dpcr_jax.data import pipeline
from dpcr_jax.synth import generate_synthetic


@pytest.fixture(scope="module")
def data_config(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synth_medoids"))
  generate_synthetic(root, 5, seed=1, image_size=32, n_dense=256, n_mid=64, n_sparse=32, workers=1,
                     r2n2_views=0, categories=["chair", "lamp"], progress=False, renderer="numpy")
  config = pipeline.default_data_config()
  config.source, config.root, config.image_size = "attdpcr_h5", root, 32
  config.n_dense, config.n_mid, config.n_sparse = 256, 64, 32
  config.categories = ["chair", "lamp"]
  return config


def _same(a, b):
  assert a.num_clouds == b.num_clouds and set(a.blind) == set(b.blind) and set(a.oracle) == set(b.oracle)
  for v in a.blind:
    np.testing.assert_array_equal(a.blind[v], b.blind[v])
  for k in a.oracle:
    np.testing.assert_array_equal(a.oracle[k], b.oracle[k])


def test_cache_stores_then_hits_with_identical_medoids(data_config, tmp_path):
  kw = dict(batch_size=8, seed=0, num_points=64, impl="jnp")
  fresh = baseline_cache.medoid_baselines(data_config, cache_dir="", **kw)
  assert fresh.cache == "off"
  first = baseline_cache.medoid_baselines(data_config, cache_dir=str(tmp_path), **kw)
  second = baseline_cache.medoid_baselines(data_config, cache_dir=str(tmp_path), **kw)
  assert first.cache.startswith("stored ") and second.cache.startswith("hit ")
  _same(fresh, first)
  _same(fresh, second)
  cats, views = np.array([0, 4, 4]), np.array([0, 3, 11])  # chair = 0, lamp = 6 in CATEGORIES; 4 absent
  for name in ("medoid", "oracle_medoid"):
    np.testing.assert_array_equal(fresh.predict(cats, views)[name], second.predict(cats, views)[name])
  assert len(os.listdir(tmp_path / "medoids")) == 1


def test_key_changes_with_settings_config_and_files(data_config, tmp_path):
  key = lambda cfg=data_config, **kw: baseline_cache.fingerprint(  # noqa: E731
      cfg, 8, 0, {"max_per_group": 32, **kw})
  base = key()
  assert key() == base
  assert key(max_per_group=16) != base
  other = data_config.copy_and_resolve_references()
  other.n_dense = 128
  assert key(other) != base
  other = data_config.copy_and_resolve_references()
  other.num_workers = 7  # how fast, not what: same key
  assert key(other) == base
  some_file = next(os.path.join(d, f) for d, _, fs in os.walk(data_config.root) for f in fs if f.endswith(".h5"))
  st = os.stat(some_file)
  os.utime(some_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
  try:
    assert key() != base  # a changed data file invalidates the cache
  finally:
    os.utime(some_file, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_unreadable_cache_file_is_recomputed(data_config, tmp_path, caplog):
  kw = dict(batch_size=8, seed=0, num_points=64, impl="jnp", cache_dir=str(tmp_path))
  first = baseline_cache.medoid_baselines(data_config, **kw)
  path = first.cache.split(" ", 1)[1]
  with open(path, "wb") as f:
    f.write(b"not an npz")
  with caplog.at_level("WARNING"):
    again = baseline_cache.medoid_baselines(data_config, **kw)
  assert again.cache.startswith("stored ") and "unreadable" in caplog.text
  _same(first, again)


def test_from_medoids_rebuilds_predict():
  blind = {0: np.zeros((4, 3), np.float32), 1: np.ones((4, 3), np.float32)}
  oracle = {(2, 1): np.full((4, 3), 2, np.float32)}
  m = evaluation.MedoidBaselines.from_medoids(blind, oracle, 10)
  out = m.predict(np.array([2, 3]), np.array([1, 1]))
  np.testing.assert_array_equal(out["oracle_medoid"][0], oracle[(2, 1)])
  np.testing.assert_array_equal(out["oracle_medoid"][1], blind[1])  # no oracle for (3, 1): the blind medoid
  np.testing.assert_array_equal(out["medoid"], np.stack([blind[1], blind[1]]))
