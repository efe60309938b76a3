"""Discriminator and generator: shapes, parameter counts, the CAM quirk, size checks, the key map."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import normal, uniform
from nicegan_jax import layers, models, param_map


def count(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def shapes_256():
  disc, gen = models.Discriminator(), models.Generator(light=True)
  d_vars = jax.eval_shape(disc.init, jax.random.PRNGKey(0), jnp.zeros((1, 256, 256, 3)))
  g_vars = jax.eval_shape(gen.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 128)))
  return disc, gen, d_vars, g_vars


def test_output_shapes_at_256(shapes_256):
  disc, gen, d_vars, g_vars = shapes_256
  x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  out, _ = jax.eval_shape(lambda v, x: disc.apply(v, x, update_stats=True, mutable=["spectral"]),
                          d_vars, x)
  assert out.local_logits.shape == (2, 30, 30, 1)
  assert out.global_logits.shape == (2, 6, 6, 1)
  assert out.cam_logit.shape == (2, 1)
  assert out.heatmap.shape == (2, 64, 64, 1)
  assert out.z.shape == (2, 64, 64, 128)
  z = jax.eval_shape(lambda v, x: models.encode(disc, v, x), d_vars, x)
  assert z.shape == (2, 64, 64, 128)
  img = jax.eval_shape(lambda v, z: gen.apply(v, z), g_vars, out.z)
  assert img.shape == (2, 256, 256, 3) and img.dtype == jnp.float32


def test_parameter_counts_match_the_original(shapes_256):
  _, _, d_vars, g_vars = shapes_256
  assert count(d_vars["params"]) == 46_874_433  # weight_orig, biases, fc, conv1x1, lamda
  assert count(g_vars["params"]) == 8_104_640
  encoder = {k: v for k, v in d_vars["params"].items() if k in ("model_1", "model_4", "fc", "conv1x1",
                                                                  "lamda")}
  assert count(encoder) == 167_489
  full = jax.eval_shape(models.Generator(light=False).init, jax.random.PRNGKey(0),
                        jnp.zeros((1, 64, 64, 128)))
  assert count(full["params"]) == 276_474_560
  assert full["params"]["FC_0"]["kernel"].shape == (1_048_576, 256)


@pytest.mark.parametrize("img_size,n_dis,message", [
    (64, 7, "too small for n_dis=7"),
    (32, 6, "too small for n_dis=6"),
    (66, 6, "multiple of 4"),
    (256, 5, "n_dis >= 6"),
])
def test_size_checks_name_the_problem(img_size, n_dis, message):
  with pytest.raises(ValueError, match=message):
    models.discriminator_feature_sizes(img_size, n_dis)


def test_feature_sizes_agree_with_the_network():
  for img_size, n_dis in ((256, 7), (64, 6), (128, 7), (48, 6)):
    sizes = models.discriminator_feature_sizes(img_size, n_dis)
    disc = models.Discriminator(ch=4, n_layers=n_dis)
    x = jnp.zeros((1, img_size, img_size, 3))
    out = jax.eval_shape(lambda x: disc.init_with_output(jax.random.PRNGKey(0), x)[0], x)
    assert out.local_logits.shape[1] == sizes["local"]
    assert out.global_logits.shape[1] == sizes["global"]
    assert out.z.shape[1] == sizes["z"]


@pytest.fixture(scope="module")
def tiny_disc():
  disc = models.Discriminator(ch=8, n_layers=6)
  x = uniform(3, (2, 64, 64, 3))
  variables = flax.core.unfreeze(jax.jit(disc.init)(jax.random.PRNGKey(4), x))
  variables["params"]["lamda"] = jnp.ones((1,))  # switch the attention branch on
  variables["params"]["fc"]["kernel"] = variables["params"]["fc"]["kernel"] * 7.0  # sigma far from 1
  return disc, variables, x


def test_cam_block_weights_features_with_the_raw_fc_weight(tiny_disc):
  disc, variables, x = tiny_disc
  p, s = variables["params"], variables["spectral"]
  conv = lambda name, stride: layers.Conv(p[name]["kernel"].shape[-1], 4, stride=stride, pad=1,
                                          spectral_norm=True)
  h = nn.leaky_relu(conv("model_1", 2).apply({"params": p["model_1"], "spectral": s["model_1"]}, x), 0.2)
  x0 = nn.leaky_relu(conv("model_4", 2).apply({"params": p["model_4"], "spectral": s["model_4"]}, h),
                     0.2)
  raw = p["fc"]["kernel"][:, 0]  # (256,): the weight_orig row
  sigma = s["fc"]["u"] @ p["fc"]["kernel"].T @ s["fc"]["v"]
  pooled = jnp.concatenate([x0.mean((1, 2)), x0.max((1, 2))], -1)

  def z_with(weight):
    att = layers.Conv(16, 1).apply({"params": p["conv1x1"]}, jnp.concatenate([x0, x0], -1) * weight)
    return nn.leaky_relu(att + x0, 0.2)

  out = disc.apply(variables, x)
  np.testing.assert_allclose(out.z, z_with(raw), rtol=1e-5, atol=1e-5)
  assert not np.allclose(out.z, z_with(raw / sigma), atol=1e-3)  # the normalised weight is not used
  np.testing.assert_allclose(out.cam_logit[:, 0], pooled @ (raw / sigma), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.heatmap[..., 0], out.z.sum(-1), rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(models.encode(disc, variables, x), out.z)


def test_training_mode_advances_every_spectral_vector_and_inference_none(tiny_disc):
  disc, variables, x = tiny_disc
  _, mutated = disc.apply(variables, x, update_stats=True, mutable=["spectral"])
  before, after = variables["spectral"], mutated["spectral"]
  assert set(before) == {"model_1", "model_4", "fc", "Dis0_1_1", "Dis1_0_1", "Dis1_0_4", "Dis1_1_1",
                         "conv0", "conv1"}
  for name in before:
    assert not np.allclose(before[name]["v"], after[name]["v"]), name  # fc's u has length 1
  _, unchanged = disc.apply(variables, x, mutable=["spectral"])
  jax.tree.map(np.testing.assert_array_equal, unchanged["spectral"], before)


@pytest.mark.parametrize("light", [True, False])
def test_generator_output_in_range(light):
  gen = models.Generator(ch=4, n_res=2, img_size=32, light=light)
  z = normal(0, (2, 8, 8, 8)) * 5
  params = jax.jit(gen.init)(jax.random.PRNGKey(1), z)
  img = gen.apply(params, z)
  assert img.shape == (2, 32, 32, 3)
  assert float(jnp.abs(img).max()) <= 1.0 and float(img.std()) > 0
  if not light:
    assert params["params"]["FC_0"]["kernel"].shape == (16 * 8 * 8, 16)


def test_full_generator_flattens_in_pytorch_chw_order():
  gen = models.Generator(ch=2, n_res=1, img_size=8, light=False)
  z = normal(0, (1, 2, 2, 4))
  params = flax.core.unfreeze(jax.jit(gen.init)(jax.random.PRNGKey(1), z))
  # Make FC_0 read a single input row: only feature index k of the flattened vector matters.
  x = layers.ILN().apply({"params": params["params"]["UpBlock0_2"]},
                         layers.Conv(8, 3, pad=1).apply({"params": params["params"]["UpBlock0_1"]}, z))
  x = jax.nn.relu(x)
  chw = np.asarray(jnp.transpose(x, (0, 3, 1, 2)).reshape(-1))
  k = 5  # in CHW order: channel 1, row 0, column 1
  kernel = np.zeros_like(params["params"]["FC_0"]["kernel"])
  kernel[k, 0] = 1.0
  params["params"]["FC_0"]["kernel"] = jnp.asarray(kernel)
  _, state = gen.apply(params, z, capture_intermediates=True, mutable=["intermediates"])
  fc0 = state["intermediates"]["FC_0"]["__call__"][0]
  np.testing.assert_allclose(fc0[0, 0], chw[k], rtol=1e-6)


@pytest.mark.parametrize("n_dis,n_res", [(7, 6), (6, 4), (8, 1)])
def test_key_map_covers_every_variable_exactly_once(n_dis, n_res):
  img = 256 if n_dis == 8 else 64 * (n_dis - 5)
  disc = jax.eval_shape(models.Discriminator(ch=4, n_layers=n_dis).init, jax.random.PRNGKey(0),
                        jnp.zeros((1, img, img, 3)))
  gen = jax.eval_shape(models.Generator(ch=4, n_res=n_res, img_size=64).init, jax.random.PRNGKey(0),
                       jnp.zeros((1, 16, 16, 8)))
  for variables, table in ((disc, param_map.discriminator_key_map(n_dis)),
                           (gen, param_map.generator_key_map(n_res))):
    ours = {(col,) + tuple(k.key for k in path)
            for col, tree in variables.items()
            for path, _ in jax.tree_util.tree_leaves_with_path(tree)}
    mapped = [(col,) + path for col, path, _ in table.values()]
    assert len(mapped) == len(set(mapped))
    assert set(mapped) == ours
  assert len(param_map.discriminator_key_map(7)) == 1 + 3 + 2 + 4 * 7 + 2 * 3
