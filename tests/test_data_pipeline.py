"""The grain input pipeline: batch contract, per-epoch shuffling, sharding, checkpointable resume."""
import json

import numpy as np
import pytest

from dpcr_jax import data
from dpcr_jax.data import pipeline
from dpcr_jax.synth import generate

SIZE, N_DENSE, N_MID, N_SPARSE = 32, 128, 64, 16


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("synth"))
  generate.generate_synthetic(path, 5, seed=2, image_size=SIZE, n_dense=N_DENSE, n_mid=N_MID, n_sparse=N_SPARSE,
                               categories=["car", "sofa"], r2n2_views=2, progress=False, fps="numpy")
  return path  # train: 2 categories x 4 models x 12 views = 96 examples


def _config(root, **kw):
  c = data.default_data_config()
  c.root, c.image_size, c.n_dense, c.n_mid, c.n_sparse = root, SIZE, N_DENSE, N_MID, N_SPARSE
  c.categories = ["car", "sofa"]  # None would require all 13 categories
  c.update(kw)
  return c


def _keys(batch):
  """An identity per example: (category, view, first dense point)."""
  return [(int(c), int(v), tuple(p[0].tolist())) for c, v, p in
          zip(batch["category"], batch["view"], batch["points_dense"])]


def test_batch_contract(root):
  batch = next(data.make_iterator(_config(root), "train", batch_size=5, seed=0))
  assert batch["image"].shape == (5, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert batch["points_sparse"].shape == (5, N_SPARSE, 3) and batch["points_sparse"].dtype == np.float32
  assert batch["points_mid"].shape == (5, N_MID, 3) and batch["points_dense"].shape == (5, N_DENSE, 3)
  assert batch["category"].dtype == np.int32 and batch["view"].dtype == np.int32
  assert set(batch["category"].tolist()) <= {3, 9} and "model_id" not in batch
  assert data.CATEGORIES[3] == ("02958343", "car") and len(data.CATEGORIES) == 13
  no_mid = next(data.make_iterator(_config(root, n_mid=0), "train", batch_size=2, seed=0))
  assert "points_mid" not in no_mid
  with_ids = next(data.make_iterator(_config(root, source="r2n2", with_model_id=True), "train", 3, seed=0))
  assert with_ids["model_id"].shape == (3,) and with_ids["image"].shape == (3, SIZE, SIZE, 3)


def test_epochs_are_reshuffled_permutations(root):
  it = data.make_iterator(_config(root), "train", batch_size=10, seed=3, num_epochs=2)
  batches = list(it)
  assert len(batches) == 2 * 9  # 96 // 10 per epoch, remainder dropped each epoch
  first = sum((_keys(b) for b in batches[:9]), [])
  second = sum((_keys(b) for b in batches[9:]), [])
  assert len(set(first)) == 90 and len(set(second)) == 90
  assert first != second
  again = sum((_keys(b) for b in list(data.make_iterator(_config(root), "train", 10, seed=3, num_epochs=1))), [])
  assert again == first
  other = sum((_keys(b) for b in list(data.make_iterator(_config(root), "train", 10, seed=4, num_epochs=1))), [])
  assert other != first
  unshuffled = list(data.make_iterator(_config(root), "train", 10, seed=0, shuffle=False, num_epochs=1))
  assert [int(v) for v in unshuffled[0]["view"]] == list(range(10))


def test_keep_remainder(root):
  full = list(data.make_iterator(_config(root), "train", 10, seed=0, num_epochs=1, drop_remainder=False))
  assert [len(b["view"]) for b in full] == [10] * 9 + [6]
  assert len(set(sum((_keys(b) for b in full), []))) == 96


def test_processes_read_disjoint_shards_of_every_epoch(root, monkeypatch):
  """2 processes x global batch 8: each reads its 4 rows of every global batch, so within every epoch the
  processes never draw the same example, and together they read exactly a single process's batches."""
  single = list(data.make_iterator(_config(root), "train", 8, seed=5, num_epochs=2))
  shards = []
  for process in range(2):
    monkeypatch.setattr(pipeline, "_process_shard", lambda _, p=process: (p, 2))
    shards.append(list(data.make_iterator(_config(root), "train", 8, seed=5, num_epochs=2)))
  assert len(single) == len(shards[0]) == len(shards[1]) == 2 * 12
  for whole, part0, part1 in zip(single, *shards):
    assert len(part0["view"]) == len(part1["view"]) == 4
    assert _keys(whole) == _keys(part0) + _keys(part1)
  for epoch in range(2):
    keys = [set(sum((_keys(b) for b in shard[12 * epoch:12 * (epoch + 1)]), [])) for shard in shards]
    assert len(keys[0]) == len(keys[1]) == 48 and not keys[0] & keys[1]
  with pytest.raises(ValueError, match="divisible by the number of shards"):
    data.make_iterator(_config(root), "train", 7, seed=0)
  with pytest.raises(ValueError, match="drop_remainder=False needs a single shard"):
    data.make_iterator(_config(root), "train", 8, seed=0, drop_remainder=False)


def test_resume_mid_epoch_from_saved_state(root):
  config = _config(root)
  it = data.make_iterator(config, "train", batch_size=7, seed=11)
  for _ in range(10):  # 13 batches per epoch: save inside epoch 1, then cross into epoch 2
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # as stored in a checkpoint
  expected = [next(it) for _ in range(6)]
  resumed = data.make_iterator(config, "train", batch_size=7, seed=11)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_config_errors(root, tmp_path):
  with pytest.raises(ValueError, match="data.source must be one of"):
    data.make_source(_config(root, source="modelnet"), "train")
  with pytest.raises(FileNotFoundError, match="is not a folder"):
    data.make_source(_config(str(tmp_path / "nope")), "train")
  with pytest.raises(ValueError, match="unknown category 'bicycle'"):
    data.make_source(_config(root, categories=["bicycle"]), "train")
  with pytest.raises(ValueError, match="batch_size"):
    data.make_iterator(_config(root), "test", batch_size=100, seed=0)
  ds = data.make_dataset(_config(root), "test")
  assert len(ds) == 24 and ds[0]["points_dense"].shape == (N_DENSE, 3)
