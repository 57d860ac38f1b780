"""patch_diffusion/models/layers.py: the fast forms of GroupNorm and small convolutions equal the textbook ones.

(Whole-network parity with the official code is tests/test_models.py; these pin the two rewrites alone,
gradients included, on the shapes where they differ most: odd sizes, padding larger than the map.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patch_diffusion.models import layers


def _textbook_group_norm(x, scale, bias, groups, eps):
  c = x.shape[-1]
  xg = x.reshape(x.shape[:-1] + (groups, c // groups))
  axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
  mean = xg.mean(axis=axes, keepdims=True)
  var = jnp.square(xg - mean).mean(axis=axes, keepdims=True)
  return ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape) * scale + bias


@pytest.mark.parametrize("shape, groups", [((3, 5, 7, 16), 4), ((2, 4, 4, 32), 8), ((2, 1, 1, 8), 2)])
def test_group_norm_and_its_gradient_equal_the_textbook_form(shape, groups):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape) * 3 + 1, jnp.float32)
  scale, bias = (jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32) for _ in range(2))
  w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  ours = lambda *a: layers.group_norm(*a, groups, 1e-5)  # noqa: E731
  ref = lambda *a: _textbook_group_norm(*a, groups, 1e-5)  # noqa: E731
  np.testing.assert_allclose(ours(x, scale, bias), ref(x, scale, bias), atol=1e-5)
  g_ours = jax.grad(lambda *a: (ours(*a) * w).sum(), (0, 1, 2))(x, scale, bias)
  g_ref = jax.grad(lambda *a: (ref(*a) * w).sum(), (0, 1, 2))(x, scale, bias)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


def test_group_norm_keeps_the_input_dtype_with_float32_statistics():
  x = jnp.full((2, 4, 4, 8), 512.0, jnp.bfloat16).at[:, 0, 0, :].set(516.0)  # both exact in bfloat16
  y = layers.group_norm(x, jnp.ones(8), jnp.zeros(8), 2, 1e-5)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32)[0, 0, 0, 0], 3.873, atol=0.02)  # sqrt(15)


@pytest.mark.parametrize("hw, k, padding", [((1, 1), 3, 1), ((2, 2), 3, 1), ((4, 4), 3, 1), ((5, 3), 3, 1),
                                            ((6, 6), 3, 2), ((4, 4), 3, 0), ((3, 3), 1, 0)])
def test_im2col_convolution_and_its_gradients_equal_the_convolution(hw, k, padding):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, *hw, 8)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((k, k, 8, 4)), jnp.float32)

  def conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), [(padding, padding)] * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  np.testing.assert_allclose(layers._conv_im2col(x, kernel, padding), conv(x, kernel), atol=2e-5)
  for a, b in zip(jax.grad(lambda *a: (layers._conv_im2col(*a, padding) ** 2).sum(), (0, 1))(x, kernel),
                  jax.grad(lambda *a: (conv(*a) ** 2).sum(), (0, 1))(x, kernel)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3)


def test_conv_takes_the_matmul_form_on_small_maps_only():
  x_small, x_big = jnp.ones((1, 2, 2, 8)), jnp.ones((1, 4, 4, 8))  # 4 output positions: the limit
  kernel = jnp.ones((3, 3, 8, 8))
  text = lambda x: jax.jit(lambda x: layers._conv(x, kernel, 1)).lower(x).as_text()  # noqa: E731
  assert "convolution" not in text(x_small) and "dot_general" in text(x_small)
  assert "convolution" in text(x_big)


@pytest.mark.parametrize("hw, k, padding", [((8, 8), 3, 1), ((7, 5), 3, 0), ((6, 6), 3, 2), ((4, 4), 1, 0),
                                            ((4, 6), 1, 1)])
def test_conv_gradients_written_as_nhwc_convolutions_equal_autodiff(hw, k, padding):
  """The hand-written VJP (input gradient: flipped kernel; kernel gradient: images as features) gives
  autodiff's gradients, padding wider than the kernel (a cropping input gradient) included."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((3, *hw, 5)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((k, k, 5, 4)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, hw[0] + 2 * padding - k + 1, hw[1] + 2 * padding - k + 1, 4)), jnp.float32)
  ours = jax.grad(lambda *a: (layers._conv_nhwc_grads(*a, padding) * w).sum(), (0, 1))(x, kernel)
  ref = jax.grad(lambda *a: (layers._xla_conv(*a, (padding, padding)) * w).sum(), (0, 1))(x, kernel)
  for a, b in zip(ours, ref):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("taps, padding", [((1, 3, 3, 1), 1), ((1, 3, 3, 1), 0), ((1, 2, 1), 1), ((1, 1), 1)])
def test_fir_resampling_on_cpu_is_elementwise_and_equals_the_grouped_convolution(taps, padding):
  """On CPU, FIR up/downsampling (NCSN++'s [1,3,3,1]) runs as separable shifted slices, not as XLA:CPU's
  slow grouped convolution: same values and gradients as EDM's grouped (transposed) convolution, odd
  sizes included, and neither the function nor its gradient compiles to a convolution."""
  assert jax.default_backend() == "cpu"
  rng = np.random.default_rng(3)
  f2d = layers.resample_filter_2d(taps)
  k = len(taps)
  cases = [(layers.downsample, lambda x: layers._depthwise(x, f2d, stride=2, padding=padding)),
           (layers.upsample, lambda x: layers._depthwise(x, (4 * f2d)[::-1, ::-1].copy(), stride=1,
                                                         padding=k - 1 - padding, lhs_dilation=2))]
  for hw in ((8, 8), (7, 9)):
    x = jnp.asarray(rng.standard_normal((2, *hw, 3)), jnp.float32)
    for fn, grouped_conv in cases:
      ours = fn(x, taps, padding)
      ref = grouped_conv(x)
      assert ours.shape == ref.shape
      np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
      w = jnp.asarray(rng.standard_normal(ref.shape), jnp.float32)
      grad = jax.jit(jax.grad(lambda x: (fn(x, taps, padding) * w).sum()))
      np.testing.assert_allclose(grad(x), jax.grad(lambda x: (grouped_conv(x) * w).sum())(x), rtol=1e-5, atol=1e-6)
      assert "convolution(" not in grad.lower(x).compile().as_text()


def test_forward_mode_autodiff_through_conv_after_switching_the_cpu_gradients_off(monkeypatch):
  x, kernel = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 2))
  with pytest.raises(TypeError, match="custom_vjp"):
    jax.jvp(lambda x: layers._conv(x, kernel, 1), (x,), (x,))
  monkeypatch.setattr(layers, "NHWC_GRADIENTS_ON_CPU", False)
  _, tangent = jax.jvp(lambda x: layers._conv(x, kernel, 1), (x,), (x,))
  np.testing.assert_allclose(tangent, layers._xla_conv(x, kernel, (1, 1)))
