"""The convolution algorithms (nicegan_jax/convolutions.py): each equals XLA's own convolution, with its
gradients, and is picked only where its size rule says."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from conftest import normal
from nicegan_jax import config_lib, convolutions, layers

POLICY = convolutions.CpuPolicy()


@pytest.mark.parametrize("size,features_in,features,kernel,stride,pad", [
    (16, 8, 16, 3, 1, 1), (33, 3, 16, 4, 2, 1), (16, 16, 32, 4, 1, 1), (8, 16, 16, 1, 1, 0),
    (7, 16, 32, 4, 2, 1), (32, 8, 16, 3, 1, 1),  # maps up to 20x20 (padded) take the matmul input grad
    (12, 32, 3, 7, 1, 3), (9, 32, 1, 4, 1, 1),  # narrow convs: conv_narrow (output taps, XLA's gradients)
    (12, 16, 3, 7, 1, 3),  # narrow, from too few inputs for output taps: conv_padded, XLA's gradients
    (3, 8, 16, 3, 1, 1),  # under 8x8 outputs: XLA's unpadded conv forward, tap-matmul kernel gradient
    (12, 32, 16, 3, 1, 1), (13, 32, 32, 4, 2, 1),  # few kernel columns: the forward as output taps
    (6, 256, 16, 3, 1, 1), (8, 256, 32, 4, 2, 1),  # 256 inputs: the forward as tap matmuls too
    (31, 128, 128, 3, 1, 1)])  # a wide 3x3 conv over 2 x 16 x 16 tiles: Winograd, forward and gradients
def test_cpu_convolutions_equal_xla_with_their_gradients(size, features_in, features, kernel, stride, pad):
  # A plain conv layer: spectral norm's backward takes a rank-one projection off the kernel gradient, a
  # cancellation that enlarges any difference in summation order (on an AVX2 machine, 12-32-16-3's kernel
  # gradients differed by 2.0e-5 of the max with it, 2.7e-7 without). The normalised kernel reaches the
  # algorithms as any kernel does.
  x = normal(0, (2, size, size, features_in))
  layer = lambda impl: layers.Conv(features, kernel, stride=stride, pad=pad,
                                   conv=convolutions.for_impl(impl))
  reference = layer("xla")
  variables = jax.jit(reference.init)(jax.random.PRNGKey(1), x)  # the algorithm is not a variable
  target = normal(2, jax.eval_shape(reference.apply, variables, x).shape)

  def grads(impl):
    conv = layer(impl)
    loss = lambda p, x: jnp.sum(conv.apply({**variables, "params": p}, x) * target)
    return jax.jit(conv.apply)(variables, x), jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], x)

  (xla_y, (xla_params, xla_x)), (mm_y, (mm_params, mm_x)) = grads("xla"), grads("cpu")
  np.testing.assert_allclose(mm_y, xla_y, rtol=1e-5, atol=1e-5 * float(np.abs(xla_y).max()))
  # Sums in another order: equal to float32 rounding of the largest terms (1e-5 of each array's max).
  for a, b in zip(jax.tree.leaves((mm_x, mm_params)), jax.tree.leaves((xla_x, xla_params))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


@pytest.mark.parametrize("size,kernel,stride", [(13, 7, 1), (12, 4, 2), (9, 3, 3)])
def test_conv_narrow_equals_xla_with_its_gradients(size, kernel, stride):
  # The shifted sums must pick every tap's outputs at the strided positions, and the gradients are XLA's.
  x = normal(0, (3, size, size, 8))
  w = normal(1, (kernel, kernel, 8, 3))
  y = convolutions.conv_valid(x, w, stride)
  dy = normal(2, y.shape)
  narrow_y, narrow_vjp = jax.vjp(lambda x, w: convolutions.conv_narrow(x, w, stride), x, w)
  _, xla_vjp = jax.vjp(lambda x, w: convolutions.conv_valid(x, w, stride), x, w)
  np.testing.assert_allclose(narrow_y, y, rtol=1e-5, atol=1e-5 * float(np.abs(y).max()))
  for a, b in zip(narrow_vjp(dy), xla_vjp(dy)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(np.abs(b).max()))


@pytest.mark.parametrize("batch,size,features_in,features,kernel,expected", [
    (8, 70, 64, 3, 7, True), (8, 17, 512, 1, 4, True), (1, 66, 128, 64, 3, True), (4, 34, 32, 32, 4, True),
    (1, 18, 256, 128, 3, False), (1, 66, 3, 32, 4, False), (1, 70, 16, 3, 7, False),
    (1, 16, 128, 256, 1, False),
    # A large matmul result (batch x positions x columns > 2^23) where the padded conv applies: padded.
    (8, 134, 64, 3, 7, False), (8, 66, 128, 64, 3, False), (1, 262, 64, 3, 7, False)])
def test_output_taps_forward_for_kernels_with_few_columns(batch, size, features_in, features, kernel, expected):
  # At most 576 columns (outputs x kh x kw), from at least 32 inputs, never a 1x1 conv, and only while
  # the matmul's result is small where `conv_padded` is the alternative.
  x = jnp.zeros((batch, size, size, features_in))
  weights = jnp.zeros((kernel, kernel, features_in, features))
  assert convolutions._uses_output_taps_forward(x, weights, 1, POLICY) == expected


@pytest.mark.parametrize("batch,size,features_in,kernel,stride,expected", [
    (8, 6, 1024, 4, 1, True), (1, 9, 256, 3, 1, True), (1, 18, 128, 3, 1, False),
    (1, 66, 256, 4, 2, True), (8, 34, 256, 4, 2, True), (1, 130, 256, 4, 2, False),
    # stride 1 onto 8x8 outputs or more: conv_padded instead
    (1, 10, 256, 3, 1, False), (1, 18, 256, 3, 1, False), (8, 18, 512, 4, 1, False)])
def test_taps_forward_where_xla_cpu_is_slower(batch, size, features_in, kernel, stride, expected):
  # From 256+ channels onto maps of at most 32x32 outputs (66 -> 32 at stride 2), whatever the batch,
  # at stride 1 only under 8x8 outputs.
  x = jnp.zeros((batch, size, size, features_in))
  assert convolutions._uses_taps_forward(x, jnp.zeros((kernel, kernel, features_in, 64)), stride, POLICY) == expected


@pytest.mark.parametrize("size,kernel,stride", [(10, 3, 1), (13, 7, 1), (11, 4, 2), (12, 3, 3)])
def test_conv_padded_equals_xla_unpadded_conv_with_its_gradients(size, kernel, stride):
  # The zero row below the input must only ever reach the dropped output row.
  x = normal(0, (2, size, size + 1, 5))
  w = normal(1, (kernel, kernel, 5, 6))
  y, valid_vjp = jax.vjp(lambda x, w: convolutions.conv_valid(x, w, stride), x, w)
  padded_y, padded_vjp = jax.vjp(lambda x, w: convolutions.conv_padded(x, w, stride), x, w)
  assert padded_y.shape == y.shape
  np.testing.assert_allclose(padded_y, y, rtol=1e-6, atol=1e-6 * float(np.abs(y).max()))
  dy = normal(2, y.shape)
  for a, b in zip(padded_vjp(dy), valid_vjp(dy)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(np.abs(b).max()))


@pytest.mark.parametrize("size,kernel,stride,expected", [
    (10, 3, 1, True), (9, 3, 1, False), (16, 1, 1, False), (34, 4, 2, False)])
def test_conv_padded_for_stride_1_kernels_onto_8x8_outputs_or_more(size, kernel, stride, expected):
  x = jnp.zeros((1, size, size, 4))
  assert convolutions._uses_padded(x, jnp.zeros((kernel, kernel, 4, 4)), stride, POLICY) == expected


@pytest.mark.parametrize("height,width", [(18, 18), (9, 12), (3, 3), (7, 8)])
def test_conv_winograd_equals_xla_conv_with_its_gradients(height, width):
  # Even and odd output sizes (an odd one runs on one zero row or column more, whose outputs are dropped);
  # every tile position and both gradients, against XLA's convolution.
  x = normal(0, (3, height, width, 6))
  w = normal(1, (3, 3, 6, 5))
  y, xla_vjp = jax.vjp(lambda x, w: convolutions.conv_valid(x, w, 1), x, w)
  winograd_y, winograd_vjp = jax.vjp(convolutions.conv_winograd, x, w)
  assert winograd_y.shape == y.shape
  # The transforms add up to 4 terms twice over: float32 rounding of a few times each array's max.
  np.testing.assert_allclose(winograd_y, y, rtol=1e-5, atol=1e-6 * float(np.abs(y).max()))
  dy = normal(2, y.shape)
  for a, b in zip(winograd_vjp(dy), xla_vjp(dy)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()))


def test_conv_winograd_refuses_other_kernel_sizes():
  with pytest.raises(ValueError, match="3x3"):
    convolutions.conv_winograd(jnp.zeros((1, 8, 8, 2)), jnp.zeros((4, 4, 2, 2)))


@pytest.mark.parametrize("batch,size,features_in,features,kernel,stride,dtype,expected", [
    (8, 18, 256, 256, 3, 1, jnp.float32, True), (4, 18, 128, 128, 3, 1, jnp.float32, True),
    (1, 34, 128, 256, 3, 1, jnp.float32, True), (1, 33, 128, 128, 3, 1, jnp.float32, True),
    (1, 18, 256, 256, 3, 1, jnp.float32, False),  # 64 tiles: too few
    (8, 18, 64, 256, 3, 1, jnp.float32, False), (8, 18, 256, 64, 3, 1, jnp.float32, False),  # too narrow
    (8, 18, 256, 256, 4, 1, jnp.float32, False), (8, 34, 256, 256, 3, 2, jnp.float32, False),
    (8, 18, 256, 256, 3, 1, jnp.bfloat16, False)])
def test_winograd_for_wide_3x3_stride_1_convs_over_enough_tiles(batch, size, features_in, features, kernel,
                                                                 stride, dtype, expected):
  x = jnp.zeros((batch, size, size, features_in), dtype)
  kernel_array = jnp.zeros((kernel, kernel, features_in, features), dtype)
  assert convolutions._uses_winograd(x, kernel_array, stride, POLICY) == expected


def test_conv_impl_auto_is_cpu_on_cpus_only_and_checked():
  assert convolutions.resolve("auto", "cpu") == "cpu"
  assert convolutions.resolve("auto", "gpu") == "xla" and convolutions.resolve("auto", "tpu") == "xla"
  assert convolutions.resolve("xla", "cpu") == "xla"
  assert convolutions.for_impl("xla") is convolutions.conv_valid
  assert convolutions.for_impl("cpu") == convolutions.CpuConvolutions()  # equal, hashable: static in jit
  assert hash(convolutions.for_impl("cpu")) == hash(convolutions.CpuConvolutions())
  config = test_config.get_config()
  config.data.path = "."
  config.model.conv_impl = "fast"
  with pytest.raises(config_lib.ConfigError, match="model.conv_impl"):
    config_lib.validate(config)


def test_a_policy_switches_off_exactly_the_named_paths():
  wide = (jnp.zeros((8, 18, 18, 256)), jnp.zeros((3, 3, 256, 256)), 1)
  assert convolutions._uses_winograd(*wide, POLICY)
  no_winograd = POLICY.without("winograd")
  assert not convolutions._uses_winograd(*wide, no_winograd)
  assert convolutions._uses_padded(*wide, no_winograd)  # the next path for it, untouched
  assert not convolutions._uses_padded(*wide, POLICY.without("padded", "winograd"))
  with pytest.raises(ValueError, match="unknown CPU path"):
    POLICY.without("fast")
  for path, fields in convolutions.CPU_PATHS.items():  # each path names fields the policy has
    assert set(fields) <= {f.name for f in dataclasses.fields(convolutions.CpuPolicy)}, path
