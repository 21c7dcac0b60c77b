"""Frames and cameras (dpcr_jax.viewpoints): the projected ground truth lands on the input image's object."""
import os

import ml_collections
import numpy as np
import pytest

from dpcr_jax import viewpoints, visualize
from dpcr_jax.data import pipeline, psgn
from dpcr_jax.synth import generate_synthetic

PSGN_ROOT = os.path.join(pipeline.SHARED_DATA, "psgn-shapenet")
SIZE = 64


def _iou(a: np.ndarray, b: np.ndarray) -> float:
  return float((a & b).sum() / max((a | b).sum(), 1))


def _inside(points, camera, mask) -> float:
  """Fraction of points projecting onto the object mask."""
  rc, depth = camera.project(points)
  rc = np.floor(rc).astype(int)
  ok = (depth > 0) & (rc >= 0).all(1) & (rc[:, 0] < mask.shape[0]) & (rc[:, 1] < mask.shape[1])
  hit = np.zeros(len(points), bool)
  hit[ok] = mask[rc[ok, 0], rc[ok, 1]]
  return float(hit.mean())


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
  """A tiny synthetic dataset, rendered with the numpy rasteriser (the renderers' test oracle), so that
  this file tests the cameras, not the GL renderer."""
  root = str(tmp_path_factory.mktemp("synth_views"))
  generate_synthetic(root, 2, seed=3, image_size=SIZE, n_dense=1024, n_mid=256, n_sparse=64,
                     workers=1, r2n2_views=2, categories=["chair", "airplane"], progress=False, renderer="numpy")
  return root


def _data_config(source, root, **kw):
  config = pipeline.default_data_config()
  config.source, config.root, config.image_size = source, root, SIZE
  config.n_dense, config.n_mid, config.n_sparse = 1024, 256, 64
  config.categories = ["chair", "airplane"]
  config.update(kw)
  return config


@pytest.mark.parametrize("source,extra", [("attdpcr_h5", {}), ("r2n2", {"r2n2_frame": "view"}),
                                          ("r2n2", {"r2n2_frame": "canonical"})])
def test_synthetic_gt_projects_onto_the_input_object(synth, source, extra):
  """Each frame's input camera maps its GT onto the rendered object (IoU of the splatted silhouette)."""
  config = _data_config(source, synth, **extra)
  frame = viewpoints.cloud_frame(config)
  src = pipeline.make_source(config, "train")
  ious = []
  for i in range(0, len(src), max(1, len(src) // 6)):
    ex = src[i]
    cam = frame.input_camera(SIZE, ex)
    assert cam is not None and cam.size == (SIZE, SIZE)
    mask = ex["image"].max(-1) > 0.02
    assert _inside(ex["points_dense"], cam, mask) > 0.9
    ious.append(_iou(visualize.splat_mask(ex["points_dense"], cam, radius=1.0), mask))
  assert np.median(ious) > 0.7, ious


@pytest.mark.skipif(not os.path.isdir(PSGN_ROOT), reason=f"real PSGN data not found at {PSGN_ROOT}")
@pytest.mark.parametrize("batch", ["00", "15"])
def test_psgn_gt_projects_onto_the_depth_mask(batch):
  """The fitted PSGN camera (fitted on batch 15) puts the GT on the depth>0 mask of the padded 256 image;
  the old picture convention (the points read as camera-frame x right, y up) does not."""
  raw = psgn.decode_batch(os.path.join(PSGN_ROOT, f"batch_{batch}.zlib"))
  points = psgn.dequantize_points(raw["ptcloud"], raw["rotmat"])
  cam = viewpoints.psgn_frame().input_camera(256)
  wrong = viewpoints.attdpcr_frame().input_camera(256)
  ious, inside, wrong_ious = [], [], []
  for i in range(psgn.BATCH):
    mask = np.zeros((256, 256), bool)
    mask[32:224] = raw["depth"][i] > 0
    ious.append(_iou(visualize.splat_mask(points[i], cam, radius=1.5), mask))
    inside.append(_inside(points[i], cam, mask))
    shifted = points[i] - points[i].mean(0) + [0, 0, -2.5]  # give the wrong camera its best chance: centred
    wrong_ious.append(_iou(visualize.splat_mask(shifted, wrong, radius=1.5), mask))
  # Thin objects (poles, spears, wire frames) get low IoU from 3-px splats; the median and the share of
  # points on the mask are the robust measures.
  assert np.median(ious) > 0.8 and np.median(inside) > 0.9, (np.median(ious), np.median(inside))
  assert np.median(wrong_ious) < 0.5


def test_psgn_loader_image_and_camera_agree_at_any_size():
  """The camera follows the loader's padding and resizing: scaling the camera = resizing the image."""
  cam256 = viewpoints.psgn_camera(256)
  cam128 = viewpoints.psgn_camera(128)
  pts = np.random.default_rng(0).normal(scale=0.3, size=(50, 3)) + [0.7, 0, 0]
  np.testing.assert_allclose(cam128.project(pts)[0], cam256.project(pts)[0] / 2, rtol=1e-9, atol=1e-9)
  # The point c = 0 (the look-at point of the render) lands on the fitted principal point of the padded image.
  origin = np.array([[1.0, 0, 0]])
  np.testing.assert_allclose(cam256.project(origin)[0][0], [viewpoints.PSGN_PRINCIPAL_192x256[0] + 32,
                                                           viewpoints.PSGN_PRINCIPAL_192x256[1]])


def test_fixed_views_are_rotations_that_look_where_they_say():
  for frame in (viewpoints.attdpcr_frame(), viewpoints.psgn_frame(),
                viewpoints.canonical_frame("test"), viewpoints.r2n2_view_frame()):
    up, fwd = frame.up / np.linalg.norm(frame.up), frame.forward
    assert abs(np.dot(up, fwd)) < 1e-9  # forward is horizontal
    for view in viewpoints.FIXED_VIEWS:
      r = frame.view_rotation(view)
      np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-9)
      assert np.linalg.det(r) == pytest.approx(1.0)
    np.testing.assert_allclose(frame.view_rotation("front")[1], up, atol=1e-9)   # up is up on screen
    np.testing.assert_allclose(frame.view_rotation("front")[2], -fwd, atol=1e-9)  # looks along forward
    np.testing.assert_allclose(frame.view_rotation("top")[2], up, atol=1e-9)      # looks down
  # Canonical frame: the front view looks at the object from +X, the top view from +Y.
  canon = viewpoints.canonical_frame("c")
  np.testing.assert_allclose(canon.view_rotation("front")[2], [1, 0, 0], atol=1e-9)
  # PSGN: the front view is the input view without its 20-degree elevation.
  cam = viewpoints.psgn_camera()
  angle = np.degrees(np.arccos(np.clip(np.dot(-cam.rotation[2], viewpoints.psgn_frame().forward), -1, 1)))
  assert angle == pytest.approx(viewpoints.PSGN_ELEVATION_DEG, abs=1e-6)
  with pytest.raises(ValueError, match="view must be"):
    canon.view_rotation("bottom")
  with pytest.raises(ValueError, match="input camera"):
    canon.view_rotation("input")


def test_cloud_frame_per_source_and_errors():
  c = ml_collections.ConfigDict({"source": "pix3d", "root": ""})
  assert viewpoints.cloud_frame(c).input_camera(64) is None  # unknown: pictures fall back to a fixed view
  unknown = viewpoints.cloud_frame(ml_collections.ConfigDict({"source": "nope"}))
  assert unknown.input_camera(64) is None and "unknown" in unknown.name
  with pytest.raises(ValueError, match="aspect ratio"):
    viewpoints.psgn_camera().scaled(10, 20)
