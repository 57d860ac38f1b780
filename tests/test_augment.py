"""EDM's augmentation pipe in JAX (patch_diffusion/data/augment.py).

``tests/data/edm_augment_reference.npz`` holds outputs of EDM's own ``training/augment.py`` (NVlabs/edm,
PyTorch 2.x on CPU, float32), one case per transform and the ``--augment`` preset (with
``aniso_rotate_prob=0`` so the drawn parameters can be read back from the labels unambiguously), all with
``p=1``: ``<case>/images`` (NHWC, uniform in [-1, 1]), ``<case>/out`` (NHWC) and ``<case>/labels``.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patch_diffusion.data import augment

REFERENCE = pathlib.Path(__file__).parent / "data" / "edm_augment_reference.npz"


def _apply(pipe, images, params):
  out, labels = jax.jit(pipe.apply)(jnp.asarray(images), params)
  return np.asarray(out), np.asarray(labels)


def _smooth_image(h, w, channels=1):
  """A Gaussian blob off the centre: band-limited, so resampling is accurate to ~1e-2 of its peak."""
  y, x = np.mgrid[0:h, 0:w].astype(np.float64)
  yc, xc = y - (h - 1) / 2, x - (w - 1) / 2
  return np.exp(-((xc - 3)**2 + (yc + 2)**2) / (2 * 4.0**2)), xc, yc


def test_sym6_is_an_orthonormal_lowpass_filter():
  h = augment.SYM6
  assert len(h) == 12 and h.sum() == pytest.approx(np.sqrt(2), abs=1e-12)
  for k in range(6):  # Σ_i h[i] h[i + 2k] = δ[k]: perfect reconstruction of the 2× up/down filter bank
    assert np.dot(h[:len(h) - 2 * k], h[2 * k:]) == pytest.approx(float(k == 0), abs=1e-10)


def test_preset_and_label_layout():
  pipe = augment.edm_augment_pipe(0.15)
  assert pipe.label_dim == 9 and pipe.geometric and pipe.p == 0.15
  assert (pipe.xflip, pipe.yflip, pipe.scale, pipe.rotate_frac, pipe.aniso, pipe.translate_frac) == (
      1e8, 1, 1, 1, 1, 1)
  assert pipe.rotate_int == 0 and pipe.translate_int == 0
  params = {"xflip": jnp.array([1]), "yflip": jnp.array([0]), "scale": jnp.array([0.5]),
            "rotate_frac": jnp.array([0.3]), "aniso": jnp.array([[-1.5, 0.4]]),
            "translate_frac": jnp.array([[0.25, -0.75]])}
  labels = np.asarray(pipe.labels(params, 16, 16))
  expected = [1, 0, 0.5, np.cos(0.3) - 1, np.sin(0.3), -1.5 * np.cos(0.4), -1.5 * np.sin(0.4), 0.25, -0.75]
  np.testing.assert_allclose(labels, [expected], atol=1e-6)
  # Every transform's label count, in EDM's order.
  full = augment.AugmentPipe(xflip=1, yflip=1, rotate_int=1, translate_int=1, scale=1, rotate_frac=1,
                             aniso=1, translate_frac=1)
  assert full.label_dim == 13
  assert augment.from_config({"augment_p": 0.0}) is None
  assert augment.from_config({"augment_p": 0.12}) == augment.edm_augment_pipe(0.12)


def test_xflip_and_yflip_closed_form():
  images = np.random.default_rng(0).normal(size=(3, 8, 6, 2)).astype(np.float32)
  out, labels = _apply(augment.AugmentPipe(xflip=1, yflip=1), images,
                       {"xflip": jnp.array([0, 1, 1]), "yflip": jnp.array([0, 0, 1])})
  np.testing.assert_array_equal(out[0], images[0])
  np.testing.assert_array_equal(out[1], images[1, :, ::-1])       # columns mirrored
  np.testing.assert_array_equal(out[2], images[2, ::-1, ::-1])    # both
  np.testing.assert_array_equal(labels, [[0, 0], [1, 0], [1, 1]])


def test_rotate_int_is_quarter_turns():
  images = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype(np.float32)
  out, labels = _apply(augment.AugmentPipe(rotate_int=1), images, {"rotate_int": jnp.arange(4)})
  for k in range(4):
    np.testing.assert_array_equal(out[k], np.rot90(images[k], k))  # counter-clockwise as displayed
  np.testing.assert_array_equal(labels, [[0, 0], [1, 0], [1, 1], [0, 1]])


def test_integer_translation_closed_form():
  """Content moves right by tx and up by ty, mirror-reflected at the borders (edge pixels not repeated)."""
  h = w = 16
  images = np.random.default_rng(2).normal(size=(2, h, w, 1)).astype(np.float32)
  # tx = round(u · 16 · 0.125): u = 1 -> 2, u = -0.5 -> -1; ty likewise.
  uv = jnp.array([[1.0, -0.5], [-0.5, 1.0]])
  out, labels = _apply(augment.AugmentPipe(translate_int=1), images, {"translate_int": uv})
  pad = 4
  for n, (tx, ty) in enumerate([(2, -1), (-1, 2)]):
    padded = np.pad(images[n], ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    np.testing.assert_array_equal(out[n], padded[pad + ty:pad + ty + h, pad - tx:pad - tx + w])
  np.testing.assert_allclose(labels, [[1.0, -0.5], [-0.5, 1.0]])


def test_geometric_identity_and_integer_shift():
  """Resampling with G⁻¹ = I is the identity, and a 1-pixel translate_frac a reflected 1-pixel shift (the
  Symlet-6 up/down filter bank reconstructs perfectly)."""
  h = w = 16
  images = np.random.default_rng(3).normal(size=(3, h, w, 2)).astype(np.float32)
  u = 1 / (w * 0.125)  # one pixel
  out, labels = _apply(augment.AugmentPipe(translate_frac=1), images,
                       {"translate_frac": jnp.array([[0.0, 0.0], [u, 0.0], [0.0, -u]])})
  np.testing.assert_allclose(out[0], images[0], atol=1e-4)
  padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
  np.testing.assert_allclose(out[1], padded[1, 1:h + 1, 0:w], atol=1e-4)   # right by one pixel
  np.testing.assert_allclose(out[2], padded[2, 2:h + 2, 1:w + 1], atol=1e-4)  # up by one pixel
  np.testing.assert_allclose(labels, [[0, 0], [u, 0], [0, -u]], atol=1e-7)


@pytest.mark.parametrize("theta", [np.pi / 2, 0.7, -2.0])
def test_rotation_closed_form(theta):
  """rotate_frac by θ: output pixel p reads the input at R(θ)·p (centred pixel coordinates, y down);
  θ = π/2 is np.rot90. Checked on a smooth image inside the inscribed disc (outside it EDM reads
  reflected content)."""
  h = w = 32
  img, xc, yc = _smooth_image(h, w)
  out, labels = _apply(augment.AugmentPipe(rotate_frac=1), img[None, :, :, None].astype(np.float32),
                       {"rotate_frac": jnp.array([theta])})
  blob = lambda x, y: np.exp(-((x - 3)**2 + (y + 2)**2) / (2 * 4.0**2))
  expected = blob(np.cos(theta) * xc - np.sin(theta) * yc, np.sin(theta) * xc + np.cos(theta) * yc)
  inside = np.hypot(xc, yc) < h / 2 - 2
  np.testing.assert_allclose(out[0, ..., 0][inside], expected[inside], atol=0.02)
  if theta == np.pi / 2:
    np.testing.assert_allclose(out[0, ..., 0], np.rot90(img), atol=0.02)
  np.testing.assert_allclose(labels, [[np.cos(theta) - 1, np.sin(theta)]], atol=1e-6)


def test_scale_and_aniso_on_a_ramp():
  """The Symlet-6 filters reproduce linear functions: zooming a ramp is exact in the interior."""
  h = w = 32
  _, xc, yc = _smooth_image(h, w)
  ramp = (0.05 * xc + 0.02 * yc)[None, :, :, None].astype(np.float32)
  out, _ = _apply(augment.AugmentPipe(scale=1), ramp, {"scale": jnp.array([5.0])})  # s = 2^(5·0.2) = 2
  inner = (slice(8, -8), slice(8, -8))
  np.testing.assert_allclose(out[0, ..., 0][inner], (0.05 * xc / 2 + 0.02 * yc / 2)[inner], atol=3e-3)
  out, _ = _apply(augment.AugmentPipe(aniso=1), ramp, {"aniso": jnp.array([[5.0, 0.0]])})  # x /2, y ×2
  inner = (slice(10, -10), slice(10, -10))
  np.testing.assert_allclose(out[0, ..., 0][inner], (0.05 * xc / 2 + 0.02 * yc * 2)[inner], atol=1e-3)


def _params_from_labels(name, labels):
  """EDM's drawn parameters, read back from its labels (cases with p = 1, aniso axis unrotated)."""
  n = labels.shape[0]
  if name in ("xflip", "yflip"):
    return {name: jnp.asarray(labels[:, 0].astype(np.int32))}
  if name == "rotate_int":
    a, b = labels[:, 0] > 0.5, labels[:, 1] > 0.5
    return {name: jnp.asarray(np.where(a & ~b, 1, np.where(a & b, 2, np.where(b, 3, 0))).astype(np.int32))}
  if name in ("translate_int", "translate_frac"):
    return {name: jnp.asarray(labels[:, :2])}  # translate_int: label·W·max = tx exactly
  if name == "scale":
    return {name: jnp.asarray(labels[:, 0])}
  if name == "rotate_frac":
    return {name: jnp.asarray(np.arctan2(labels[:, 1], labels[:, 0] + 1))}
  if name == "aniso":
    return {name: jnp.asarray(np.stack([labels[:, 0], np.zeros(n, np.float32)], -1))}
  parts = {}
  for key, cols in (("xflip", [0]), ("yflip", [1]), ("scale", [2]), ("rotate_frac", [3, 4]),
                    ("aniso", [5, 6]), ("translate_frac", [7, 8])):
    parts.update(_params_from_labels(key, labels[:, cols]))
  return parts


@pytest.mark.parametrize("name,kwargs", [
    ("xflip", dict(xflip=1)), ("yflip", dict(yflip=1)), ("rotate_int", dict(rotate_int=1)),
    ("translate_int", dict(translate_int=1)), ("scale", dict(scale=1)), ("rotate_frac", dict(rotate_frac=1)),
    ("aniso", dict(aniso=1, aniso_rotate_prob=0)), ("translate_frac", dict(translate_frac=1)),
    ("preset", dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, aniso_rotate_prob=0,
                    translate_frac=1))])
def test_matches_edm_reference(name, kwargs):
  ref = np.load(REFERENCE)
  images, expected, labels = ref[f"{name}/images"], ref[f"{name}/out"], ref[f"{name}/labels"]
  pipe = augment.AugmentPipe(p=1.0, **kwargs)
  out, our_labels = _apply(pipe, images, _params_from_labels(name, labels))
  blit = name in ("xflip", "yflip", "rotate_int", "translate_int")
  np.testing.assert_allclose(out, expected, rtol=0, atol=0 if blit else 1e-4)
  np.testing.assert_allclose(our_labels, labels, atol=1e-6)


def test_deterministic_under_the_key_and_jittable():
  pipe = augment.edm_augment_pipe(0.5)
  images = jax.random.uniform(jax.random.key(0), (6, 16, 16, 3), minval=-1, maxval=1)
  run = jax.jit(pipe.__call__)
  a, la = run(jax.random.key(1), images)
  b, lb = run(jax.random.key(1), images)
  c, lc = pipe(jax.random.key(2), images)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(la, lb)
  assert not np.allclose(la, lc)
  assert a.shape == images.shape and a.dtype == images.dtype and la.shape == (6, 9)
  # Sliced parameters give the sliced result (what gradient accumulation relies on).
  params = pipe.sample(jax.random.key(1), 6)
  part, part_labels = pipe.apply(images[2:4], jax.tree.map(lambda x: x[2:4], params))
  np.testing.assert_allclose(part, a[2:4], atol=1e-6)
  np.testing.assert_array_equal(part_labels, la[2:4])


def test_probabilities_of_the_preset():
  """x-flip is a fair coin whatever p is (EDM's xflip=1e8); the others fire with probability p."""
  n, p = 20_000, 0.25
  params = augment.edm_augment_pipe(p).sample(jax.random.key(3), n)
  assert abs(np.mean(params["xflip"]) - 0.5) < 0.015
  assert abs(np.mean(params["yflip"]) - p / 2) < 0.015
  for name in ("scale", "rotate_frac"):
    assert abs(np.mean(np.asarray(params[name]) != 0) - p) < 0.015
  assert abs(np.mean(np.asarray(params["aniso"][:, 0]) != 0) - p) < 0.015
  assert abs(np.mean(np.asarray(params["aniso"][:, 1]) != 0) - 0.5) < 0.015  # the axis gate ignores p
  assert abs(np.mean(np.any(np.asarray(params["translate_frac"]) != 0, axis=1)) - p) < 0.015
  assert np.std(np.asarray(params["scale"])[np.asarray(params["scale"]) != 0]) == pytest.approx(1, abs=0.05)
  rare = augment.edm_augment_pipe(0.01).sample(jax.random.key(3), n)  # 1e8 · 0.01 >= 1: the coin stays fair
  assert abs(np.mean(rare["xflip"]) - 0.5) < 0.015 and abs(np.mean(np.asarray(rare["scale"]) != 0) - 0.01) < 0.003


def test_one_transform_does_not_shift_another_draws():
  key = jax.random.key(4)
  alone = augment.AugmentPipe(scale=1).sample(key, 50)
  together = augment.edm_augment_pipe(1.0).sample(key, 50)
  np.testing.assert_array_equal(alone["scale"], together["scale"])
