"""Evaluation: protocol metrics, report tables and baselines vs independent numpy computations on tiny clouds."""
import jax.numpy as jnp
import numpy as np
import pytest

from dpcr_jax import baselines, evaluation, metrics, reports
from xla_ops.reference import emd as emd_ref


def _np_normalize(p):
  lo, hi = p.min(0), p.max(0)
  return (p - (lo + hi) / 2) / (hi - lo).max()


def _np_metrics(pred, gt):
  pred, gt = _np_normalize(pred.astype(np.float64)), _np_normalize(gt.astype(np.float64))
  d = ((gt[:, None] - pred[None]) ** 2).sum(-1)  # [M, N]
  d_gt, d_pred = d.min(1), d.min(0)
  precision = np.mean(np.sqrt(d_pred) < 0.01)
  recall = np.mean(np.sqrt(d_gt) < 0.01)
  f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
  match = emd_ref.approx_match(gt.astype(np.float32), pred.astype(np.float32))
  return {"cd": 1000 * (d_gt.mean() + d_pred.mean()),
          "cd_l1": 100 * (np.sqrt(d_gt).mean() + np.sqrt(d_pred).mean()),
          "fscore": 100 * f,
          "emd": emd_ref.match_cost(gt.astype(np.float32), pred.astype(np.float32), match) / 1000}


@pytest.mark.parametrize("impl", ["ffi", "jnp"])
def test_protocol_matches_numpy(impl):
  rng = np.random.default_rng(0)
  gt = rng.normal(size=(3, 64, 3)).astype(np.float32) * [1.0, 0.5, 0.2] + [0, 0, -0.8]
  # Predictions at another scale and offset (which the protocol ignores) plus noise.
  pred = (gt * 2.5 + 3.0 + rng.normal(size=gt.shape) * 0.02).astype(np.float32)
  pred[2] = rng.uniform(-1, 1, size=(64, 3))
  got = {k: np.asarray(v) for k, v in metrics.cloud_metrics(jnp.asarray(pred), jnp.asarray(gt),
                                                                 impl=impl).items()}
  for i in range(3):
    want = _np_metrics(pred[i], gt[i])
    for k in want:
      np.testing.assert_allclose(got[k][i], want[k], rtol=2e-4, atol=1e-4, err_msg=f"{k}[{i}]")
  assert got["fscore"][0] > 0 and got["cd"][2] > 10 * got["cd"][0]


def test_normalization_and_invariance():
  rng = np.random.default_rng(1)
  p = rng.normal(size=(2, 50, 3)).astype(np.float32)
  n = np.asarray(metrics.normalize_unit_cube(jnp.asarray(p)))
  np.testing.assert_allclose((n.max(1) - n.min(1)).max(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose((n.max(1) + n.min(1)) / 2, 0.0, atol=1e-6)
  same = metrics.cloud_metrics(jnp.asarray(p * 7 - 2), jnp.asarray(p), impl="jnp")
  np.testing.assert_allclose(same["cd"], 0.0, atol=1e-4)
  np.testing.assert_allclose(same["fscore"], 100.0)


def test_exact_emd_and_approximation_error():
  a = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32)
  assert metrics.exact_emd(a, a[[2, 0, 1]]) == pytest.approx(0.0)
  assert metrics.exact_emd(a, a + [0, 0, 0.5]) == pytest.approx(1.5)
  rng = np.random.default_rng(0)
  clouds = rng.normal(size=(2, 300, 3)).astype(np.float32)
  check = metrics.emd_approximation_error(clouds, clouds[::-1] + 0.1, num_points=64, impl="jnp")
  assert check["num_points"] == 64 and check["exact_mean"] > 0
  assert -1e-3 < check["mean_relative_error"] < 0.5  # the approximate match is a feasible transport


def test_aggregate_is_unweighted_mean_of_categories():
  records = {"cd": np.array([1.0, 3.0, 10.0, np.nan]), "emd": np.array([np.nan, 2.0, 4.0, 6.0])}
  cats = np.array([0, 0, 1, 1])
  table = reports.aggregate(records, cats, ["a", "b"])
  assert table["a"]["cd"] == 2.0 and table["b"]["cd"] == 10.0 and table["mean"]["cd"] == 6.0
  assert table["a"]["emd"] == 2.0 and table["b"]["emd"] == 5.0 and table["mean"]["emd"] == 3.5
  assert table["a"]["count"] == 2


def test_reports(tmp_path):
  t = {"a": {"cd": 1.0, "count": 2}, "mean": {"cd": 1.0, "count": 2}}
  u = {"a": {"cd": 2.0, "count": 2}, "mean": {"cd": 2.0, "count": 2}}
  csv_path, md_path = reports.write_reports({"model": t, "medoid": u}, str(tmp_path / "r"), notes=["n1"])
  assert open(csv_path).read().splitlines()[1] == "model,a,2,1"
  md = open(md_path).read()
  assert "| a | **1.000** | 2.000 |" in md and "- n1" in md


def test_medoid_is_the_central_cloud():
  rng = np.random.default_rng(0)
  base = rng.normal(size=(128, 3)).astype(np.float32)
  scales = [1.0, 1.3, 1.6, 1.9, 2.2]  # anisotropic stretches: the middle one is closest to all others
  clouds = np.stack([base * [s, 1, 1] for s in scales])
  assert baselines.medoid_index(clouds, num_points=128, impl="jnp") == 2
  batches = [{"points_dense": clouds, "category": np.array([0, 0, 0, 1, 1]), "view": np.array([3] * 5)}]
  medoids = baselines.MedoidBaselines(iter(batches), num_points=128, impl="jnp")
  pred = medoids.predict(np.array([1, 0]), np.array([3, 3]))
  np.testing.assert_array_equal(pred["medoid"][0], clouds[2])
  np.testing.assert_array_equal(pred["oracle_medoid"][1], clouds[1])


def test_evaluate_predictions_with_baselines():
  rng = np.random.default_rng(0)
  gt = rng.normal(size=(6, 64, 3)).astype(np.float32)
  batches = [{"points_dense": gt[:4], "category": np.array([0, 1, 0, 1]), "view": np.zeros(4, np.int32)},
             {"points_dense": gt[4:], "category": np.array([1, 1]), "view": np.zeros(2, np.int32)}]
  medoids = baselines.MedoidBaselines(iter(batches), num_points=64, impl="jnp")
  predict = lambda batch: {"dense": batch["points_dense"], "sparse": batch["points_dense"][:, :4]}
  result = evaluation.evaluate_predictions(predict, batches, 4, ["a", "b"], medoids,
                                           emd_examples_per_category=1, exact_emd_clouds=2, impl="jnp")
  tables = result["tables"]
  assert set(tables) == {"model", "sparse_x16", "medoid", "oracle_medoid"}
  assert tables["model"]["mean"]["cd"] == pytest.approx(0.0, abs=1e-4)
  assert tables["model"]["b"]["count"] == 4 and tables["medoid"]["mean"]["cd"] > 1.0
  assert result["emd_check"]["num_clouds"] == 2
