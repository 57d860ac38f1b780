"""Inception-v3 of TF-FID (`inception-2015-12-05`, 2048-d pool3 features) in Flax Linen, NHWC.

This is the network that the FID numbers of EDM, StyleGAN2/3 and pytorch-fid are computed with: the
2015 TensorFlow graph, not torchvision's retrained Inception-v3. It differs from torchvision's in three
places that change the features (and so the FID), all reproduced here:

* Batch normalisation has no scale (γ = 1, TF's ``scale_after_normalization=False``) and ε = 1e-3.
* The average-pool branches of blocks ``Mixed_5b``..``Mixed_7b`` divide by the number of *valid* pixels
  in the 3×3 window (``count_include_pad=False``): TF's SAME average pooling ignores the padding.
* The last block ``Mixed_7c`` pools its pool branch with a 3×3 *max* pool (a quirk of the TF graph).

Parameter names follow torchvision / pytorch-fid (``Conv2d_1a_3x3``, ``Mixed_5b/branch1x1``, ...); every
conv-BN-ReLU unit holds ``kernel`` [kh, kw, in, out] and the BN vectors ``scale``, ``bias``, ``mean``,
``var`` in the ``params`` collection (the network is never trained, so there are no batch statistics).
Weights come from :mod:`patch_diffusion.evaluation.inception_weights`.

Preprocessing (:func:`preprocess`) follows NVIDIA's TorchScript export used by StyleGAN3/EDM: images in
[0, 255] are resized to 299×299 with bilinear resampling on the TF-1 grid (source pixel = i·in/out,
clamped to the border; no antialiasing) only when they are not 299×299 already, then mapped to the TF
range ``(x - 128) / 128`` ∈ [-1, 0.9921875].
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from patch_diffusion import parallel

#: Identifies the feature network in saved statistics; statistics from different networks don't mix.
FEATURE_NET_ID = "tf_inception_v3_2015_12_05_pool3"
FEATURE_DIM = 2048
INPUT_SIZE = 299
BN_EPS = 1e-3

Params = Any


class ConvBN(nn.Module):
  """Conv (no bias) -> inference batch norm (ε = 1e-3) -> ReLU, NHWC.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: spatial stride (same on both axes).
    padding: (ph, pw) zero padding on each side.
    precision: matmul precision of the convolution. HIGHEST by default: TF32/bf16 convolutions on
      GPU/TPU would shift the features by ~1e-3 relative, enough to move FID in the second decimal.
  """
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kh, kw = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features))
    scale = self.param("scale", nn.initializers.ones, (self.features,))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    mean = self.param("mean", nn.initializers.zeros, (self.features,))
    var = self.param("var", nn.initializers.ones, (self.features,))
    ph, pw = self.padding
    y = lax.conv_general_dilated(
        x, kernel, window_strides=(self.strides, self.strides), padding=((ph, ph), (pw, pw)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
    y = (y - mean) * (scale * lax.rsqrt(var + BN_EPS)) + bias
    return nn.relu(y)


def _avg_pool_3x3_valid_count(x: jnp.ndarray) -> jnp.ndarray:
  """3×3 stride-1 SAME average pool that divides by the number of in-image pixels (TF semantics)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jnp.ndarray, stride: int, pad: int) -> jnp.ndarray:
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
  """35×35 block (``Mixed_5b/5c/5d``): 1×1, 5×5, double 3×3 and avg-pool branches."""
  pool_features: int
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    c = functools.partial(ConvBN, precision=self.precision)
    b1 = c(64, (1, 1), name="branch1x1")(x)
    b5 = c(48, (1, 1), name="branch5x5_1")(x)
    b5 = c(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = c(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = c(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_valid_count(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Reduction 35 -> 17 (``Mixed_6a``)."""
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    c = functools.partial(ConvBN, precision=self.precision)
    b3 = c(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = c(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = c(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    bp = _max_pool_3x3(x, stride=2, pad=0)
    return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
  """17×17 block with factorised 7×7 convolutions (``Mixed_6b``..``Mixed_6e``)."""
  channels_7x7: int
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    c = functools.partial(ConvBN, precision=self.precision)
    c7 = self.channels_7x7
    b1 = c(192, (1, 1), name="branch1x1")(x)
    b7 = c(c7, (1, 1), name="branch7x7_1")(x)
    b7 = c(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = c(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = c(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = c(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = c(192, (1, 1), name="branch_pool")(_avg_pool_3x3_valid_count(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Reduction 17 -> 8 (``Mixed_7a``)."""
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    c = functools.partial(ConvBN, precision=self.precision)
    b3 = c(192, (1, 1), name="branch3x3_1")(x)
    b3 = c(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = c(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = c(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = c(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    bp = _max_pool_3x3(x, stride=2, pad=0)
    return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
  """8×8 block with split 1×3 / 3×1 branches (``Mixed_7b``, ``Mixed_7c``).

  Attributes:
    pool: 'avg' (``Mixed_7b``, padding excluded from the mean) or 'max' (``Mixed_7c``): the TF graph
      max-pools the pool branch of its last block.
  """
  pool: str
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    c = functools.partial(ConvBN, precision=self.precision)
    b1 = c(320, (1, 1), name="branch1x1")(x)
    b3 = c(384, (1, 1), name="branch3x3_1")(x)
    b3 = [c(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
          c(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)]
    bd = c(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = c(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = [c(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
          c(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)]
    if self.pool == "avg":
      pooled = _avg_pool_3x3_valid_count(x)
    elif self.pool == "max":
      pooled = _max_pool_3x3(x, stride=1, pad=1)
    else:
      raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
    bp = c(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """TF-FID Inception-v3 up to pool3.

  Call with float32 ``x`` [N, 299, 299, 3] NHWC in the TF input range [-1, 0.9921875] (see
  :func:`preprocess`); returns float32 [N, 2048] pool3 features (spatial mean of ``Mixed_7c``).
  """
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"expected NHWC images with 3 channels, got shape {x.shape}")
    pr = dict(precision=self.precision)
    x = x.astype(jnp.float32)
    x = ConvBN(32, (3, 3), strides=2, name="Conv2d_1a_3x3", **pr)(x)
    x = ConvBN(32, (3, 3), name="Conv2d_2a_3x3", **pr)(x)
    x = ConvBN(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3", **pr)(x)
    x = _max_pool_3x3(x, stride=2, pad=0)
    x = ConvBN(80, (1, 1), name="Conv2d_3b_1x1", **pr)(x)
    x = ConvBN(192, (3, 3), name="Conv2d_4a_3x3", **pr)(x)
    x = _max_pool_3x3(x, stride=2, pad=0)
    x = InceptionA(32, name="Mixed_5b", **pr)(x)
    x = InceptionA(64, name="Mixed_5c", **pr)(x)
    x = InceptionA(64, name="Mixed_5d", **pr)(x)
    x = InceptionB(name="Mixed_6a", **pr)(x)
    x = InceptionC(128, name="Mixed_6b", **pr)(x)
    x = InceptionC(160, name="Mixed_6c", **pr)(x)
    x = InceptionC(160, name="Mixed_6d", **pr)(x)
    x = InceptionC(192, name="Mixed_6e", **pr)(x)
    x = InceptionD(name="Mixed_7a", **pr)(x)
    x = InceptionE("avg", name="Mixed_7b", **pr)(x)
    x = InceptionE("max", name="Mixed_7c", **pr)(x)
    # pool3: the 8×8 average pool of the TF graph over the whole 8×8 map, i.e. the spatial mean.
    return jnp.mean(x, axis=(1, 2))


def param_shapes() -> dict:
  """Parameter tree of :class:`InceptionV3` as ``jax.ShapeDtypeStruct`` leaves (no computation)."""
  x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(lambda: InceptionV3().init(jax.random.key(0), jnp.zeros(x.shape, x.dtype)))[
      "params"]


# ---- preprocessing ------------------------------------------------------------------------------


def _nv_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] float32 interpolation matrix of NVIDIA's TorchScript resize along one axis.

  NVIDIA's export shifts an ``affine_grid`` by 1/in - 1/out before ``grid_sample(bilinear, border,
  align_corners=False)``; worked through, output pixel i samples source coordinate i·in/out (TF-1
  ``ResizeBilinear`` without half-pixel centres) and coordinates past the last pixel clamp to it.
  """
  src = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
  src = np.clip(src, 0.0, in_size - 1)
  i0 = np.floor(src).astype(np.int64)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = src - i0
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(m, (rows, i0), 1.0 - w1)
  np.add.at(m, (rows, i1), w1)
  return m.astype(np.float32)


def resize_bilinear_nv(x: jnp.ndarray, size: int = INPUT_SIZE) -> jnp.ndarray:
  """Resizes float images [N, H, W, C] to [N, size, size, C] the way TF-FID / NVIDIA's export does.

  Separable: two small matmuls with [size, H] and [size, W] interpolation matrices (each row has the
  two bilinear weights), computed at full float32 precision.
  """
  _, h, w, _ = x.shape
  ry = jnp.asarray(_nv_bilinear_matrix(h, size))
  rx = jnp.asarray(_nv_bilinear_matrix(w, size))
  hi = lax.Precision.HIGHEST
  x = jnp.einsum("ih,nhwc->niwc", ry, x, precision=hi)
  return jnp.einsum("jw,niwc->nijc", rx, x, precision=hi)


def preprocess(images: jnp.ndarray) -> jnp.ndarray:
  """Maps images to the Inception input.

  Args:
    images: [N, H, W, C] NHWC, C = 3 or 1 (grayscale, replicated to RGB), uint8 or float in [0, 255].
  Returns:
    float32 [N, 299, 299, 3] in the TF range [-1, 0.9921875]: resized (only when not 299×299) with
    :func:`resize_bilinear_nv`, then ``(x - 128) / 128``.
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"expected NHWC images with 1 or 3 channels, got shape {images.shape}")
  x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.broadcast_to(x, x.shape[:-1] + (3,))
  if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
    x = resize_bilinear_nv(x, INPUT_SIZE)
  return (x - 128.0) * (1.0 / 128.0)


# ---- sharded feature extraction -----------------------------------------------------------------


host_local_rows = parallel.host_local_rows  # re-exported: the evaluation API names it here


def make_feature_fn(params: Params, mesh: Optional[Mesh] = None, *,
                    precision: Any = lax.Precision.HIGHEST) -> Callable[[Any], Any]:
  """Builds a jitted, batch-sharded image -> pool3 feature function.

  Args:
    params: Inception parameter tree (:func:`inception_weights.load_inception_params`).
    mesh: device mesh with a ``'data'`` axis (:func:`parallel.create_mesh`); default: all devices on
      one ``'data'`` axis. The parameters are replicated, the batch is sharded over ``'data'``.
    precision: convolution precision (HIGHEST keeps FID comparable across CPU/GPU/TPU).

  Returns:
    ``fn(images)``. ``images``: NHWC [N, H, W, C] (C = 1 or 3), uint8 or float in [0, 255], any H×W.
    * A ``jax.Array`` is taken as the *global* batch (N divisible by the ``'data'`` size); the result
      is a global float32 ``jax.Array`` [N, 2048] sharded on ``'data'`` (see :func:`host_local_rows`).
    * A NumPy array is this *process's* batch; it is padded to a multiple of the local device count,
      assembled into a global array (every process must pass the same N) and the result is this
      process's float32 ``np.ndarray`` [N, 2048].
    One executable is compiled per input shape and dtype.
  """
  if mesh is None:
    mesh = parallel.create_mesh()
  model = InceptionV3(precision=precision)
  replicated = parallel.replicated(mesh)
  batch_sharding = parallel.data_sharding(mesh)
  params = jax.device_put(params, replicated)

  @functools.partial(jax.jit, in_shardings=(replicated, batch_sharding), out_shardings=batch_sharding)
  def features(p, images):
    return model.apply({"params": p}, preprocess(images))

  n_data = parallel.data_parallel_size(mesh)
  # The host-local batch is split over this process's share of the data axis.
  n_local = max(1, n_data // jax.process_count())

  def fn(images):
    if isinstance(images, jax.Array):
      if images.shape[0] % n_data:
        raise ValueError(f"global batch {images.shape[0]} is not divisible by the {n_data} devices "
                         f"of mesh axis {parallel.DATA_AXIS!r}")
      return features(params, images)
    images = np.asarray(images)
    n = images.shape[0]
    pad = (-n) % n_local
    if pad:
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)], axis=0)
    global_images = parallel.global_batch({"images": images}, mesh)["images"]
    return host_local_rows(features(params, global_images))[:n]

  return fn
