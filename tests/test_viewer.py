"""The interactive HTML viewer (dpcr_jax.viewer) and the example pictures (visualize.example_pictures)."""
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np
from PIL import Image
import pytest

from dpcr_jax import viewer, viewpoints, visualize

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                None)


def _examples(n=3, seed=0):
  rng = np.random.default_rng(seed)
  frame = viewpoints.attdpcr_frame()
  out = []
  for i in range(n):
    gt = rng.normal(scale=0.1, size=(300 + i, 3)).astype(np.float32) + [0, 0, -0.8]
    out.append({"name": f"ex<{i}>", "image": rng.random((32, 32, 3)).astype(np.float32),
                "clouds": {"sparse": gt[:50], "dense": gt + 0.01, "ground truth": gt},
                "camera": frame.input_camera(32) if i else None})
  return frame, out


def test_viewer_file_holds_every_point_and_no_external_resource(tmp_path):
  frame, examples = _examples()
  path = viewer.write_viewer(str(tmp_path / "v.html"), examples, frame, title="t")
  page = open(path, encoding="utf-8").read()
  # Self-contained: no script/style/image fetched from anywhere.
  assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", page)
  assert "http://" not in page and "https://" not in page
  data = viewer.read_viewer_data(path)
  assert data["frame"] == frame.name and len(data["examples"]) == 3
  for ex, got in zip(examples, data["examples"]):
    assert got["name"] == ex["name"]  # '<' survived the JSON-in-HTML escaping
    assert set(got["clouds"]) == {"sparse", "dense", "ground truth"}
    for k, v in ex["clouds"].items():
      np.testing.assert_array_equal(got["clouds"][k], np.asarray(v, np.float32))
    assert got["image"].startswith("data:image/png;base64,")
  assert data["examples"][0]["input_rotation"] is None
  np.testing.assert_allclose(np.reshape(data["examples"][1]["input_rotation"], (3, 3)), np.eye(3))
  for v in viewpoints.FIXED_VIEWS:
    np.testing.assert_allclose(np.reshape(data["views"][v], (3, 3)), frame.view_rotation(v))


def test_viewer_caps_examples_and_rejects_bad_clouds(tmp_path):
  frame, examples = _examples(5)
  data = viewer.read_viewer_data(viewer.write_viewer(str(tmp_path / "v.html"), examples, frame, max_examples=2))
  assert len(data["examples"]) == 2 and data["total_examples"] == 5
  with pytest.raises(ValueError, match=r"\[N, 3\]"):
    viewer.write_viewer(str(tmp_path / "b.html"), [{"clouds": {"dense": np.zeros((4, 2))}}])
  with pytest.raises(ValueError, match="finite"):
    viewer.write_viewer(str(tmp_path / "b.html"), [{"clouds": {"dense": np.full((4, 3), np.nan)}}])
  with pytest.raises(ValueError, match="at least one"):
    viewer.write_viewer(str(tmp_path / "b.html"), [])


def _chromium(args, url):
  with tempfile.TemporaryDirectory() as profile:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           f"--user-data-dir={profile}", *args, url], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_viewer_renders_in_headless_chromium(tmp_path):
  """The page's script runs: it decodes the clouds, draws them (it records how many points reached the
  canvas on <body>), honours #ex=..&view=.., and the screenshot has coloured points on the canvas."""
  frame, examples = _examples()
  path = viewer.write_viewer(str(tmp_path / "v.html"), examples, frame)
  dom = _chromium(["--dump-dom"], f"file://{path}#ex=1&view=top").stdout
  body = re.search(r"<body([^>]*)>", dom)
  assert body, dom[:500]
  attrs = dict(re.findall(r'data-([\w-]+)="([^"]*)"', body.group(1)))
  assert attrs.get("example") == "1" and attrs.get("view") == "top", attrs
  total = sum(len(c) for c in examples[1]["clouds"].values())
  assert 0.5 * total < int(attrs["drawn-points"]) <= total
  shot = tmp_path / "shot.png"
  _chromium(["--window-size=1000,720", f"--screenshot={shot}"], f"file://{path}")
  pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
  canvas = pixels[40:680, 10:650]
  coloured = (np.abs(canvas - canvas.mean(-1, keepdims=True)).max(-1) > 40).mean()
  assert coloured > 0.005, coloured  # saturated (point-coloured) pixels, not a blank or grey canvas


def test_example_pictures_write_grid_views_and_viewer(tmp_path):
  frame, examples = _examples(2)
  flat = [{"image": e["image"], **e["clouds"]} for e in examples]
  paths = visualize.example_pictures(flat, frame, 32, str(tmp_path / "q"), names=["a", "b"], cell=64)
  grid = np.asarray(Image.open(paths["png"]))
  # input | dense on input | sparse | dense | ground truth, 64 px each.
  assert grid.shape[1] == 90 + 5 * 64 and grid.shape[0] == 20 + 2 * 64
  views = np.asarray(Image.open(paths["views_png"]))
  assert views.shape[1] == 90 + (1 + 2 * 3) * 64  # input + (dense, GT) x (front, side, top)
  assert len(viewer.read_viewer_data(paths["html"])["examples"]) == 2
  assert os.path.getsize(paths["html"]) > 1000


def test_input_camera_render_is_pixel_aligned_with_the_input():
  """A cloud drawn from the input camera covers the same pixels as its own projection (the overlay)."""
  frame = viewpoints.attdpcr_frame()
  cam = frame.input_camera(64)
  rng = np.random.default_rng(1)
  pts = rng.uniform(-0.1, 0.1, size=(2000, 3)) + [0.1, 0.05, -0.8]   # off-centre: not refitted to the tile
  image = visualize.render_points(pts, 64, radius=1, camera=cam)
  drawn = (image < 255).any(-1)
  sil = visualize.splat_mask(pts, cam, radius=1.5)
  assert (drawn & sil).sum() / drawn.sum() > 0.95
  rows, cols = np.nonzero(drawn)
  assert cols.mean() > 36 and rows.mean() < 30  # right of and above the centre, where x > 0 and y > 0 put it


def test_predict_files_writes_pictures_and_viewer(tmp_path):
  """predict_files on a stand-in run: per-image PNG, the set's pictures and a viewer holding its clouds."""
  import standins  # pylint: disable=g-import-not-at-top
  from dpcr_jax import predict  # pylint: disable=g-import-not-at-top
  config = standins.tiny_config("finetune", str(tmp_path))
  config.num_train_steps, config.checkpoint_every = 2, 2
  run = str(tmp_path / "run")
  standins.run_training(config, run)
  folder = tmp_path / "images"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for name in ("a", "b", "c"):
    Image.fromarray(rng.integers(0, 255, size=(16, 12, 3), dtype=np.uint8)).save(folder / f"{name}.png")
  out = tmp_path / "out"
  predictor = predict.Predictor(run, stage=standins.stage("finetune"))
  written = predict.predict_files(predictor, predict.expand_paths(str(folder)), str(out), batch_size=2)
  for name in ("pictures.png", "pictures_views.png", "viewer.html"):
    assert (out / name).stat().st_size > 500, name
  input_camera = viewpoints.cloud_frame(config.data).input_camera(standins.IMAGE_SIZE)
  data = viewer.read_viewer_data(str(out / "viewer.html"))
  assert [e["name"] for e in data["examples"]] == ["a.png", "b.png", "c.png"]
  for ex, w in zip(data["examples"], written):
    np.testing.assert_array_equal(ex["clouds"]["dense"], np.load(w["npy"]))
    # tiny_config reads an AttentionDPCR-format source, whose clouds are in the input camera's frame
    np.testing.assert_allclose(ex["input_rotation"], np.reshape(input_camera.rotation, -1))


def test_render_from_a_camera_copes_with_points_off_the_image_or_behind_it():
  cam = viewpoints.attdpcr_frame().input_camera(32)
  for pts in (np.array([[5.0, 5.0, -0.8]]), np.array([[0.0, 0.0, 1.0]]), np.zeros((0, 3))):
    image = visualize.render_points(pts, 32, radius=1, camera=cam)
    assert (image == 255).all()


def test_evaluation_pictures_of_the_first_batch(tmp_path):
  """experiments.evaluate's pictures: the run's config picks the frame (here the AttentionDPCR camera)."""
  import json  # pylint: disable=g-import-not-at-top
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text(json.dumps({"stage": "finetune", "model": {"image_size": 32},
                                               "data": {"source": "attdpcr_h5", "root": str(tmp_path)}}))
  _, examples = _examples(3)
  batch = {"image": np.stack([e["image"] for e in examples]),
           "gt": np.stack([e["clouds"]["ground truth"][:300] for e in examples]).astype(np.float32),
           "dense": np.stack([e["clouds"]["dense"][:300] for e in examples])}
  paths = visualize.evaluation_pictures(batch, str(run), str(tmp_path / "results"), max_examples=2)
  data = viewer.read_viewer_data(paths["html"])
  assert len(data["examples"]) == 2 and data["frame"] == viewpoints.attdpcr_frame().name
  np.testing.assert_allclose(np.reshape(data["examples"][0]["input_rotation"], (3, 3)), np.eye(3))
  np.testing.assert_array_equal(data["examples"][1]["clouds"]["ground truth"], batch["gt"][1])
  assert os.path.getsize(paths["png"]) > 500 and os.path.getsize(paths["views_png"]) > 500
