"""Inputs that used to be guessed at or crash a whole job: image decoding, output names, bad files in a folder,
non-finite predictions and metrics, oversized EMD requests, config and data options (docs/guarantees.md)."""
import functools
import importlib.util
import os
import re
import sys

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
from PIL import Image
import pytest

from dpcr_jax import evaluation, images, predict
from dpcr_jax.data import default_data_config, pipeline
from dpcr_jax.data.common import DataError
from xla_ops._ffi import registered_platforms

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------------------
# Image decoding.


def test_rgba_is_composited_over_black(tmp_path):
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[..., :3] = 255  # white everywhere ...
  rgba[1:3, 1:3, 3] = 255  # ... but only the centre is opaque
  rgba[0, 0, 3] = 128
  Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
  out = images.read_rgb(str(tmp_path / "a.png"))
  assert out.shape == (4, 4, 3) and out.dtype == np.float32
  np.testing.assert_array_equal(out[1:3, 1:3], 1.0)
  assert out[3, 3].max() == 0.0  # transparent white reads as black, not white
  np.testing.assert_allclose(out[0, 0], 128 / 255, atol=1 / 255)
  palette = Image.new("P", (3, 3), 0)  # a palette image whose colour 0 is transparent
  palette.putpalette([255, 255, 255] * 256)
  palette.info["transparency"] = 0
  palette.save(tmp_path / "p.png", transparency=0)
  assert images.read_rgb(str(tmp_path / "p.png")).max() == 0.0


def test_16_bit_grey_is_scaled_not_saturated(tmp_path):
  grey = np.array([[0, 1000], [32768, 65535]], np.uint16)
  Image.fromarray(grey).save(tmp_path / "g.png")
  out = images.read_rgb(str(tmp_path / "g.png"))
  np.testing.assert_allclose(out[..., 0], grey / 65535.0, rtol=1e-6)
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  Image.fromarray(np.ones((2, 2), np.float32)).save(tmp_path / "f.tiff")
  with pytest.raises(images.ImageError, match=r"f\.tiff: floating-point image"):
    images.read_rgb(str(tmp_path / "f.tiff"))


def test_undecodable_images_name_the_file(tmp_path):
  Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "t.jpg", quality=95)
  data = (tmp_path / "t.jpg").read_bytes()
  (tmp_path / "t.jpg").write_bytes(data[:len(data) // 2])
  (tmp_path / "n.png").write_text("not an image")
  for name in ("t.jpg", "n.png"):
    with pytest.raises(images.ImageError, match=rf"{name}: cannot decode"):
      images.load_image(str(tmp_path / name), 8)


def test_output_stems_are_distinct():
  assert images.output_stems(["d/a.png", "d/b.jpg"]) == ["a", "b"]
  assert images.output_stems(["d/a/x.png", "d/b/x.png", "d/y.png"]) == ["a__x_png", "b__x_png", "y"]
  assert images.output_stems(["d/x.png", "d/x.jpg", "d/x_png.png"]) == ["x_png", "x_jpg", "x_png-2"]


# ----------------------------------------------------------------------------------------------------------
# predict_files: bad files skipped and reported, same stems, batch size, non-finite outputs.


class _FakePredictor:
  """Maps an image to a cloud of its mean colour; an image whose first pixel is pure red predicts NaN."""
  image_size = 8
  run_dir = "fake-run"
  config = ml_collections.ConfigDict({"data": default_data_config()})  # the frame its pictures are drawn in

  def __call__(self, batch):
    means = batch.mean(axis=(1, 2, 3))
    dense = np.repeat(means[:, None, None], 32, axis=1) * np.ones((1, 1, 3), np.float32)
    dense[np.all(batch[:, 0, 0] == [1, 0, 0], axis=-1)] = np.nan
    return {"sparse": dense[:, :8], "dense": dense}


def test_predict_files_skips_bad_inputs_and_keeps_every_output(tmp_path):
  rng = np.random.default_rng(0)
  for folder in ("a", "b"):
    (tmp_path / folder).mkdir()
    Image.fromarray(rng.integers(0, 200, (8, 8, 3), dtype=np.uint8)).save(tmp_path / folder / "x.png")
  (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
  red = np.zeros((8, 8, 3), np.uint8)
  red[0, 0] = [255, 0, 0]
  Image.fromarray(red).save(tmp_path / "a" / "red.png")
  paths = [str(tmp_path / p) for p in ("a/x.png", "a/broken.png", "b/x.png", "a/red.png")]
  out = str(tmp_path / "out")
  records = predict.predict_files(_FakePredictor(), paths, out, batch_size=2)
  assert [r["image"] for r in records] == paths
  assert "broken.png: cannot decode" in records[1]["error"]
  assert "red.png: non-finite sparse and dense prediction" in records[3]["error"]
  assert [os.path.basename(records[i]["npy"]) for i in (0, 2)] == ["a__x_png.npy", "b__x_png.npy"]
  assert not np.array_equal(np.load(records[0]["npy"]), np.load(records[2]["npy"]))  # neither overwrote the other
  per_image = [f"{s}__x_png.{e}" for s in "ab" for e in ("npy", "ply", "png")]
  assert sorted(os.listdir(out)) == sorted(per_image + ["pictures.png", "pictures_views.png", "viewer.html"])
  for bad in (0, -1):
    with pytest.raises(ValueError, match=r"batch_size \(--batch_size\) must be a positive int"):
      predict.predict_files(_FakePredictor(), paths, out, batch_size=bad)


# ----------------------------------------------------------------------------------------------------------
# Evaluation: NaN never disappears from an average.


def test_aggregate_reports_what_each_mean_is_over():
  records = {"cd": np.array([1.0, 2.0, 3.0, 4.0]), "emd": np.array([1.0, np.nan, 3.0, np.nan])}
  table = evaluation.aggregate(records, np.zeros(4, np.int32), ["airplane"])
  row = table["airplane"]
  assert row["count"] == 4 and row["n_cd"] == 4 and row["n_emd"] == 2 and row["emd"] == 2.0
  with pytest.raises(ValueError, match="cd has 1 infinite"):
    evaluation.aggregate({"cd": np.array([1.0, np.inf])}, np.zeros(2, np.int32), ["airplane"])


def test_evaluation_refuses_nonfinite_predictions():
  rng = np.random.default_rng(0)
  gt = rng.normal(size=(4, 64, 3)).astype(np.float32)
  batches = [{"points_dense": gt, "category": np.zeros(4, np.int32)}]

  def predict_fn(batch):
    pred = batch["points_dense"].copy()
    pred[2, 5] = np.nan
    return {"dense": pred}
  with pytest.raises(evaluation.NonFiniteOutputError, match=r"model: non-finite predicted points for 1 example.*example 2"):
    evaluation.evaluate_predictions(predict_fn, batches, 4, ["airplane"], impl="jnp")
  result = evaluation.evaluate_predictions(lambda b: {"dense": b["points_dense"] + 0.01}, batches, 4, ["airplane"],
                                           impl="jnp", emd_examples_per_category=1)
  assert result["tables"]["model"]["airplane"]["n_emd"] == 1 and result["tables"]["model"]["airplane"]["n_cd"] == 4


# ----------------------------------------------------------------------------------------------------------
# approx_match refuses a match matrix that cannot fit (earth_mover_distance's custom call never forms it).


def test_approx_match_refuses_a_match_that_cannot_fit():
  from xla_ops.emd import approx_match, earth_mover_distance  # pylint: disable=g-import-not-at-top
  huge = jax.ShapeDtypeStruct((2, 2 ** 20, 3), jnp.float32)  # 2 x 2^20 x 2^20 float32 = 8 TiB
  for fn in (approx_match, functools.partial(earth_mover_distance, impl="jnp")):
    with pytest.raises(ValueError, match=r"approx_match: the match matrix .* m=1048576 .* n=1048576 .* "
                                         r"8,796,093,022,208 bytes"):
      jax.eval_shape(fn, huge, huge)
  assert jax.eval_shape(earth_mover_distance, huge, huge).shape == (2,)  # O(B (n + m)) memory
  small = jax.ShapeDtypeStruct((2, 128, 3), jnp.float32)
  assert jax.eval_shape(approx_match, small, small).shape == (2, 128, 128)


# ----------------------------------------------------------------------------------------------------------
# Configs and data options.


def _parse(*args):
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True)
  argv = ["prog", f"--config={args[0]}", *args[1:]]
  saved, sys.argv = sys.argv, argv  # config_flags reads the --config.* overrides from sys.argv
  try:
    values(argv)
  finally:
    sys.argv = saved
  return holder.value


def test_unknown_stage_in_the_config_path_lists_the_stages():
  with pytest.raises(Exception, match=r"unknown stage 'medium'.*expected one of sparse, dense, finetune"):
    _parse(os.path.join(_REPO, "configs", "quickstart.py") + ":medium")


def test_categories_can_be_set_from_the_command_line():
  path = os.path.join(_REPO, "configs", "quickstart.py") + ":sparse"
  assert _parse(path).data.categories is None
  assert _parse(path, "--config.data.categories=chair").data.categories == ("chair",)
  assert _parse(path, "--config.data.categories=('chair', 'table')").data.categories == ("chair", "table")


class _FlakySource:
  """Ten examples; the ones in ``bad`` fail to load as a damaged file would."""

  def __init__(self, bad):
    self.bad = bad

  def __len__(self):
    return 10

  def __getitem__(self, i):
    if i in self.bad:
      raise DataError(f"fake: unreadable image /data/{i}.png")
    return {"image": np.full((2, 2, 3), i, np.float32), "category": np.int32(i)}


def test_skip_missing_replaces_examples_that_fail_during_training(monkeypatch):
  config = pipeline.default_data_config()
  config.root, config.skip_missing = "unused", True
  monkeypatch.setattr(pipeline, "make_source", lambda config, split: _FlakySource({3, 4}))
  batches = list(pipeline.make_iterator(config, "train", 5, seed=0, shuffle=False, num_epochs=1))
  assert [list(b["category"]) for b in batches] == [[0, 1, 2, 5, 5], [5, 6, 7, 8, 9]]
  config.skip_missing = False
  with pytest.raises(DataError, match=r"/data/3\.png"):
    list(pipeline.make_iterator(config, "train", 5, seed=0, shuffle=False, num_epochs=1))


# ----------------------------------------------------------------------------------------------------------
# The C++ argument checks (xla_ops/csrc/checks.h): one function per op, shared by the CPU and CUDA handlers.
# A direct custom call (bypassing the Python wrapper's trace-time checks) with a bad argument gets
# INVALID_ARGUMENT naming the argument and what was expected, before any buffer is read. Every case runs on
# the CPU, and on the GPU too where one is visible with the CUDA extension built: same call, same message.


def _f32(*shape):
  return np.zeros(shape, np.float32)


def _i32(*shape):
  return np.zeros(shape, np.int32)


def _out(dtype, *shape):
  return jax.ShapeDtypeStruct(shape, dtype)


F32, I32 = jnp.float32, jnp.int32
# (target, operands, results, attributes, the exact message after "<target>: ")
_BAD_FFI_CALLS = [
    ("xla_ops_farthest_point_sample", (_f32(2, 8, 2),), (_out(I32, 2, 4), _out(F32, 2, 8)), dict(npoint=np.int32(4)),
     "xyz must have shape [..., N, 3], got [2, 8, 2]"),
    ("xla_ops_farthest_point_sample", (_f32(2, 8, 3),), (_out(I32, 2, 9), _out(F32, 2, 8)), dict(npoint=np.int32(9)),
     "npoint must be in [1, N=8], got 9"),
    ("xla_ops_farthest_point_sample", (_f32(2, 8, 3),), (_out(I32, 2, 4), _out(F32, 2, 7)), dict(npoint=np.int32(4)),
     "result workspace must be float32 [..., N] (16 elements), got float32 [2, 7]"),
    ("xla_ops_ball_query", (_f32(2, 8, 3), _f32(3, 4, 3)), (_out(I32, 3, 4, 2), _out(I32, 3, 4)),
     dict(radius=np.float32(0.1), nsample=np.int32(2)),
     "batch mismatch: xyz and new_xyz must have the same batch shape, got shapes [2, 8, 3] and [3, 4, 3]"),
    ("xla_ops_ball_query", (_f32(2, 8, 3), _f32(2, 4, 3)), (_out(I32, 2, 4, 2), _out(I32, 2, 4)),
     dict(radius=np.float32(np.nan), nsample=np.int32(2)), "radius must be a finite number > 0, got nan"),
    ("xla_ops_ball_query", (_f32(2, 8, 3), _f32(2, 4, 3)), (_out(I32, 2, 4, 0), _out(I32, 2, 4)),
     dict(radius=np.float32(0.1), nsample=np.int32(0)), "nsample must be >= 1, got 0"),
    ("xla_ops_group_points", (_f32(2, 8, 5), _f32(2, 4, 3)), (_out(F32, 2, 4, 3, 5),), {},
     "idx must be int32, got float32"),
    ("xla_ops_group_points_grad", (_f32(2, 4, 5, 3), _i32(2, 4, 4)), (_out(F32, 2, 8, 3),), dict(npoints=np.int32(8)),
     "grad_out must have shape idx.shape + [C] = [2, 4, 4] + [C], got [2, 4, 5, 3]"),
    ("xla_ops_knn", (_f32(2, 4, 3), _f32(2, 8, 2)), (_out(F32, 2, 4, 2), _out(I32, 2, 4, 2)), dict(k=np.int32(2)),
     "query and ref must have the same channel count >= 1, got shapes [2, 4, 3] and [2, 8, 2]"),
    ("xla_ops_knn", (_f32(2, 4, 3), _f32(2, 8, 3)), (_out(F32, 2, 4, 9), _out(I32, 2, 4, 9)), dict(k=np.int32(9)),
     "k must be in [1, N=8], got 9"),
    ("xla_ops_three_nn", (_f32(2, 4, 3), _f32(2, 0, 3)), (_out(F32, 2, 4, 3), _out(I32, 2, 4, 3)), {},
     "known must have at least 1 point(s), got shape [2, 0, 3]"),
    ("xla_ops_three_nn", (_f32(2, 4, 3), _f32(2, 8, 3)), (_out(F32, 2, 4, 3), _out(F32, 2, 4, 3)), {},
     "result idx must be int32 [..., n, 3] (24 elements), got float32 [2, 4, 3]"),
    ("xla_ops_three_interpolate", (_f32(2, 8, 5), _i32(2, 4, 3), _f32(2, 4, 2)), (_out(F32, 2, 4, 5),), {},
     "weight must have the shape of idx [2, 4, 3], got [2, 4, 2]"),
    ("xla_ops_three_interpolate", (_f32(2, 8, 5), _i32(2, 4, 2), _f32(2, 4, 2)), (_out(F32, 2, 4, 5),), {},
     "idx must have shape [..., N, 3], got [2, 4, 2]"),
    ("xla_ops_three_interpolate_grad", (_f32(2, 4, 5), _i32(2, 4, 3), _f32(2, 4, 3)), (_out(F32, 2, 1, 5),),
     dict(npoints=np.int32(0)), "npoints must be >= 1, got 0"),
    ("xla_ops_three_interpolate_grad", (_f32(2, 5, 5), _i32(2, 4, 3), _f32(2, 4, 3)), (_out(F32, 2, 8, 5),),
     dict(npoints=np.int32(8)), "grad_out must have shape [..., n, C] for idx [2, 4, 3], got [2, 5, 5]"),
    ("xla_ops_nn_distance", (np.zeros((2, 4, 3), np.float16), _f32(2, 5, 3)),
     (_out(F32, 2, 4), _out(I32, 2, 4), _out(F32, 2, 5), _out(I32, 2, 5)), {}, "a must be float32, got float16"),
    ("xla_ops_nn_distance", (_f32(4, 2), _f32(4, 2)), (_out(F32, 4), _out(I32, 4)) * 2, {},
     "a must have shape [..., N, 3], got [4, 2]"),
    ("xla_ops_approx_match", (_f32(2, 6, 3), _f32(6, 3), _i32(2), _i32(2)), (_out(F32, 2, 4, 6), _out(F32, 2, 100)),
     {}, "batch mismatch: xyz1 and xyz2 must have the same batch shape, got shapes [2, 6, 3] and [6, 3]"),
    ("xla_ops_approx_match", (_f32(2, 6, 3), _f32(2, 4, 3), _i32(3), _i32(2)),
     (_out(F32, 2, 4, 6), _out(F32, 2, 100)), {},
     "lengths1 must be int32 [...] with the batch of xyz1 (2 elements), got int32 [3]"),
    ("xla_ops_emd", (_f32(2, 6, 3), _f32(2, 4, 3), _i32(2), _f32(2)),
     (_out(F32, 2), _out(F32, 2, 6, 3), _out(F32, 2, 4, 3), _out(F32, 2, 100)), dict(with_grad=np.int32(1)),
     "lengths2 must be int32 [...] with the batch of xyz1 (2 elements), got float32 [2]"),
    ("xla_ops_emd", (_f32(2, 6, 3), _f32(2, 4, 3), _i32(2), _i32(2)),
     (_out(F32, 2), _out(F32, 2, 6, 3), _out(F32, 2, 3, 3), _out(F32, 2, 100)), dict(with_grad=np.int32(1)),
     "result grad2 must be float32 [..., m, 3] (24 elements), got float32 [2, 3, 3]"),
    ("xla_ops_match_cost", (_f32(2, 6, 3), _f32(2, 4, 3), _f32(2, 6, 4)), (_out(F32, 2), _out(F32, 2, 4)), {},
     "match must have shape [..., N, 6], got [2, 6, 4]"),
    ("xla_ops_match_cost", (_f32(2, 6, 3), _f32(2, 4, 3), _f32(2, 5, 6)), (_out(F32, 2), _out(F32, 2, 4)), {},
     "match must have shape [..., m=4, n=6], got [2, 5, 6]"),
    ("xla_ops_match_cost_grad", (_f32(2, 6, 3), _f32(2, 4, 3), _f32(2, 4, 6)), (_out(F32, 2, 6, 3), _out(F32, 2, 3, 3)),
     {}, "result grad2 must be float32 [..., m, 3] (24 elements), got float32 [2, 3, 3]"),
]


def _ffi_devices():
  devices = [jax.devices("cpu")[0]]
  if importlib.util.find_spec("xla_ops._xla_ops_cuda") is not None:  # the CUDA handlers were built
    try:
      devices += jax.devices("gpu")[:1]
    except RuntimeError:  # no GPU visible to JAX
      pass
  return devices


@pytest.mark.parametrize("device", _ffi_devices(), ids=lambda d: d.platform)
@pytest.mark.parametrize("target,args,results,attrs,message", _BAD_FFI_CALLS,
                         ids=[f"{c[0][8:]}-{i}" for i, c in enumerate(_BAD_FFI_CALLS)])
def test_cpp_check_rejects_a_bad_direct_ffi_call(device, target, args, results, attrs, message):
  registered_platforms()
  call = jax.jit(lambda *a: jax.ffi.ffi_call(target, results, vmap_method="broadcast_all")(*a, **attrs))
  with pytest.raises(jax.errors.JaxRuntimeError, match=f"INVALID_ARGUMENT: {re.escape(target + ': ' + message)}"):
    jax.block_until_ready(call(*[jax.device_put(a, device) for a in args]))


def test_every_ffi_target_has_a_cpp_check_case():
  from xla_ops import _xla_ops_cpu  # pylint: disable=g-import-not-at-top
  assert {case[0] for case in _BAD_FFI_CALLS} == set(_xla_ops_cpu.registrations())
