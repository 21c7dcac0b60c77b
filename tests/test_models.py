"""Model tests: the original's shapes and parameter counts at paper size (eval_shape, no compute), layer numerics
against independent references, quirk flags, ffi/jnp parity and end-to-end differentiability (tiny)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpcr_jax import stages
from dpcr_jax.models import build_dense, default_model_config
from dpcr_jax.models import layers
from dpcr_jax.models.dense import DenseLevel, expand_with_grid, grid_codes
from dpcr_jax.models.sparse import Decoder, decoder_kernels

B = 2


def build_model(config, stage, ops_impl="ffi"):
  """The stage table's network for a model config."""
  return stages.get(stage).make_model(config, ops_impl)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_batch(image_size=256, n_sparse=1024):
  return {"image": jax.ShapeDtypeStruct((B, image_size, image_size, 3), jnp.float32),
          "points_sparse": jax.ShapeDtypeStruct((B, n_sparse, 3), jnp.float32)}


def _abstract_init(model, batch):
  return jax.eval_shape(lambda b: model.init(jax.random.key(0), b, train=False), batch)


@functools.lru_cache(maxsize=None)
def _paper_model(stage):
  """(model, abstract variables) at paper size; traced once per test session."""
  model = build_model(default_model_config(), stage)
  return model, _abstract_init(model, _abstract_batch())


def _tiny_config(**dense):
  c = default_model_config()
  c.image_size, c.width = 64, 1 / 16
  c.dense.k = 4
  c.dense.update(dense)
  return c


def _random_variables(abstract, seed=0):
  """Concrete variables of the given shapes (no jitted init: its RNG graph is slow to compile on CPU):
  params ~ N(0, 0.2) (BN scales 1 + that), EMA statistics mean 0 / variance 1."""
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = jax.tree_util.keystr(path)
    if "'var'" in name:
      return jnp.ones(x.shape, x.dtype)
    if "'mean'" in name:
      return jnp.zeros(x.shape, x.dtype)
    value = 0.2 * rng.standard_normal(x.shape).astype(np.float32)
    return jnp.asarray(value + 1.0 if "'scale'" in name else value)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def _tiny_batch(seed=0, image_size=64, n_sparse=64):
  rng = np.random.default_rng(seed)
  return {"image": rng.random((B, image_size, image_size, 3), dtype=np.float32),
          "points_sparse": (0.3 * rng.standard_normal((B, n_sparse, 3))).astype(np.float32),
          "points_dense": (0.3 * rng.standard_normal((B, 16 * n_sparse, 3))).astype(np.float32)}


# --------------------------------------------------------------------------------------------- paper size

def test_paper_parameter_counts_and_output_shapes():
  expected = {"sparse": (32_472_131, {"sparse": (B, 1024, 3)}),
              "dense": (307_014, {"mid": (B, 4096, 3), "dense": (B, 16384, 3)}),
              "finetune": (32_779_145, {"sparse": (B, 1024, 3), "mid": (B, 4096, 3), "dense": (B, 16384, 3)})}
  variables = {}
  for stage, (count, shapes) in expected.items():
    model, variables[stage] = _paper_model(stage)
    assert _count(variables[stage]["params"]) == count, stage
    outputs = jax.eval_shape(lambda v, b, m=model: m.apply(v, b, train=True, mutable=["batch_stats"])[0],
                             variables[stage], _abstract_batch())
    assert {k: v.shape for k, v in outputs.items()} == shapes, stage
  # The joined model holds exactly the two stage models' variables, under 'sparse' and 'dense'.
  for collection in ("params", "batch_stats"):
    joined = variables["finetune"][collection]
    for stage in ("sparse", "dense"):
      assert jax.tree.map(lambda x: x.shape, joined[stage]) == \
          jax.tree.map(lambda x: x.shape, variables[stage][collection])
  assert _count(variables["sparse"]["params"]["decoder"]) == 13_180_419
  assert len(decoder_kernels(variables["sparse"]["params"])) == 11


def test_spec_shape_tables():
  """Intermediate feature maps of docs/original.md §1.2/§1.3 (256 input) and §2.4 (dense levels)."""
  model, abstract = _paper_model("finetune")
  _, state = jax.eval_shape(
      lambda v, b: model.apply(v, b, train=False, capture_intermediates=True, mutable=["intermediates"]),
      abstract, _abstract_batch())
  inter = state["intermediates"]
  sparse = inter["sparse"]
  features, x1, x2, x3 = sparse["encoder"]["__call__"][0]
  assert features.shape == (B, 8, 8, 512) and x3.shape == (B, 8, 8, 512)
  assert x2.shape == (B, 16, 16, 256) and x1.shape == (B, 32, 32, 128)
  enc = sparse["encoder"]
  assert enc["stem_1"]["__call__"][0].shape == (B, 128, 128, 16)
  assert enc["stem_3"]["__call__"][0].shape == (B, 128, 128, 32)
  assert enc["stem_4"]["__call__"][0].shape == (B, 64, 64, 64)
  assert enc["attention_1"]["__call__"][0].shape == (B, 64, 64, 64)
  assert enc["attention_1"]["down_2"]["__call__"][0].shape == (B, 16, 16, 64)
  assert enc["residual_1"]["__call__"][0].shape == (B, 64, 64, 128)
  dec = sparse["decoder"]
  assert dec["conv_1"]["__call__"][0].shape == (B, 4, 4, 512)
  assert [dec[f"deconv_{i}"]["__call__"][0].shape for i in (2, 3, 4)] == \
      [(B, 8, 8, 256), (B, 16, 16, 128), (B, 32, 32, 64)]
  assert dec["conv_out"]["__call__"][0].shape == (B, 32, 32, 3)
  for level, n in (("level_1", 1024), ("level_2", 4096)):
    lv = inter["dense"][level]
    new_points, feature = lv["__call__"][0]
    assert feature.shape == (B, n, 323) and new_points.shape == (B, 4 * n, 3)
    assert lv["local"]["__call__"][0].shape == (B, n, 256)
    assert lv["local"]["dgcnn4"]["__call__"][0].shape == (B, n, 20, 128)  # before the max over k
    assert lv["decoder"]["conv_1"]["__call__"][0].shape == (B, 4 * n, 128)  # from 325 channels


def test_smaller_images_and_pointnet2_variant_shapes():
  config = default_model_config()
  config.image_size = 128
  config.dense.variant = "pointnet2"
  model = build_model(config, "finetune")
  batch = _abstract_batch(128, 256)
  outputs = jax.eval_shape(lambda v, b: model.apply(v, b, train=False), _abstract_init(model, batch), batch)
  assert {k: v.shape for k, v in outputs.items()} == {"sparse": (B, 256, 3), "mid": (B, 1024, 3),
                                                     "dense": (B, 4096, 3)}


def test_bad_model_config_raises():
  config = default_model_config()
  config.image_size = 100
  with pytest.raises(ValueError, match="image_size"):
    build_model(config, "finetune")
  with pytest.raises(ValueError, match="ops_impl"):
    build_model(default_model_config(), "finetune", ops_impl="cuda")


def test_bad_variant_stage_and_image_raise():
  config = default_model_config()
  with pytest.raises(ValueError, match="stage"):
    build_model(config, "coarse")
  config.dense.variant = "pointnet"
  with pytest.raises(ValueError, match="variant"):
    build_model(config, "dense")
  model = build_model(default_model_config(), "sparse")
  with pytest.raises(ValueError, match="image"):
    _abstract_init(model, {"image": jax.ShapeDtypeStruct((B, 96, 96, 3), jnp.float32)})


# --------------------------------------------------------------------------------------------- layers

def _tf_conv2d_transpose_numpy(x, kernel, stride, out_size):
  """TF conv2d_transpose(padding='SAME') as the adjoint of a SAME conv, by explicit scatter.

  x [B,h,w,Cin], kernel [k,k,Cout,Cin]. The forward SAME conv out_size -> h pads
  total = max((h-1)*stride + k - out_size, 0), before = total // 2, and reads input pixel
  o = i*stride + a - before for output i and tap a; the transpose scatters x[i] back to every such o.
  """
  b, h, w, _ = x.shape
  k = kernel.shape[0]
  before = max((h - 1) * stride + k - out_size, 0) // 2
  out = np.zeros((b, out_size, out_size, kernel.shape[2]), np.float64)
  for i in range(h):
    for j in range(w):
      for a in range(k):
        for c in range(k):
          oi, oj = i * stride + a - before, j * stride + c - before
          if 0 <= oi < out_size and 0 <= oj < out_size:
            out[:, oi, oj] += x[:, i, j] @ kernel[a, c].T
  return out


@pytest.mark.parametrize("size, kernel, stride", [(4, 5, 2), (3, 5, 2), (4, 3, 2), (2, 4, 2)])
def test_tf_same_conv_transpose_matches_reference(size, kernel, stride):
  rng = np.random.default_rng(size + kernel)
  x = rng.standard_normal((2, size, size, 3)).astype(np.float32)
  w = rng.standard_normal((kernel, kernel, 4, 3)).astype(np.float32)  # [k, k, out, in]: TF's layout
  layer = layers.tf_conv_transpose(4, kernel, stride)
  abstract = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
  assert abstract["kernel"].shape == w.shape
  y = np.asarray(layer.apply({"params": {"kernel": w, "bias": np.zeros(4, np.float32)}}, x))
  np.testing.assert_allclose(y, _tf_conv2d_transpose_numpy(x, w, stride, size * stride), rtol=1e-5, atol=1e-5)
  # Second, independent route: the VJP of a SAME forward conv (what TF differentiates).
  fwd = lambda z: jax.lax.conv_general_dilated(  # noqa: E731
      z, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  _, vjp = jax.vjp(fwd, jnp.zeros((2, size * stride, size * stride, 4)))
  np.testing.assert_allclose(y, vjp(jnp.asarray(x))[0], rtol=1e-5, atol=1e-5)
  # jax's 'SAME' for conv_transpose pads the same way (docs/original.md §1.3).
  plain = nn.ConvTranspose(4, (kernel, kernel), (stride, stride), padding="SAME", transpose_kernel=True)
  np.testing.assert_allclose(plain.apply({"params": {"kernel": w, "bias": np.zeros(4, np.float32)}}, x), y,
                             rtol=1e-5, atol=1e-5)


def test_initialisers():
  # tflearn uniform_scaling: fan_in = prod(shape[:-1]) (k*k*out for a transposed kernel).
  w = np.asarray(layers.uniform_scaling(jax.random.key(0), (5, 5, 64, 128)))
  limit = np.sqrt(3.0 / (5 * 5 * 64))
  assert np.abs(w).max() <= limit and np.abs(w).max() > 0.95 * limit
  assert abs(w.std() - limit / np.sqrt(3)) < 0.02 * limit
  gamma = np.asarray(layers.tflearn_gamma_init(jax.random.key(1), (10000,)))
  assert abs(gamma.mean() - 1) < 1e-4 and abs(gamma.std() - 0.002) < 1e-4
  # The decoder's layers use it, with zero biases (rbg keys: threefry init graphs compile slowly on CPU).
  decoder = Decoder(width=1 / 16)
  maps = [jnp.zeros((1, s, s, c)) for s, c in ((2, 32), (8, 8), (4, 16), (2, 32))]
  params = jax.jit(decoder.init)(jax.random.key(2, impl="rbg"), *maps)["params"]
  k = np.asarray(params["conv_1"]["kernel"])
  assert k.shape == (5, 5, 32, 32) and np.abs(k).max() <= np.sqrt(3.0 / (5 * 5 * 32))
  assert np.abs(np.asarray(params["deconv_2"]["kernel"])).max() <= np.sqrt(3.0 / (5 * 5 * 16))
  assert all(not np.any(np.asarray(p["bias"])) for p in params.values())


def test_batch_norm_flavours():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 5, 4)).astype(np.float32) * 2 + 1)
  # tflearn as the original ran it: a learnable affine over frozen 0/1 statistics, no batch_stats.
  frozen = layers.tflearn_batch_norm(frozen=True)
  variables = frozen.init(jax.random.key(0), x, train=True)
  assert set(variables) == {"params"}
  gamma = variables["params"]["scale"]
  np.testing.assert_allclose(frozen.apply(variables, x, train=True), gamma * x / np.sqrt(1 + 1e-5), rtol=1e-6)
  # The sparse BN: batch moments in training, EMA with decay 0.5 from a zero start, used at inference.
  bn = layers.BatchNorm(momentum=0.5, epsilon=1e-3, zero_init_stats=True)
  variables = bn.init(jax.random.key(0), x, train=True)
  np.testing.assert_array_equal(variables["batch_stats"]["var"], 0.0)
  y, state = bn.apply(variables, x, train=True, mutable=["batch_stats"])
  xn = np.asarray(x).reshape(-1, 4)
  np.testing.assert_allclose(y, (x - xn.mean(0)) / np.sqrt(xn.var(0) + 1e-3), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state["batch_stats"]["mean"], 0.5 * xn.mean(0), rtol=1e-5)
  np.testing.assert_allclose(state["batch_stats"]["var"], 0.5 * xn.var(0), rtol=1e-5)
  y_eval = bn.apply({**variables, **state}, x, train=False)
  np.testing.assert_allclose(y_eval, (x - 0.5 * xn.mean(0)) / np.sqrt(0.5 * xn.var(0) + 1e-3), rtol=1e-5)


def test_grid_codes_and_point_order():
  np.testing.assert_allclose(grid_codes(4, 0.1), [[-0.1, -0.1], [0.1, -0.1], [-0.1, 0.1], [0.1, 0.1]], rtol=1e-6)
  feature = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
  out = np.asarray(expand_with_grid(feature, 4, 0.1))
  assert out.shape == (2, 12, 4)
  for i in range(3):
    for c in range(4):  # output point 4i + c = input point i with code c
      np.testing.assert_array_equal(out[:, 4 * i + c, :2], feature[:, i])
      np.testing.assert_allclose(out[:, 4 * i + c, 2:], np.broadcast_to(grid_codes(4, 0.1)[c], (2, 2)))
  with pytest.raises(ValueError, match="perfect square"):
    grid_codes(8, 0.1)


# --------------------------------------------------------------------------------------------- tiny models

def _dense_level(config, ops_impl="ffi") -> DenseLevel:
  """A standalone dense level configured as build_dense(config)'s levels."""
  return build_dense(config, ops_impl).level()


def _tiny_dense(seed=0, **config_changes):
  config = _tiny_config()
  config.update({k: v for k, v in config_changes.items() if k != "dense"})
  config.dense.update(config_changes.get("dense", {}))
  model = build_model(config, "dense")
  batch = _tiny_batch(seed)
  return model, _random_variables(_abstract_init(model, batch), seed), batch


def test_tflearn_frozen_bn_flag_toggles_only_those_layers():
  frozen_config, real_config = _tiny_config(), _tiny_config()
  real_config.tflearn_frozen_bn = False
  batch = _tiny_batch()
  frozen_abstract = _abstract_init(build_model(frozen_config, "dense"), batch)
  real_abstract = _abstract_init(build_model(real_config, "dense"), batch)
  # Same parameters; the real BN only adds EMA statistics to the tflearn layers (global and decoder).
  assert jax.tree.map(lambda x: x.shape, real_abstract["params"]) == \
      jax.tree.map(lambda x: x.shape, frozen_abstract["params"])
  paths = lambda tree: {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)}  # noqa: E731
  frozen_stats, real_stats = paths(frozen_abstract["batch_stats"]), paths(real_abstract["batch_stats"])
  added = real_stats - frozen_stats
  assert frozen_stats < real_stats and added
  assert all(("'global'" in p or "'decoder'" in p) and "'bn_" in p for p in added)
  # Numerics on one level: with untouched statistics (mean 0, var 1) the two agree at inference, as in
  # the original; in training only the real BN uses batch statistics.
  points = batch["points_sparse"]
  frozen_level, real_level = _dense_level(frozen_config), _dense_level(real_config)
  abstract = lambda level: jax.eval_shape(functools.partial(level.init, train=False),  # noqa: E731
                                          jax.random.key(0), points, None)
  frozen_vars = _random_variables(abstract(frozen_level))
  real_vars = {"params": frozen_vars["params"], "batch_stats": _random_variables(abstract(real_level)["batch_stats"])}

  def run(level, variables, train):
    return jax.jit(lambda v: level.apply(v, points, None, train=train, mutable=["batch_stats"])[0][0])(variables)

  np.testing.assert_allclose(run(frozen_level, frozen_vars, False), run(real_level, real_vars, False),
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(run(frozen_level, frozen_vars, True), run(real_level, real_vars, True), atol=1e-3)


def test_skip_connection_only_affects_later_levels():
  model, variables, batch = _tiny_dense()
  no_skip, _, _ = _tiny_dense(dense=dict(skip_weight=0.0))
  out = jax.jit(functools.partial(model.apply, train=False))(variables, batch)
  out_no_skip = jax.jit(functools.partial(no_skip.apply, train=False))(variables, batch)
  np.testing.assert_array_equal(out["mid"], out_no_skip["mid"])
  assert not np.allclose(out["dense"], out_no_skip["dense"], atol=1e-4)


@pytest.mark.parametrize("variant", ["edgeconv", "pointnet2"])
def test_ffi_and_jnp_backends_agree(variant):
  """One dense level with a skip input (knn, group_points; FPS, ball_query, three_nn, three_interpolate,
  inverse_distance_weights for pointnet2), same inputs and params. (Across two levels the backends'
  float32 rounding differences would move level-2 inputs, and FPS / ball membership are discontinuous.)"""
  config = _tiny_config(variant=variant, pointnet2=dict(radii=(0.3, 0.6), nsample=8))
  rng = np.random.default_rng(0)
  inputs = ((0.3 * rng.standard_normal((B, 64, 3))).astype(np.float32),
            ((0.3 * rng.standard_normal((B, 16, 3))).astype(np.float32),
             rng.standard_normal((B, 16, 323)).astype(np.float32)))
  results = []
  for impl in ("ffi", "jnp"):
    level = _dense_level(config, impl)
    if impl == "ffi":
      variables = _random_variables(jax.eval_shape(functools.partial(level.init, train=False),
                                                   jax.random.key(0), *inputs))
    results.append(jax.jit(functools.partial(level.apply, train=True, mutable=["batch_stats"]))(variables, *inputs))
  (ffi_points, ffi_feature), ffi_stats = results[0]
  (jnp_points, jnp_feature), jnp_stats = results[1]
  np.testing.assert_allclose(ffi_feature, jnp_feature, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ffi_points, jnp_points, rtol=1e-4, atol=1e-4)  # outputs are O(10)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), ffi_stats, jnp_stats)


@pytest.mark.slow  # one jit of the whole pipeline's gradient: ~40 s of XLA compile on a 2-core CPU
def test_finetune_end_to_end_jit_and_grad():
  """image -> 64 -> 256 -> 1024 points under one jit; finite, non-zero gradients in both networks."""
  from dpcr_jax.losses import finetune_loss
  from dpcr_jax.models import default_loss_config
  config = _tiny_config()
  model = build_model(config, "finetune")
  batch = _tiny_batch()
  variables = _random_variables(_abstract_init(model, batch))
  loss_config = default_loss_config()

  @jax.jit
  def loss_and_grad(params, batch_stats, batch):
    def loss_fn(p):
      outputs, state = model.apply({"params": p, "batch_stats": batch_stats}, batch, train=True,
                                   mutable=["batch_stats"])
      loss, metrics = finetune_loss(outputs, batch, p, loss_config, "ffi")
      return loss, (metrics, state, outputs)
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (loss, (metrics, state, outputs)), grads = loss_and_grad(variables["params"], variables["batch_stats"], batch)
  assert outputs["dense"].shape == (B, 1024, 3) and np.isfinite(float(loss))
  for part in ("sparse", "dense"):
    leaves = jax.tree.leaves(grads[part])
    assert all(np.all(np.isfinite(g)) for g in leaves), part
    assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0, part
  # Image features get gradient from the dense losses through the sparse points.
  assert float(jnp.sum(jnp.abs(grads["sparse"]["encoder"]["stem_1"]["kernel"]))) > 0
  # The sparse BN statistics moved with decay 0.5.
  before = variables["batch_stats"]["sparse"]["encoder"]["residual_1"]["bn1"]["mean"]
  after = state["batch_stats"]["sparse"]["encoder"]["residual_1"]["bn1"]["mean"]
  assert not np.allclose(before, after)


def test_predict_offsets_adds_the_source_point_and_keeps_the_parameters():
  """dense.predict_offsets (a quickstart deviation): same parameters; output copy r*i + c = input point i +
  the decoded offset, so with a zeroed last decoder layer every level returns its input points x upsample."""
  direct_model, direct_vars, batch = _tiny_dense()
  offset_model, _, _ = _tiny_dense(dense={"predict_offsets": True})
  offset_abstract = _abstract_init(offset_model, batch)
  assert jax.tree.map(lambda x: x.shape, offset_abstract) == jax.tree.map(lambda x: x.shape, direct_vars)
  apply = lambda m, v: m.apply(v, batch, train=False)  # noqa: E731
  direct, offset = jax.jit(lambda v: apply(direct_model, v))(direct_vars), jax.jit(
      lambda v: apply(offset_model, v))(direct_vars)
  # Level 1 sees the same input, so its output differs exactly by the repeated input points.
  np.testing.assert_allclose(offset["mid"], direct["mid"] + np.repeat(batch["points_sparse"], 4, axis=1),
                             rtol=1e-5, atol=1e-5)
  zeroed = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.zeros_like(x) if "conv_out" in jax.tree_util.keystr(p) else x, direct_vars)
  out = jax.jit(lambda v: apply(offset_model, v))(zeroed)
  np.testing.assert_allclose(out["mid"], np.repeat(batch["points_sparse"], 4, axis=1), atol=1e-6)
  np.testing.assert_allclose(out["dense"], np.repeat(batch["points_sparse"], 16, axis=1), atol=1e-6)
