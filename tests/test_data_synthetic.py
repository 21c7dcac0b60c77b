"""Synthetic generator and renderers (dpcr_jax.synth), and the camera maths and samplers they share with the
loaders (dpcr_jax.data)."""
import json
import os

import h5py
import numpy as np
from PIL import Image
import pytest

from dpcr_jax.data import camera
from dpcr_jax.data import categories
from dpcr_jax.data import sampling
from dpcr_jax.synth import generate
from dpcr_jax.synth import render
from dpcr_jax.synth import shapes

SIZE, N_DENSE, N_MID, N_SPARSE = 96, 2048, 512, 128


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synth"))
  summary = generate.generate_synthetic(root, 3, seed=7, image_size=SIZE, n_dense=N_DENSE, n_mid=N_MID,
                                         n_sparse=N_SPARSE, workers=1, r2n2_views=2, progress=False)
  return root, summary


def _h5(root, split, folder, syn, name):
  with h5py.File(os.path.join(root, "attdpcr", split, folder, f"{syn}.h5"), "r") as f:
    return f[name][:]


def test_layout_and_summary(synth):
  root, summary = synth
  assert summary["models"] == 39 and summary["train_models"] == 26 and summary["test_models"] == 13
  assert summary["images"] == 39 * (12 + 2)
  for syn in categories.SYNSETS:
    images = _h5(root, "train", f"image_{SIZE}_{SIZE}_12", syn, "image")
    assert images.shape == (24, SIZE, SIZE, 3) and images.dtype == np.uint8
    for n in (N_DENSE, N_MID, N_SPARSE):
      pts = _h5(root, "test", f"point_{n}_12", syn, "point")
      assert pts.shape == (12, n, 3) and pts.dtype == np.float32
  meta = camera.read_rendering_metadata(os.path.join(root, "attdpcr", "rendering_metadata.txt"))
  np.testing.assert_array_equal(meta[:, 0], camera.ATTDPCR_AZIMUTHS)


def test_split_rule_sorted_80_20(synth):
  root, _ = synth
  train = json.load(open(os.path.join(root, "splits", "train_models.json")))
  val = json.load(open(os.path.join(root, "splits", "val_models.json")))
  for syn in categories.SYNSETS:
    ids = sorted(os.listdir(os.path.join(root, "ShapeNetCore.v1", syn)))
    expect_train, expect_val = categories.split_models(ids)
    assert train[syn] == [f"{syn}/{m}" for m in expect_train]
    assert val[syn] == [f"{syn}/{m}" for m in expect_val]
    assert len(expect_train) == 2 and max(expect_train) < min(expect_val)


def test_gt_points_project_into_silhouette_every_category(synth):
  """Proves the camera maths: camera-frame GT projected with F = 284 * S / 256 lands on the rendered object."""
  root, _ = synth
  focal = camera.attdpcr_focal(SIZE)
  for syn in categories.SYNSETS:
    images = _h5(root, "train", f"image_{SIZE}_{SIZE}_12", syn, "image")
    points = _h5(root, "train", f"point_{N_DENSE}_12", syn, "point")
    for row in (0, 5, 13, 22):
      mask = images[row].max(-1) > 0
      rc = np.floor(camera.project(points[row], focal, SIZE, SIZE)).astype(int)
      inside = (rc >= 0).all(1) & (rc < SIZE).all(1)
      hit = np.zeros(len(rc), bool)
      hit[inside] = mask[rc[inside, 0], rc[inside, 1]]
      assert hit.mean() >= 0.95, (syn, row, hit.mean())
      # Object centre near (0, 0, -0.8): the camera distance.
      assert abs(points[row][:, 2].mean() + 0.8) < 0.15


def test_r2n2_views_and_canonical_points_agree(synth):
  """R2N2 metadata (D = 1.75 ratio, F = 137 * 35 / 32) maps the canonical point cloud onto the PNG alpha."""
  root, _ = synth
  for syn in categories.SYNSETS[::3]:
    mid = sorted(os.listdir(os.path.join(root, "ShapeNetRendering", syn)))[0]
    folder = os.path.join(root, "ShapeNetRendering", syn, mid, "rendering")
    meta = camera.read_rendering_metadata(os.path.join(folder, "rendering_metadata.txt"))
    assert meta.shape == (2, 5) and (meta[:, 1] >= 25).all() and (meta[:, 1] <= 30).all()
    assert open(os.path.join(folder, "renderings.txt")).read().split() == ["00.png", "01.png"]
    pts = np.load(os.path.join(root, "ShapeNet_pointclouds", syn, mid, "pointcloud_2048.npy"))
    for v in range(2):
      rgba = np.asarray(Image.open(os.path.join(folder, f"{v:02d}.png")))
      assert rgba.shape == (137, 137, 4)
      az, el, _, ratio, _ = meta[v]
      rot, pos = camera.camera_info(az, el, ratio * camera.R2N2_MAX_CAMERA_DIST)
      rc = np.floor(camera.project(camera.world_to_camera(pts, rot, pos), 137 * 35 / 32, 137, 137)).astype(int)
      rc = np.clip(rc, 0, 136)
      assert (rgba[rc[:, 0], rc[:, 1], 3] > 0).mean() >= 0.95


def test_pointcloud_files_are_fps_prefixes(synth):
  root, _ = synth
  syn = categories.SYNSETS[4]
  mid = sorted(os.listdir(os.path.join(root, "ShapeNet_pointclouds", syn)))[0]
  folder = os.path.join(root, "ShapeNet_pointclouds", syn, mid)
  dense = np.load(os.path.join(folder, f"pointcloud_{N_DENSE}.npy"))
  mid_pts = np.load(os.path.join(folder, f"pointcloud_{N_MID}.npy"))
  sparse = np.load(os.path.join(folder, f"pointcloud_{N_SPARSE}.npy"))
  np.testing.assert_array_equal(sparse, mid_pts[:N_SPARSE])
  np.testing.assert_array_equal(mid_pts, dense[sampling.farthest_point_indices_numpy(dense, N_MID)])
  # Diagonal-1 normalisation of the canonical frame.
  extent = np.linalg.norm(dense.max(0) - dense.min(0))
  assert 0.9 < extent <= 1.0 + 1e-5


def test_generator_deterministic_and_independent_of_workers(tmp_path):
  kw = dict(seed=3, image_size=32, n_dense=256, n_mid=64, n_sparse=16, categories=["chair"], r2n2_views=1, fps="numpy",
            progress=False)
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  generate.generate_synthetic(a, 2, workers=1, **kw)
  generate.generate_synthetic(b, 2, workers=2, **kw)
  for folder, name in (("image_32_32_12", "image"), ("point_256_12", "point"), ("point_16_12", "point")):
    np.testing.assert_array_equal(_h5(a, "train", folder, "03001627", name), _h5(b, "train", folder, "03001627", name))


def test_make_data_cli(tmp_path, capsys):
  from experiments import make_data  # pylint: disable=g-import-not-at-top
  make_data.main(["--root", str(tmp_path), "--models_per_category", "2", "--image_size", "32", "--n_dense", "128",
                  "--n_mid", "64", "--n_sparse", "32", "--categories", "lamp", "--r2n2_views", "0"])
  out = json.loads(capsys.readouterr().out)
  assert out["models"] == 2 and out["models_per_s"] > 0
  assert os.path.isfile(tmp_path / "attdpcr" / "test" / "point_32_12" / "03636649.h5")
  assert not os.path.exists(tmp_path / "ShapeNetRendering")


def test_shapes_vary_within_category_and_are_normalised():
  for name in categories.NAMES:
    a = shapes.make_shape(name, np.random.default_rng(0))
    b = shapes.make_shape(name, np.random.default_rng(1))
    for v, f in (a, b):
      assert np.isclose(np.linalg.norm(v.max(0) - v.min(0)), 1.0)
      np.testing.assert_allclose((v.max(0) + v.min(0)) / 2, 0, atol=1e-9)
      assert f.min() >= 0 and f.max() < len(v)
    ext_a, ext_b = a[0].max(0) - a[0].min(0), b[0].max(0) - b[0].min(0)
    assert len(a[1]) != len(b[1]) or not np.allclose(ext_a, ext_b, atol=1e-3), name


def test_camera_info_frame():
  rot, pos = camera.camera_info(30, 27, 0.8)
  np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-12)
  np.testing.assert_allclose(np.linalg.det(rot), 1.0)
  np.testing.assert_allclose(camera.world_to_camera(np.zeros((1, 3)), rot, pos), [[0, 0, -0.8]], atol=1e-12)
  assert rot[0, 1] == 0  # camera x axis horizontal (up = +Y)
  # A point above the origin appears above the image centre.
  rc = camera.project(camera.world_to_camera(np.array([[0, 0.1, 0]]), rot, pos), 284, 256, 256)
  assert rc[0, 0] < 128 and abs(rc[0, 1] - 128) < 1e-9


def test_rendering_metadata_parser(tmp_path):
  path = tmp_path / "rendering_metadata.txt"
  path.write_text("30 27 0 0.8 25\n45.5 26.1 0 0.71 25\n")
  np.testing.assert_allclose(camera.read_rendering_metadata(path)[1], [45.5, 26.1, 0, 0.71, 25])
  path.write_text("30 27 0 0.8\n")
  with pytest.raises(ValueError, match="expected 5"):
    camera.read_rendering_metadata(path)


def test_samplers():
  rng = np.random.default_rng(0)
  v, f = shapes.make_shape("table", rng)
  det = sampling.sample_surface(v, f, 1000, np.random.default_rng(1), "deterministic")
  iid = sampling.sample_surface(v, f, 1000, np.random.default_rng(1), "iid")
  assert det.shape == iid.shape == (1000, 3) and det.dtype == np.float32
  lo, hi = v.min(0) - 1e-6, v.max(0) + 1e-6
  assert ((det >= lo) & (det <= hi)).all() and ((iid >= lo) & (iid <= hi)).all()
  # Deterministic counts: per-face counts follow the rounded cumulative areas exactly.
  areas = sampling.face_areas(v, f)
  counts = np.diff(np.round(np.cumsum(areas) / areas.sum() * 1000).astype(int), prepend=0)
  assert counts.sum() == 1000 and (np.abs(counts - areas / areas.sum() * 1000) <= 1.0 + 1e-9).all()
  with pytest.raises(ValueError, match="method"):
    sampling.sample_surface(v, f, 10, rng, "poisson")


def test_fps_prefix_and_rigid_invariance():
  pts = np.random.default_rng(0).normal(size=(2000, 3))
  idx = sampling.farthest_point_indices_numpy(pts, 256)
  np.testing.assert_array_equal(sampling.farthest_point_indices_numpy(pts, 64), idx[:64])
  rot, pos = camera.camera_info(135, 27, 0.8)
  moved = camera.world_to_camera(pts * 0.57, rot, pos)
  np.testing.assert_array_equal(sampling.farthest_point_indices_numpy(moved, 256), idx)
  np.testing.assert_array_equal(sampling.farthest_point_indices(pts.astype(np.float32), 64), idx[:64])
  # Farthest property: each chosen point maximises the distance to those chosen before it.
  d = np.linalg.norm(pts[:, None] - pts[idx[:10]][None], axis=-1)
  for k in range(1, 10):
    assert np.isclose(d[:, :k].min(1).max(), d[idx[k], :k].min())


def _egl_renderer():
  try:
    return render.ModernGLRenderer(samples=0)
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"moderngl/EGL unavailable: {type(e).__name__}: {e}")


def test_moderngl_and_numpy_silhouettes_agree():
  gl = _egl_renderer()
  for k, name in enumerate(categories.NAMES):
    v, f = shapes.make_shape(name, np.random.default_rng(k))
    v = v * camera.ATTDPCR_SCALE
    rot, pos = camera.camera_info(camera.ATTDPCR_AZIMUTHS[k % 12], 27, 0.8)
    a = gl.render(v, f, rot, pos, 284 * 128 / 256, 128, 128)
    b = render.render_numpy(v, f, rot, pos, 284 * 128 / 256, 128, 128)
    ma, mb = a[..., 3] > 0, b[..., 3] > 0
    assert (ma & mb).sum() / (ma | mb).sum() >= 0.99, name
    # Same flat shading where both cover the pixel (a few edge pixels can pick different faces).
    both = ma & mb
    assert np.mean(np.abs(a[both, 0].astype(int) - b[both, 0]) <= 2) > 0.97, name


def test_renderer_fallback_and_numpy_backend():
  r = render.Renderer("numpy")
  assert r.backend == "numpy"
  v, f = shapes.make_shape("chair", np.random.default_rng(0))
  rot, pos = camera.camera_info(45, 27, 0.8)
  img = r.render(v * 0.57, f, rot, pos, 142, 128, 128)
  assert img.shape == (128, 128, 4) and img.dtype == np.uint8
  assert (img[img[..., 3] == 0, :3] == 0).all()  # black background
  with pytest.raises(ValueError, match="backend"):
    render.Renderer("vulkan")


def test_renderer_auto_falls_back_with_one_warning(monkeypatch, caplog):
  def no_egl(**_):
    raise RuntimeError("eglGetDisplay failed\nmore details")

  monkeypatch.setattr(render, "ModernGLRenderer", no_egl)
  with caplog.at_level("WARNING"):
    r = render.Renderer("auto")
  assert r.backend == "numpy"
  warnings = [rec.getMessage() for rec in caplog.records]
  assert len(warnings) == 1 and "numpy rasteriser" in warnings[0] and "\n" not in warnings[0]
  with pytest.raises(RuntimeError, match="eglGetDisplay"):
    render.Renderer("moderngl")
