"""Building blocks of the EDM networks (Karras et al. 2022, `training/networks.py`) in Flax Linen, NHWC.

Every layer reproduces the arithmetic of its PyTorch counterpart exactly (up to float rounding), so
that PyTorch checkpoints map one-to-one onto these modules (see ``torch_mapping.py``):

* ``Linear``  — ``kernel`` [in, out] (PyTorch ``weight`` [out, in] transposed), optional ``bias``.
* ``Conv2d``  — ``kernel`` [kh, kw, in, out] (PyTorch [out, in, kh, kw]), optional ``bias``, optional
  2× up/down resampling with a fixed separable FIR filter (EDM's ``resample_filter`` buffer, which is a
  constant here, not a variable), including EDM's fused resample paths and their padding rules.
* ``GroupNorm`` — ``num_groups = min(32, C // 4)``, statistics in float32; ``scale``, ``bias``.
* ``UNetBlock`` — the union of the DDPM++, NCSN++ and ADM residual blocks (additive or adaptive
  scale/shift embedding, dropout, skip projection, multi-head self-attention).
* ``PositionalEmbedding`` / ``FourierEmbedding`` — noise-level embeddings; the Fourier frequencies live
  in the non-trainable ``'buffers'`` variable collection.

Parameters are created in float32; the ``dtype`` attribute (or the input's dtype) is the compute dtype.
Initialisers follow EDM's ``weight_init`` (xavier/kaiming, uniform/normal) with the same fan-in/fan-out
and the same ``init_weight``/``init_bias`` factors, so training from scratch starts from the same
distribution as EDM.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Iterator, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


# ------------------------------------------------------------------------------------------------
# Initialisation.


@dataclasses.dataclass(frozen=True)
class Init:
  """EDM's weight-initialisation recipe: ``weight_init(mode) * weight`` and ``weight_init(mode) * bias``.

  Attributes:
    mode: 'xavier_uniform' | 'xavier_normal' | 'kaiming_uniform' | 'kaiming_normal'.
    weight: factor applied to the weight draw (EDM ``init_weight``).
    bias: factor applied to the bias draw (EDM ``init_bias``; 0 gives zero biases).
  """
  mode: str = "kaiming_normal"
  weight: float = 1.0
  bias: float = 0.0


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How one variable is initialised: ``scale * U(-1, 1)``, ``scale * N(0, 1)`` or the constant ``scale``."""
  kind: str  # 'uniform' | 'normal' | 'const'
  scale: float


_RECIPES: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("edm_init_recipes", default=None)


@contextlib.contextmanager
def recording_recipes() -> Iterator[dict]:
  """Collects ``{(collection, *module_path, name): Recipe}`` for every variable created inside.

  ``registry.init_params`` traces ``model.init`` under this context (shapes only) and then draws every
  random variable from one uniform and one normal pool, which compiles in a fraction of the time of
  one threefry draw per variable.
  """
  recipes: dict = {}
  token = _RECIPES.set(recipes)
  try:
    yield recipes
  finally:
    _RECIPES.reset(token)


def edm_recipe(mode: str, fan_in: int, fan_out: int, factor: float) -> Recipe:
  """EDM's ``weight_init(shape, mode, fan_in, fan_out) * factor`` as a ``Recipe``.

  The fans are those of the PyTorch layer (conv: channels × kernel area), independent of the layout of
  the Flax array, so a Flax kernel and its PyTorch counterpart have the same distribution.
  """
  if mode == "xavier_uniform":
    recipe = Recipe("uniform", math.sqrt(6.0 / (fan_in + fan_out)))
  elif mode == "xavier_normal":
    recipe = Recipe("normal", math.sqrt(2.0 / (fan_in + fan_out)))
  elif mode == "kaiming_uniform":
    recipe = Recipe("uniform", math.sqrt(3.0 / fan_in))
  elif mode == "kaiming_normal":
    recipe = Recipe("normal", math.sqrt(1.0 / fan_in))
  else:
    raise ValueError(f'invalid init mode "{mode}"')
  if factor == 0:
    return Recipe("const", 0.0)
  return Recipe(recipe.kind, recipe.scale * factor)


def recipe_initializer(recipe: Recipe):
  """A Flax initializer ``init(key, shape, dtype)`` drawing from ``recipe``."""

  def init(key, shape, dtype=jnp.float32):
    if recipe.kind == "const":
      return jnp.full(shape, recipe.scale, dtype)
    if recipe.kind == "uniform":
      draw = jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0)
    else:
      draw = jax.random.normal(key, shape, jnp.float32)
    return (draw * recipe.scale).astype(dtype)

  return init


def make_param(module: nn.Module, name: str, recipe: Recipe, shape: tuple[int, ...]) -> Array:
  """``module.param(name, ...)`` in float32, recording ``recipe`` when ``recording_recipes`` is active."""
  recipes = _RECIPES.get()
  if recipes is not None:
    recipes[("params",) + tuple(module.scope.path) + (name,)] = recipe
  return module.param(name, recipe_initializer(recipe), shape, jnp.float32)


# ------------------------------------------------------------------------------------------------
# Resampling helpers (NHWC).


def resample_filter_2d(taps: Sequence[float]) -> np.ndarray:
  """EDM's 2-D resampling filter ``outer(f, f) / sum(f)**2`` as a float32 [k, k] array."""
  f = np.asarray(taps, dtype=np.float32)
  return np.outer(f, f) / np.square(f.sum())


def _is_box2(taps: Sequence[float]) -> bool:
  return len(taps) == 2 and float(taps[0]) == float(taps[1]) and float(taps[0]) != 0


def _depthwise(x: Array, f2d: np.ndarray, *, stride: int, padding: int, lhs_dilation: int = 1) -> Array:
  """Depthwise 2-D correlation of every channel of ``x`` [N,H,W,C] with the same [k,k] filter."""
  c = x.shape[-1]
  k = jnp.asarray(np.tile(f2d[:, :, None, None], (1, 1, 1, c)), x.dtype)  # HWIO, I=1 per group
  return jax.lax.conv_general_dilated(
      x, k, window_strides=(stride, stride), padding=[(padding, padding)] * 2,
      lhs_dilation=(lhs_dilation, lhs_dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=c)


def _separable_fir(x: Array, taps: np.ndarray, *, stride: int, padding: int, lhs_dilation: int = 1) -> Array:
  """:func:`_depthwise` with the separable filter ``outer(taps, taps)``, as a 1-D filter along H, then W,
  each a sum of strided slices of the (zero-dilated, padded) input: elementwise code.

  Used on XLA:CPU, which has no fast kernel for grouped convolutions: at [64,16,16,64] the [1,3,3,1]
  upsampling convolution (lhs-dilated, grouped) took 535 ms forward, the downsampling one 138 ms with its
  gradient. Same products, summed in another order: agrees with the convolution to float32 rounding.
  """
  for axis in (1, 2):
    cfg = [(0, 0, 0)] * x.ndim
    cfg[axis] = (padding, padding, lhs_dilation - 1)
    xp = jax.lax.pad(x, jnp.zeros((), x.dtype), cfg)
    out = (xp.shape[axis] - len(taps)) // stride + 1
    terms = [float(w) * jax.lax.slice_in_dim(xp, i, i + stride * (out - 1) + 1, stride, axis)
             for i, w in enumerate(taps) if w != 0]
    x = functools.reduce(jnp.add, terms)
  return x


def downsample(x: Array, taps: Sequence[float], padding: int) -> Array:
  """``conv2d(x, f, groups=C, stride=2, padding=padding)`` of EDM with ``f = resample_filter_2d(taps)``."""
  h, w = x.shape[1], x.shape[2]
  if _is_box2(taps) and padding == 0 and h % 2 == 0 and w % 2 == 0:
    # The [1,1] filter is a 2x2 box average: a reshape + mean is exact and much cheaper than a
    # grouped convolution on accelerators.
    n, _, _, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  if jax.default_backend() == "cpu":
    t = np.asarray(taps, np.float64)
    return _separable_fir(x, t / t.sum(), stride=2, padding=padding)
  return _depthwise(x, resample_filter_2d(taps), stride=2, padding=padding)


def upsample(x: Array, taps: Sequence[float], padding: int) -> Array:
  """``conv_transpose2d(x, 4 f, groups=C, stride=2, padding=padding)`` of EDM (f = ``resample_filter_2d``).

  A stride-2 transposed convolution is a correlation of the 2×-dilated input with the flipped kernel,
  padded by ``k - 1 - padding`` on each side.
  """
  f = resample_filter_2d(taps) * 4.0
  k = f.shape[0]
  if _is_box2(taps) and padding == 0:
    # 4 * box filter = ones: every input pixel is copied to a 2x2 block (nearest upsampling).
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  if k - 1 - padding < 0:
    raise ValueError(f"transposed-convolution padding {padding} too large for a {k}-tap filter")
  if jax.default_backend() == "cpu":
    # 4 f = outer(2 t, 2 t) with t = taps / sum(taps).
    t = np.asarray(taps, np.float64)
    return _separable_fir(x, (2 * t / t.sum())[::-1], stride=1, padding=k - 1 - padding, lhs_dilation=2)
  return _depthwise(x, f[::-1, ::-1].copy(), stride=1, padding=k - 1 - padding, lhs_dilation=2)


#: XLA:CPU: convolutions over at most this many output positions (a 2×2 map: the lowest U-Net levels of a
#: 4-pixel patch) run as one matmul over their gathered taps (im2col). XLA:CPU's convolution kernels (and
#: above all their weight gradients) are slow on tiny maps. Measured on the demo network (2-core Xeon, two
#: CPU devices; README "Results and benchmarks"): up to 4 positions, patch-4 steps 223 → 126 ms; up to 16
#: (4×4 maps, the setting measured earlier on a 2-core AMD EPYC) made patch-16 steps slower again. Same
#: sums, other order: results agree to float32 rounding. Other backends keep the convolution.
IM2COL_MAX_POSITIONS = 4


def _conv_im2col(x: Array, kernel: Array, padding: int) -> Array:
  """``_conv`` as a matmul over the stacked shifted views of the padded input (taps whose window lies
  entirely in the zero padding add exact zeros and are skipped)."""
  k = kernel.shape[0]
  _, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  ho, wo = h + 2 * padding - k + 1, w + 2 * padding - k + 1

  def live(i, n_in, n_out):
    return i + n_out > padding and i < padding + n_in

  taps = [(i, j) for i in range(k) for j in range(k) if live(i, h, ho) and live(j, w, wo)]
  cols = jnp.concatenate([xp[:, i:i + ho, j:j + wo, :] for i, j in taps], axis=-1)
  return cols @ jnp.concatenate([kernel[i, j] for i, j in taps], axis=0)


def _xla_conv(x: Array, kernel: Array, padding: tuple[int, int]) -> Array:
  """Stride-1 correlation of ``x`` [B,H,W,F] with ``kernel`` [kh,kw,F,O], zero padding ``padding`` =
  (rows, columns) on both sides (negative crops), in the dimension order XLA:CPU runs as is (NHWC/HWIO)."""
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding=[(padding[0], padding[0]), (padding[1], padding[1])],
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_nhwc_grads(x: Array, kernel: Array, padding: int) -> Array:
  """``_xla_conv`` whose gradients are written as NHWC/HWIO convolutions too (see :func:`_conv`)."""
  return _xla_conv(x, kernel, (padding, padding))


def _conv_nhwc_grads_fwd(x, kernel, padding):
  return _xla_conv(x, kernel, (padding, padding)), (x, kernel)


def _conv_nhwc_grads_bwd(padding, residuals, g):
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  # Input gradient: g correlated with the spatially flipped kernel, in/out channels swapped.
  dx = _xla_conv(g, jnp.swapaxes(kernel[::-1, ::-1], 2, 3), (kh - 1 - padding, kw - 1 - padding))
  # Kernel gradient: dW[a,b,i,o] = Σ_{n,h,w} x_pad[n,h+a,w+b,i] g[n,h,w,o] is a correlation of x as
  # [Cin, H, W, N] (input channels as the batch, images as the features) with g as [Ho, Wo, N, Cout].
  dw = _xla_conv(jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(g, (1, 2, 0, 3)), (padding, padding))
  return dx, jnp.transpose(dw, (1, 2, 0, 3))


_conv_nhwc_grads.defvjp(_conv_nhwc_grads_fwd, _conv_nhwc_grads_bwd)


#: XLA:CPU: write convolution gradients out as NHWC/HWIO convolutions (:func:`_conv`). A ``custom_vjp``
#: has no forward-mode rule: set this to False before tracing to ``jax.jvp`` / ``jax.jacfwd`` through a
#: network on CPU (plain autodiff then, fast outside loops only).
NHWC_GRADIENTS_ON_CPU = True


def _conv(x: Array, kernel: Array, padding: int) -> Array:
  """Stride-1 'same'-style convolution of ``x`` [N,H,W,Cin] with ``kernel`` [k,k,Cin,Cout].

  On XLA:CPU the gradients are spelled out as convolutions in NHWC/HWIO order (:func:`_conv_nhwc_grads`):
  XLA:CPU rewrites other dimension orders into that one (its fast Eigen kernels) only for convolutions
  at the top level of a computation, so the gradient convolutions autodiff emits inside a loop body
  (``lax.scan`` over gradient-accumulation micro-batches) fell back to a naive loop nest: 33× slower
  steps with ``train.grad_accum_steps = 2`` (demo network, patch 16). Same sums; at the top level XLA
  emits the same transposes and kernels as its own rewrite. Forward-mode autodiff: see
  :data:`NHWC_GRADIENTS_ON_CPU`.
  """
  out_positions = (x.shape[1] + 2 * padding - kernel.shape[0] + 1) * (x.shape[2] + 2 * padding - kernel.shape[1] + 1)
  if jax.default_backend() == "cpu":
    if kernel.shape[0] > 1 and out_positions <= IM2COL_MAX_POSITIONS:
      return _conv_im2col(x, kernel, padding)
    if NHWC_GRADIENTS_ON_CPU:
      return _conv_nhwc_grads(x, kernel, padding)
  return _xla_conv(x, kernel, (padding, padding))


# ------------------------------------------------------------------------------------------------
# Layers.


class Linear(nn.Module):
  """Fully connected layer ``x @ kernel + bias``; computes in the input's dtype.

  Attributes:
    features: output features.
    use_bias: whether to add a bias.
    init: initialisation recipe (EDM defaults: kaiming_normal, weight 1, bias 0).
  """
  features: int
  use_bias: bool = True
  init: Init = Init()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps ``x`` [..., in] to [..., features] in ``x.dtype``."""
    fan_in, fan_out = x.shape[-1], self.features
    kernel = make_param(self, "kernel", edm_recipe(self.init.mode, fan_in, fan_out, self.init.weight),
                        (fan_in, fan_out))
    y = x @ kernel.astype(x.dtype)
    if self.use_bias:
      bias = make_param(self, "bias", edm_recipe(self.init.mode, fan_in, fan_out, self.init.bias),
                        (fan_out,))
      y = y + bias.astype(x.dtype)
    return y


class Conv2d(nn.Module):
  """EDM's convolution with optional 2× up/down resampling; NHWC, computes in the input's dtype.

  ``kernel == 0`` gives a parameter-free resampler. Resampling uses the fixed FIR filter
  ``outer(f, f) / sum(f)**2`` (``f = resample_filter``); the non-fused path resamples first, then
  convolves; the fused paths (``fused_resample``, used by NCSN++'s residual encoder) follow EDM's padding
  rules exactly. The fused *up* path uses the corrected padding of the Patch Diffusion code
  (``max(f_pad - w_pad, 0)`` / ``max(w_pad - f_pad, 0)``), which keeps the output at 2H; no released
  network uses it.

  Attributes:
    features: output channels.
    kernel: square kernel size, 0 for none.
    use_bias: whether to add a bias (only with a kernel).
    up, down: 2× upsampling or downsampling (not both).
    resample_filter: 1-D filter taps, e.g. (1, 1) or (1, 3, 3, 1).
    fused_resample: EDM's fused conv+resample order.
    init: initialisation recipe.
  """
  features: int
  kernel: int
  use_bias: bool = True
  up: bool = False
  down: bool = False
  resample_filter: Sequence[float] = (1, 1)
  fused_resample: bool = False
  init: Init = Init()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps ``x`` [N,H,W,in] to [N,H',W',features] (H' = 2H, H/2 or H)."""
    if self.up and self.down:
      raise ValueError("Conv2d cannot both upsample and downsample")
    cin = x.shape[-1]
    k = self.kernel
    w = b = None
    if k:
      fan_in, fan_out = cin * k * k, self.features * k * k
      w = make_param(self, "kernel", edm_recipe(self.init.mode, fan_in, fan_out, self.init.weight),
                     (k, k, cin, self.features)).astype(x.dtype)
      if self.use_bias:
        b = make_param(self, "bias", edm_recipe(self.init.mode, fan_in, fan_out, self.init.bias),
                       (self.features,)).astype(x.dtype)
    elif cin != self.features:
      raise ValueError(f"a kernel-free Conv2d cannot change channels ({cin} -> {self.features})")
    taps = tuple(self.resample_filter)
    if self.up or self.down:
      # Lets torch_mapping find the PyTorch `resample_filter` buffers (only recorded when the
      # 'intermediates' collection is mutable, e.g. during init; free otherwise).
      self.sow("intermediates", "resample_filter", jnp.zeros((), jnp.float32))
    w_pad = k // 2 if k else 0
    f_pad = (len(taps) - 1) // 2 if (self.up or self.down) else 0

    if self.fused_resample and self.up and w is not None:
      x = upsample(x, taps, padding=max(f_pad - w_pad, 0))
      x = _conv(x, w, padding=max(w_pad - f_pad, 0))
    elif self.fused_resample and self.down and w is not None:
      x = _conv(x, w, padding=w_pad + f_pad)
      x = downsample(x, taps, padding=0)
    else:
      if self.up:
        x = upsample(x, taps, padding=f_pad)
      if self.down:
        x = downsample(x, taps, padding=f_pad)
      if w is not None:
        x = _conv(x, w, padding=w_pad)
    if b is not None:
      x = x + b
    return x


def _group_sums(v: Array, groups: int) -> Array:
  """Per-(sample, group) sums of ``v`` [N, P, C] (P positions) -> [N, G]: over positions first (a column
  reduction, C contiguous), then over each group's C/G channels; reducing a [N, P, G, C/G] view directly
  is about 4× slower on XLA:CPU (strided inner loop)."""
  n, _, c = v.shape
  return v.sum(axis=1).reshape(n, groups, c // groups).sum(axis=-1)


def _per_channel(v: Array, channels: int) -> Array:
  """[N, G] -> [N, 1, C]: each group's value repeated over its channels."""
  return jnp.repeat(v, channels // v.shape[1], axis=1)[:, None, :]


def _group_norm_fwd(x: Array, scale: Array, bias: Array, groups: int, eps: float):
  _, p, c = x.shape
  count = p * (c // groups)
  mean = _group_sums(x, groups) / count
  centered = x - _per_channel(mean, c)
  rstd = jax.lax.rsqrt(_group_sums(jnp.square(centered), groups) / count + eps)
  return centered * _per_channel(rstd, c) * scale + bias, (x, mean, rstd, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _group_norm(x: Array, scale: Array, bias: Array, groups: int, eps: float) -> Array:
  return _group_norm_fwd(x, scale, bias, groups, eps)[0]


def _group_norm_bwd(groups: int, eps: float, res, dy: Array):
  """Exact gradient in three passes over the activations. With x̂ = (x − μ)·r, y = x̂·γ + β and M
  elements per group: dx = r·(γ·dy − mean_g(γ·dy) − x̂·mean_g(γ·dy·x̂)), dγ = Σ dy·x̂, dβ = Σ dy."""
  del eps
  x, mean, rstd, scale = res
  n, p, c = x.shape
  count = p * (c // groups)
  xhat = (x - _per_channel(mean, c)) * _per_channel(rstd, c)
  dy_sum = dy.sum(axis=1)                   # [N, C]
  dyx_sum = (dy * xhat).sum(axis=1)         # [N, C]
  a = (dy_sum * scale).reshape(n, groups, -1).sum(-1) / count
  b = (dyx_sum * scale).reshape(n, groups, -1).sum(-1) / count
  dx = _per_channel(rstd, c) * (dy * scale - _per_channel(a, c) - xhat * _per_channel(b, c))
  return dx, dyx_sum.sum(axis=0), dy_sum.sum(axis=0)


_group_norm.defvjp(lambda x, s, b, g, e: _group_norm_fwd(x, s, b, g, e), _group_norm_bwd)


def group_norm(x: Array, scale: Array, bias: Array, groups: int, eps: float) -> Array:
  """Group normalisation of ``x`` [N, ..., C] (channels last) with float32 statistics (mean, then the
  biased variance of the centred values); output in ``x.dtype``. ``scale``/``bias``: [C]; channel c is
  in group c // (C / G), as in PyTorch.

  The backward pass is written out (``_group_norm_bwd``): XLA's derivative of the reshaped form takes
  about twice as many passes over the activations; the demo's patch-16 step is 1.15× faster on XLA:CPU.
  """
  shape = x.shape
  x32 = x.astype(jnp.float32).reshape(shape[0], -1, shape[-1])
  y = _group_norm(x32, scale.astype(jnp.float32), bias.astype(jnp.float32), groups, float(eps))
  return y.reshape(shape).astype(x.dtype)


class GroupNorm(nn.Module):
  """Group normalisation with EDM's group count ``min(num_groups, C // min_channels_per_group)``.

  Statistics (biased variance) are computed in float32 whatever the input dtype; the output has the
  input's dtype. Channel ``c`` belongs to group ``c // (C / G)``, as in PyTorch.
  """
  num_groups: int = 32
  min_channels_per_group: int = 4
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Normalises ``x`` [N,H,W,C] per sample and group."""
    c = x.shape[-1]
    g = min(self.num_groups, c // self.min_channels_per_group)
    if g < 1 or c % g:
      raise ValueError(f"GroupNorm: {c} channels cannot be split into {g} groups")
    scale = make_param(self, "scale", Recipe("const", 1.0), (c,))
    bias = make_param(self, "bias", Recipe("const", 0.0), (c,))
    return group_norm(x, scale, bias, g, self.eps)


class PositionalEmbedding(nn.Module):
  """Sinusoidal embedding ``[cos(x f), sin(x f)]``, ``f_i = (1/max_positions)^(i / (n/2 - endpoint))``."""
  num_channels: int
  max_positions: int = 10000
  endpoint: bool = False

  def __call__(self, x: Array) -> Array:
    """Maps ``x`` [N] (float32 noise labels) to [N, num_channels] float32."""
    half = self.num_channels // 2
    freqs = np.arange(half, dtype=np.float32) / (half - (1 if self.endpoint else 0))
    freqs = (1.0 / self.max_positions) ** freqs
    x = jnp.outer(x.astype(jnp.float32), jnp.asarray(freqs, jnp.float32))
    return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


class FourierEmbedding(nn.Module):
  """Random Fourier features ``[cos(2π x f), sin(2π x f)]`` with fixed ``f ~ N(0, scale²)`` (NCSN++).

  The frequencies are a non-trainable variable ``buffers/.../freqs`` [num_channels // 2], drawn from
  the ``'params'`` RNG at init and loaded from checkpoints (PyTorch ``map_noise.freqs``).
  """
  num_channels: int
  scale: float = 16.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps ``x`` [N] (float32 noise labels) to [N, num_channels] float32."""
    recipe = Recipe("normal", float(self.scale))
    recipes = _RECIPES.get()
    if recipes is not None:
      recipes[("buffers",) + tuple(self.scope.path) + ("freqs",)] = recipe
    freqs = self.variable("buffers", "freqs", lambda: recipe_initializer(recipe)(
        self.make_rng("params"), (self.num_channels // 2,), jnp.float32))
    x = jnp.outer(x.astype(jnp.float32), (2 * np.pi) * freqs.value.astype(jnp.float32))
    return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


class UNetBlock(nn.Module):
  """EDM's unified U-Net block (DDPM++, NCSN++ and ADM residual blocks with optional attention).

  ``x -> conv0(silu(norm0(x)))``, embedding added (``adaptive_scale=False``: ``norm1(x + affine(emb))``)
  or applied as scale/shift (``silu(shift + norm1(x) * (scale + 1))``), dropout, ``conv1``, residual
  (``skip`` conv when channels change or when resampling; a 1×1 projection if ``resample_proj`` or the
  channels change, a bare resampler otherwise), times ``skip_scale``; then optional self-attention with
  ``num_heads`` heads (or ``out_channels // channels_per_head``), softmax in float32, again times
  ``skip_scale``. Its GroupNorms use ``min(num_groups, C // 4)`` groups (EDM: 32; the multi-stage code's
  layers: 16).

  Attributes mirror the PyTorch constructor; ``init``/``init_zero``/``init_attn`` are ``Init`` recipes
  (``init_attn=None`` uses ``init``).
  """
  out_channels: int
  up: bool = False
  down: bool = False
  attention: bool = False
  num_heads: Optional[int] = None
  channels_per_head: int = 64
  dropout: float = 0.0
  skip_scale: float = 1.0
  eps: float = 1e-5
  num_groups: int = 32
  resample_filter: Sequence[float] = (1, 1)
  resample_proj: bool = False
  adaptive_scale: bool = True
  init: Init = Init()
  init_zero: Init = Init(weight=0.0)
  init_attn: Optional[Init] = None

  @property
  def heads(self) -> int:
    """Number of attention heads (0 = no attention), as EDM computes it."""
    if not self.attention:
      return 0
    return self.num_heads if self.num_heads is not None else self.out_channels // self.channels_per_head

  @nn.compact
  def __call__(self, x: Array, emb: Array, train: bool = False) -> Array:
    """Maps ``x`` [N,H,W,in] and ``emb`` [N,E] (float32) to [N,H',W',out_channels] in ``x.dtype``."""
    cin, cout = x.shape[-1], self.out_channels
    orig = x
    x = Conv2d(cout, 3, up=self.up, down=self.down, resample_filter=self.resample_filter,
               init=self.init, name="conv0")(nn.silu(GroupNorm(self.num_groups, eps=self.eps, name="norm0")(x)))
    params = Linear(cout * (2 if self.adaptive_scale else 1), init=self.init, name="affine")(emb)
    params = params[:, None, None, :].astype(x.dtype)
    if self.adaptive_scale:
      scale, shift = jnp.split(params, 2, axis=-1)
      x = nn.silu(shift + GroupNorm(self.num_groups, eps=self.eps, name="norm1")(x) * (scale + 1))
    else:
      x = nn.silu(GroupNorm(self.num_groups, eps=self.eps, name="norm1")(x + params))
    if self.dropout:
      x = nn.Dropout(rate=self.dropout, deterministic=not train)(x)
    x = Conv2d(cout, 3, init=self.init_zero, name="conv1")(x)
    if cout != cin or self.up or self.down:
      kernel = 1 if (self.resample_proj or cout != cin) else 0
      orig = Conv2d(cout, kernel, up=self.up, down=self.down, resample_filter=self.resample_filter,
                    init=self.init, name="skip")(orig)
    x = (x + orig) * self.skip_scale

    heads = self.heads
    if heads:
      n, h, w, c = x.shape
      ch = c // heads
      qkv = Conv2d(c * 3, 1, init=self.init_attn if self.init_attn is not None else self.init,
                   name="qkv")(GroupNorm(self.num_groups, eps=self.eps, name="norm2")(x))
      # PyTorch reshapes the [N, 3C, H, W] output to [N*heads, C/heads, 3, HW]: channel index
      # (head * ch + c) * 3 + {0: q, 1: k, 2: v}.
      qkv = qkv.reshape(n, h * w, heads, ch, 3)
      q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
      logits = jnp.einsum("nqhc,nkhc->nhqk", q.astype(jnp.float32),
                          (k / math.sqrt(ch)).astype(jnp.float32))
      weights = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
      a = jnp.einsum("nhqk,nkhc->nqhc", weights, v).reshape(n, h, w, c)
      x = (Conv2d(c, 1, init=self.init_zero, name="proj")(a) + x) * self.skip_scale
    return x
