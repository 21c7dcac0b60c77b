"""Loaders for the real on-disk formats, on fixture files in those formats, and their bad-data errors."""
import json
import os
import shutil
import zlib

import h5py
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from dpcr_jax import data
from dpcr_jax.data import camera
from dpcr_jax.data import categories
from dpcr_jax.data import pix3d
from dpcr_jax.data import psgn
from dpcr_jax.data import common
from dpcr_jax.data import r2n2
from dpcr_jax.data.common import DataError
from dpcr_jax.synth import generate
from dpcr_jax.synth import render
from dpcr_jax.synth import shapes
import xla_ops

SIZE, N_DENSE, N_MID, N_SPARSE = 64, 512, 128, 32
CATS = ["chair", "table", "lamp"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared", "data")


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synth"))
  generate.generate_synthetic(root, 5, seed=1, image_size=SIZE, n_dense=N_DENSE, n_mid=N_MID, n_sparse=N_SPARSE,
                               categories=CATS, r2n2_views=3, progress=False, fps="numpy")
  return root


@pytest.fixture
def copy_root(synth_root, tmp_path):
  dst = str(tmp_path / "copy")
  shutil.copytree(synth_root, dst)
  return dst


def _config(root, **kw):
  c = data.default_data_config()
  c.root, c.image_size, c.n_dense, c.n_mid, c.n_sparse = root, SIZE, N_DENSE, N_MID, N_SPARSE
  c.categories = CATS
  c.update(kw)
  return c


def test_attdpcr_h5_items_match_files(synth_root):
  src = data.make_source(_config(synth_root), "train")
  assert len(src) == 3 * 4 * 12
  with h5py.File(os.path.join(synth_root, "attdpcr", "train", f"image_{SIZE}_{SIZE}_12", "04379243.h5")) as f:
    raw_image = f["image"][17]
  with h5py.File(os.path.join(synth_root, "attdpcr", "train", f"point_{N_MID}_12", "04379243.h5")) as f:
    raw_mid = f["point"][17]
  ex = src[48 + 17]  # categories are in CATEGORIES order: chair (03001627) then lamp then table
  assert ex["category"] == categories.SYNSET_TO_INDEX["04379243"] and ex["view"] == 17 % 12
  np.testing.assert_array_equal(ex["image"], raw_image.astype(np.float32) / 255)
  np.testing.assert_array_equal(ex["points_mid"], raw_mid)
  assert ex["points_sparse"].shape == (N_SPARSE, 3) and ex["points_dense"].shape == (N_DENSE, 3)
  assert ex["image"].dtype == np.float32 and 0 <= ex["image"].min() and ex["image"].max() <= 1
  # Another image size is resized on load; the test split is separate.
  assert data.make_source(_config(synth_root, image_size=32), "test")[0]["image"].shape == (32, 32, 3)
  assert len(data.make_source(_config(synth_root), "test")) == 3 * 12


def test_attdpcr_h5_missing_file(copy_root):
  path = os.path.join(copy_root, "attdpcr", "train", f"point_{N_SPARSE}_12", "03636649.h5")
  os.remove(path)
  with pytest.raises(FileNotFoundError, match="03636649.h5: missing file"):
    data.make_source(_config(copy_root), "train")
  src = data.make_source(_config(copy_root, skip_missing=True), "train")
  assert len(src) == 2 * 4 * 12 and len(src.skipped) == 1 and src.skipped[0][0] == path


def test_attdpcr_h5_corrupt_and_wrong_shape(copy_root):
  img = os.path.join(copy_root, "attdpcr", "train", f"image_{SIZE}_{SIZE}_12", "03001627.h5")
  with open(img, "r+b") as f:
    f.truncate(1000)
  with pytest.raises(DataError, match=r"03001627\.h5: unreadable/corrupt HDF5"):
    data.make_source(_config(copy_root), "train")
  os.remove(img)
  pts = os.path.join(copy_root, "attdpcr", "train", f"point_{N_DENSE}_12", "04379243.h5")
  with h5py.File(pts, "w") as f:
    f["point"] = np.zeros((48, 100, 3), np.float32)
  with pytest.raises(DataError, match=rf"04379243\.h5: dataset has shape \(48, 100, 3\).*expected \[N,{N_DENSE},3\]"):
    data.make_source(_config(copy_root, categories=["table"]), "train")


def test_r2n2_view_frame_points_project_onto_image(synth_root):
  src = data.make_source(_config(synth_root, source="r2n2", image_size=None, r2n2_frame="view"), "train")
  assert len(src) == 3 * 4 * 3
  for i in (0, 20, 35):
    ex = src[i]
    assert ex["image"].shape == (137, 137, 3) and ex["model_id"].count("/") == 1
    mask = ex["image"].max(-1) > 0
    rc = np.clip(np.floor(camera.project(ex["points_dense"], 137 * 35 / 32, 137, 137)).astype(int), 0, 136)
    assert mask[rc[:, 0], rc[:, 1]].mean() >= 0.95
  canonical = data.make_source(_config(synth_root, source="r2n2"), "val")[0]
  assert canonical["image"].shape == (SIZE, SIZE, 3)
  assert 0.9 < np.linalg.norm(canonical["points_dense"].max(0) - canonical["points_dense"].min(0)) <= 1.0 + 1e-5
  white = data.make_source(_config(synth_root, source="r2n2", r2n2_background=1.0, image_size=None), "val")[0]
  assert white["image"][0, 0].tolist() == [1.0, 1.0, 1.0]


def test_r2n2_sparse_falls_back_to_mid_prefix(copy_root):
  syn = "03001627"
  mid = sorted(os.listdir(os.path.join(copy_root, "ShapeNet_pointclouds", syn)))[0]
  folder = os.path.join(copy_root, "ShapeNet_pointclouds", syn, mid)
  os.remove(os.path.join(folder, f"pointcloud_{N_SPARSE}.npy"))
  ex = data.make_source(_config(copy_root, source="r2n2", categories=["chair"]), "train")[0]
  np.testing.assert_array_equal(ex["points_sparse"], np.load(os.path.join(folder, f"pointcloud_{N_MID}.npy"))[:N_SPARSE])


def test_r2n2_model_in_split_without_files(copy_root):
  split = os.path.join(copy_root, "splits", "train_models.json")
  lists = json.load(open(split))
  lists["03001627"].append("03001627/ffffffffffffffffffffffffffffffff")
  json.dump(lists, open(split, "w"))
  with pytest.raises(FileNotFoundError, match="03001627/ffff.*has no renderings"):
    data.make_source(_config(copy_root, source="r2n2"), "train")
  src = data.make_source(_config(copy_root, source="r2n2", skip_missing=True), "train")
  assert len(src) == 3 * 4 * 3 and len(src.skipped) == 1
  json.dump({"03001627": ["04379243/abc"]}, open(split, "w"))
  with pytest.raises(DataError, match="is not '03001627/<model_id>'"):
    data.make_source(_config(copy_root, source="r2n2"), "train")


def test_real_r2n2_split_lists():
  path = os.path.join(SHARED, "shapenet-splits", "train_models.json")
  if not os.path.isfile(path):
    pytest.skip(f"real split lists not found at {path}")
  train = r2n2.read_split_file(path)
  val = r2n2.read_split_file(os.path.join(SHARED, "shapenet-splits", "val_models.json"))
  assert sorted(train) == categories.SYNSETS
  assert len(train["04379243"]) == 6807 and len(val["04379243"]) == 1702
  for syn in categories.SYNSETS:  # the R2N2 rule: sorted ids, first int(0.8 n) train
    assert categories.split_models(train[syn] + val[syn]) == (train[syn], val[syn])


def _make_pix3d(root: str) -> list:
  """A tiny Pix3D in the real layout: photos with a procedural object over noise, masks, models, pix3d.json."""
  rng = np.random.default_rng(0)
  entries = []
  specs = [("chair", {}), ("sofa", {}), ("table", {"truncated": True}), ("chair", {"occluded": True}),
           ("bed", {}), ("chair", {"slightly_occluded": False})]
  for k, (cat, flags) in enumerate(specs):
    model = f"model/{cat}/m{k}/model.obj"
    os.makedirs(os.path.join(root, os.path.dirname(model)), exist_ok=True)
    v, f = shapes.make_shape(cat if cat in shapes.BUILDERS else "cabinet", rng)
    shapes.write_obj(os.path.join(root, model), v, f)
    h, w = 90, 120
    rot, pos = camera.camera_info(40 + 20 * k, 20, 1.6)
    rgba = render.render_numpy(v, f, rot, pos, 150, h, w)
    photo = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    obj = rgba[..., 3] > 0
    photo[obj] = np.maximum(rgba[obj, :3], 1)
    ys, xs = np.nonzero(obj)
    img, mask = f"img/{cat}/{k:04d}.png", f"mask/{cat}/{k:04d}.png"
    for rel, arr in ((img, photo), (mask, (obj * 255).astype(np.uint8))):
      os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
      Image.fromarray(arr).save(os.path.join(root, rel))
    entry = {"img": img, "mask": mask, "category": cat, "img_size": [w, h], "model": model,
             "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
             "rot_mat": np.eye(3).tolist(), "trans_mat": [0, 0, 2], "focal_length": 35.0,
             "cam_position": pos.tolist(), "inplane_rotation": 0.0,
             "truncated": False, "occluded": False, "slightly_occluded": False}
    entry.update(flags)
    entries.append(entry)
  json.dump(entries, open(os.path.join(root, "pix3d.json"), "w"))
  return entries


def test_pix3d_selection_and_preprocessing(tmp_path):
  root = str(tmp_path)
  entries = _make_pix3d(root)
  src = data.make_source(_config(root, source="pix3d", categories=None, image_size=64, pix3d_pad=16), "test")
  assert len(src) == 3  # chair, sofa, chair: the truncated table, occluded chair and bed are filtered out
  for i, e in enumerate(x for x in entries if x["model"] in {"model/chair/m0/model.obj", "model/sofa/m1/model.obj",
                                                               "model/chair/m5/model.obj"}):
    ex = src[i]
    assert ex["image"].shape == (64, 64, 3) and ex["model_id"] == e["model"]
    assert ex["category"] == categories.SYNSET_TO_INDEX[categories.NAME_TO_SYNSET[e["category"]]]
    ys, xs = np.nonzero(ex["image"].max(-1) > 0)
    assert max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) in (47, 48)  # long side = 64 - 16
    assert ex["points_dense"].shape == (N_DENSE, 3) and ex["points_mid"].shape == (N_MID, 3)
    v, _ = common.read_obj(os.path.join(root, e["model"]))
    assert np.all(np.abs(ex["points_dense"]) <= np.abs(v).max() * 0.57 + 1e-6)  # canonical frame, x0.57
  # Outside-mask pixels are black (the noise background is gone).
  photo = np.asarray(Image.open(os.path.join(root, entries[0]["img"])))
  mask = np.asarray(Image.open(os.path.join(root, entries[0]["mask"])))
  out = pix3d.preprocess_image(photo, mask, [0, 0, photo.shape[1], photo.shape[0]], 120, 0)
  assert out.shape == (120, 120, 3)
  np.testing.assert_array_equal(out[15:105][mask == 0], 0)  # long side 120 -> scale 1, 15 px pad top/bottom


def test_pix3d_missing_files(tmp_path):
  root = str(tmp_path)
  entries = _make_pix3d(root)
  os.remove(os.path.join(root, entries[1]["mask"]))
  with pytest.raises(FileNotFoundError, match="mask/sofa/0001.png"):
    data.make_source(_config(root, source="pix3d", categories=None), "test")
  src = data.make_source(_config(root, source="pix3d", categories=None, skip_missing=True), "test")
  assert len(src) == 2 and len(src.skipped) == 1
  with pytest.raises(DataError, match="missing pix3d annotation file"):
    data.make_source(_config(str(tmp_path / "img"), source="pix3d", categories=None), "test")


def _psgn_root():
  root = os.path.join(SHARED, "psgn-shapenet")
  if not os.path.isfile(os.path.join(root, "batch_15.zlib")):
    pytest.skip(f"PSGN batches not found at {root}")
  return root


def test_psgn_real_batch():
  src = data.make_source(_config(_psgn_root(), source="psgn", image_size=256, n_dense=16384, n_mid=256,
                                 n_sparse=64), "val")
  assert len(src) == 32
  cats = []
  for i in (0, 7, 31):
    ex = src[i]
    dense = ex["points_dense"]
    assert dense.shape == (16384, 3) and np.isfinite(dense).all()
    assert ex["points_mid"].shape == (256, 3) and ex["points_sparse"].shape == (64, 3)
    np.testing.assert_array_equal(ex["points_sparse"], ex["points_mid"][:64])
    assert (np.abs(dense[None, :, :] - ex["points_sparse"][:, None, :]).sum(-1).min(1) == 0).all()
    # Sane scale: objects about unit size, centred in y/z; unit-cube normalisation puts them in [-.5,.5]^3.
    extent = dense.max(0) - dense.min(0)
    assert 0.5 < extent.max() < 2.5 and np.all(np.abs(dense.mean(0)[1:]) < 0.5)
    unit = (dense - (dense.max(0) + dense.min(0)) / 2) / extent.max()
    assert np.isclose(np.abs(unit).max(), 0.5)
    img = ex["image"]
    assert img.shape == (256, 256, 3) and (img[:32] == 0).all() and (img[-32:] == 0).all()
    assert img[32:-32].max() > 0.2
    cats.append(int(ex["category"]))
  assert all(-1 <= c < 13 for c in cats)
  assert any(c >= 0 for c in (int(src[i]["category"]) for i in range(32)))  # some ids are in the R2N2 lists
  # Fewer dense points (the CPU config): an FPS subset of the file's cloud that extends the sparse subset.
  small = data.make_source(_config(_psgn_root(), source="psgn", image_size=128, n_dense=1024, n_mid=256,
                                   n_sparse=64), "val")[7]
  full = src[7]
  assert small["points_dense"].shape == (1024, 3)
  np.testing.assert_array_equal(small["points_sparse"], full["points_sparse"])
  np.testing.assert_array_equal(small["points_dense"][:256], full["points_mid"])
  to_full, _, _, _ = xla_ops.nn_distance(jnp.asarray(small["points_dense"]), jnp.asarray(full["points_dense"]))
  assert (np.asarray(to_full) == 0).all()  # every subset point is a point of the file's cloud


def test_psgn_bad_files(tmp_path):
  good = zlib.compress(b"\0" * 100)
  (tmp_path / "batch_00.zlib").write_bytes(good)
  (tmp_path / "batch_01.zlib").write_bytes(b"not zlib at all")
  (tmp_path / "batch_15.zlib").write_bytes(good)
  with pytest.raises(DataError, match=r"batch_00\.zlib is truncated"):
    psgn.decode_batch(str(tmp_path / "batch_00.zlib"))
  src = data.make_source(_config(str(tmp_path), source="psgn", n_dense=16384), "train")
  with pytest.raises(DataError, match=r"batch_01\.zlib is not a valid zlib stream"):
    src[40]
  with pytest.raises(DataError, match="no usable|no train batch"):
    data.make_source(_config(str(tmp_path), source="psgn", n_dense=16384, skip_missing=True), "train")
  with pytest.raises(ValueError, match=r"n_dense must be in \[1, 16384\]"):
    data.make_source(_config(str(tmp_path), source="psgn", n_dense=16385), "train")


def test_generated_mini_pix3d_loads_end_to_end(tmp_path):
  n = generate.write_mini_pix3d(str(tmp_path), 10, seed=0, models_per_category=1, occluded_fraction=0.3)
  entries = json.load(open(tmp_path / "pix3d.json"))
  assert n == len(entries) == 10 and {e["category"] for e in entries} <= {"chair", "sofa", "table"}
  src = data.make_source(_config(str(tmp_path), source="pix3d", categories=None, image_size=64, pix3d_pad=16), "test")
  assert len(src) == sum(not e["occluded"] for e in entries) > 0
  ex = src[0]
  assert ex["image"].shape == (64, 64, 3) and ex["points_dense"].shape == (N_DENSE, 3)
  ys, xs = np.nonzero(ex["image"].max(-1) > 0)
  assert max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 in (47, 48)
