"""Stage losses against values computed by hand in numpy (float64) on small inputs (docs/original.md §4.1-4.3)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpcr_jax import stages
from dpcr_jax.losses import dense_loss, finetune_loss, sparse_loss
from dpcr_jax.models import default_loss_config
from xla_ops.reference import emd as emd_reference


def _nn_sq(a, b):
  """For each point of a [B,N,3], the squared distance to its nearest point in b [B,M,3]."""
  d = ((a[:, :, None, :].astype(np.float64) - b[:, None, :, :]) ** 2).sum(-1)
  return d.min(-1)


def _cd(gt, pred):
  return _nn_sq(gt, pred).mean() + _nn_sq(pred, gt).mean()


def _points(rng, *shape):
  return (0.3 * rng.standard_normal(shape)).astype(np.float32)


@pytest.fixture(params=["ffi", "jnp"])
def impl(request):
  return request.param


def test_sparse_loss(impl):
  rng = np.random.default_rng(0)
  gt, pred = _points(rng, 2, 48, 3), _points(rng, 2, 12, 3)
  # Only the decoder's kernels are regularised (not its biases, not the encoder).
  params = {"decoder": {"conv_1": {"kernel": _points(rng, 3, 3, 4, 5), "bias": _points(rng, 5)},
                        "deconv_2": {"kernel": _points(rng, 5, 5, 2, 5), "bias": _points(rng, 2)}},
            "encoder": {"stem_1": {"kernel": _points(rng, 5, 5, 3, 4), "bias": _points(rng, 4)}}}
  loss, metrics = sparse_loss({"sparse": pred}, {"points_dense": gt}, params, default_loss_config(), impl)
  gt_to_pred, pred_to_gt = _nn_sq(gt, pred).mean(), _nn_sq(pred, gt).mean()
  l2 = sum(1e-5 * 0.5 * (params["decoder"][k]["kernel"].astype(np.float64) ** 2).sum() for k in ("conv_1", "deconv_2"))
  expected = 1e4 * (gt_to_pred + 0.55 * pred_to_gt) + 0.1 * l2
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["cd"], gt_to_pred + pred_to_gt, rtol=1e-5)
  np.testing.assert_allclose(metrics["decoder_l2"], l2, rtol=1e-5)
  np.testing.assert_allclose(metrics["chamfer_loss"], 1e4 * (gt_to_pred + 0.55 * pred_to_gt), rtol=1e-5)
  assert metrics["loss"] is loss


def test_dense_loss(impl):
  rng = np.random.default_rng(1)
  gt, mid, dense = _points(rng, 2, 64, 3), _points(rng, 2, 16, 3), _points(rng, 2, 64, 3)
  loss, metrics = dense_loss({"mid": mid, "dense": dense}, {"points_dense": gt}, {}, default_loss_config(), impl)
  np.testing.assert_allclose(loss, 1e4 * (_cd(gt, mid) + _cd(gt, dense)), rtol=1e-5)
  np.testing.assert_allclose(metrics["cd"], _cd(gt, dense), rtol=1e-5)
  np.testing.assert_allclose(metrics["cd_mid"], _cd(gt, mid), rtol=1e-5)


def test_finetune_loss_and_gradient(impl):
  rng = np.random.default_rng(2)
  gt_sparse, sparse = _points(rng, 2, 16, 3), _points(rng, 2, 16, 3)
  gt_dense, mid, dense = _points(rng, 2, 64, 3), _points(rng, 2, 32, 3), _points(rng, 2, 64, 3)
  batch = {"points_sparse": gt_sparse, "points_dense": gt_dense}

  def loss_fn(sparse):
    return finetune_loss({"sparse": sparse, "mid": mid, "dense": dense}, batch, {}, default_loss_config(), impl)

  (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(sparse))
  emd = np.mean([emd_reference.match_cost(g, p, emd_reference.approx_match(g, p)) for g, p in zip(gt_sparse, sparse)])
  expected = 0.5 * (_cd(gt_sparse, sparse) + emd / 1000) + _cd(gt_dense, mid) + _cd(gt_dense, dense)
  np.testing.assert_allclose(loss, expected, rtol=1e-4)
  np.testing.assert_allclose(metrics["emd_sparse"], emd, rtol=1e-4)
  np.testing.assert_allclose(metrics["cd"], _cd(gt_dense, dense), rtol=1e-5)
  # Gradient w.r.t. the sparse prediction: Chamfer (through the nearest pairs) + EMD (match held fixed).
  expected_grad = np.zeros(sparse.shape)
  for b, (g, p) in enumerate(zip(gt_sparse.astype(np.float64), sparse.astype(np.float64))):
    d = ((g[:, None] - p[None]) ** 2).sum(-1)  # [n_gt, n_pred]
    for i, j in enumerate(d.argmin(1)):  # mean over batch * points of d(gt -> pred)
      expected_grad[b, j] += 2 * (p[j] - g[i]) / len(g)
    for j, i in enumerate(d.argmin(0)):  # and of d(pred -> gt)
      expected_grad[b, j] += 2 * (p[j] - g[i]) / len(p)
    expected_grad[b] /= len(gt_sparse)
    expected_grad[b] += emd_reference.match_cost_grad(g, p, emd_reference.approx_match(g, p))[1] / 1000 / len(gt_sparse)
  np.testing.assert_allclose(grad, 0.5 * expected_grad, rtol=1e-4, atol=1e-6)


def test_stage_table_wires_each_loss():
  assert [stages.get(n).loss for n in ("sparse", "dense", "finetune")] == [sparse_loss, dense_loss, finetune_loss]
  with pytest.raises(ValueError, match="stage must be one of"):
    stages.get("coarse")
