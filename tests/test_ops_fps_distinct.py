"""FPS never picks a point twice: non-finite coordinates and clouds of identical points (issue 11, item 6)."""
import jax
import numpy as np
import pytest

from xla_ops import farthest_point_sample
from xla_ops.reference import sampling as ref

IMPLS = ("ffi", "jnp")


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_point_is_picked_once(impl):
  x = np.random.default_rng(0).random((1, 10, 3), dtype=np.float32)
  x[0, 5, 0] = np.nan
  idx = np.asarray(farthest_point_sample(x, 6, impl=impl))
  np.testing.assert_array_equal(idx, ref.farthest_point_sample(x, 6))
  assert idx[0, :2].tolist() == [0, 5] and len(set(idx[0].tolist())) == 6


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [1024, 3000])  # 3000: many CPU blocks, all with max distance 0
def test_identical_points_give_distinct_indices(impl, n):
  x = np.full((2, n, 3), 0.25, np.float32)
  idx = np.asarray(jax.jit(lambda p: farthest_point_sample(p, 1024, impl=impl))(x))
  np.testing.assert_array_equal(idx, np.broadcast_to(np.arange(1024, dtype=np.int32), (2, 1024)))


@pytest.mark.parametrize("impl", IMPLS)
def test_duplicates_and_non_finite_mixed(impl):
  """Duplicated points, inf and NaN coordinates; npoint = N: every index exactly once, as the reference."""
  rng = np.random.default_rng(1)
  base = rng.random((40, 3), dtype=np.float32)
  x = np.concatenate([base, base[:30], base[:30]])[None]  # 100 points, 60 duplicates
  x[0, 7] = np.nan
  x[0, 50, 2] = np.inf
  x[0, 80, 0] = -np.inf
  idx = np.asarray(farthest_point_sample(x, 100, impl=impl))
  np.testing.assert_array_equal(idx, ref.farthest_point_sample(x, 100))
  np.testing.assert_array_equal(np.sort(idx[0]), np.arange(100))
