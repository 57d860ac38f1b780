"""The train step's gradient accumulation and augmentation (patch_diffusion/steps.py)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from patch_diffusion import models
from patch_diffusion import parallel
from patch_diffusion import state as state_lib
from patch_diffusion import steps as steps_lib
from patch_diffusion.config_validation import validate_config
from patch_diffusion.data import augment as augment_lib
from patch_diffusion.data import patches as patches_lib
from patch_diffusion.edm import loss as loss_lib
from patch_diffusion.edm import precond as precond_lib
from patch_diffusion.edm import sampler as sampler_lib
from helpers import ONE_LEVEL, tiny

R = 16


def _setup(num_classes=0, augment_dim=0, channels=1, tx=None, levels=1):
  # What these tests check (accumulation, augmentation, sharding) does not depend on the depth: one level
  # without attention compiles in about half the time of the tiny config's two.
  c = tiny(**(ONE_LEVEL if levels == 1 else {}), **{"model.augment_dim": augment_dim})
  model = models.create_model(c.model, img_resolution=R, img_channels=channels, label_dim=num_classes)
  variables = models.init_params(model, jax.random.key(0))
  # EDM zero-initialises the output layer, so at init every other layer has a zero gradient: perturb all
  # parameters so that every layer (map_augment included) takes part.
  leaves, treedef = jax.tree.flatten(variables["params"])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  variables = dict(variables, params=jax.tree.unflatten(treedef, [
      x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]))
  tx = tx or state_lib.make_optimizer(c.train)
  state = state_lib.create_train_state(variables, tx)
  precond = precond_lib.get_precond("edm")
  noise = loss_lib.get_noise_distribution("edm")
  return model, tx, state, precond, noise


def _batch(n, channels=1, num_classes=0, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (n, R, R, channels), dtype=np.uint8),
          "label": rng.integers(0, max(num_classes, 1), (n,)).astype(np.int32)}


def _run(model, tx, state, precond, noise, cfg, batch, lr=1e-3, beta=0.9, jit_kwargs=None):
  step = steps_lib.make_train_step(model.apply, tx, precond, noise, cfg)
  fn = jax.jit(step, **(jit_kwargs or {}))
  new_state, metrics = fn(state, batch, np.float32(lr), np.float32(beta), jax.random.key(7))
  return jax.device_get(new_state), jax.device_get(metrics)


def test_k1_step_is_the_previous_step():
  """Without augmentation and accumulation the step draws and computes exactly what it did before."""
  model, tx, state, precond, noise = _setup(num_classes=3)
  batch = _batch(16, num_classes=3)
  cfg = steps_lib.StepConfig(patch_size=8, resolution=R, num_classes=3, label_dropout=0.3)
  new, metrics = _run(model, tx, state, precond, noise, cfg, batch)

  @jax.jit
  def previous(state, batch, key):  # the step's body before StepPlan / augmentation / accumulation
    key = jax.random.fold_in(key, state.step)
    k_crop, k_loss, k_label, k_dropout = jax.random.split(key, 4)
    images = steps_lib.images_to_float(batch["image"])
    patches, x_pos = patches_lib.random_patches(k_crop, images, 8)
    labels = loss_lib.drop_labels(k_label, jax.nn.one_hot(batch["label"], 3), 0.3)

    def loss_fn(params):
      den = precond_lib.make_denoiser(model.apply, {"params": params, **state.buffers}, precond, train=True,
                                      dropout_key=k_dropout)
      return jnp.mean(loss_lib.patch_loss(den, k_loss, patches, x_pos, labels, noise))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, _ = tx.update(steps_lib.sanitize_grads(grads), state.opt_state, state.params)
    return loss, jax.tree.map(lambda p, u: p - 1e-3 * u, state.params, updates)

  loss, params = jax.device_get(previous(state, batch, jax.random.key(7)))
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def _grads_of_one_step(k, *, augment=None, before_crop=False, patch=8, n=16, jit_kwargs=None, put=None):
  """(p_before − p_after) with an identity optimizer and lr 1: the step's gradient, and its metrics."""
  num_classes = 3
  model, tx, state, precond, noise = _setup(num_classes=num_classes, augment_dim=9 if augment else 0,
                                            tx=optax.identity())
  batch = _batch(n, num_classes=num_classes, seed=1)
  if put:
    state, batch = put(state, batch)
  cfg = steps_lib.StepConfig(patch_size=patch, resolution=R, num_classes=num_classes, label_dropout=0.3,
                             augment=augment, augment_before_crop=before_crop, grad_accum_steps=k)
  new, metrics = _run(model, tx, state, precond, noise, cfg, batch, lr=1.0, beta=0.5, jit_kwargs=jit_kwargs)
  grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), jax.device_get(state.params), new.params)
  return grads, metrics


def _assert_same_grads(g1, g2):
  scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(g1))
  leaves1, leaves2 = jax.tree_util.tree_leaves_with_path(g1), jax.tree_util.tree_leaves_with_path(g2)
  assert [p for p, _ in leaves1] == [p for p, _ in leaves2]
  for (path, a), (_, b) in zip(leaves1, leaves2):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("k", [2, 4])
def test_accumulation_equals_one_large_step(k):
  g1, m1 = _grads_of_one_step(1)
  gk, mk = _grads_of_one_step(k)
  np.testing.assert_allclose(mk["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(mk["grad_norm"], m1["grad_norm"], rtol=1e-5)
  _assert_same_grads(g1, gk)
  assert max(float(np.abs(x).max()) for x in jax.tree.leaves(g1)) > 0


def test_accumulation_loop_runs_every_convolution_in_nhwc_order():
  """XLA:CPU turns convolutions of other dimension orders into its fast NHWC/HWIO kernels only outside
  loops; inside the accumulation ``scan`` autodiff's gradient convolutions ran as naive loop nests (33×
  slower steps). layers._conv writes its gradients in that order itself: the compiled k = 2 step has a
  loop and no convolution of another order."""
  model, tx, state, precond, noise = _setup(levels=2)  # with down/upsampling and attention
  cfg = steps_lib.StepConfig(patch_size=16, resolution=R, grad_accum_steps=2)
  step = steps_lib.make_train_step(model.apply, tx, precond, noise, cfg)
  hlo = jax.jit(step).lower(state, _batch(8), np.float32(1e-3), np.float32(0.9), jax.random.key(7)).compile().as_text()
  labels = re.findall(r"convolution\(.*?dim_labels=(\S+?),", hlo)
  assert " while(" in hlo and len(labels) > 10
  assert set(labels) == {"b01f_01io->b01f"}, sorted(set(labels))


def test_accumulation_with_augmentation_and_multiplier():
  """Patch 4 at R = 16 (batch ×4: 32 images), the augmentation pipe on the patches: k = 4 equals k = 1."""
  pipe = augment_lib.edm_augment_pipe(0.5)
  g1, m1 = _grads_of_one_step(1, augment=pipe, patch=4, n=32)
  g4, m4 = _grads_of_one_step(4, augment=pipe, patch=4, n=32)
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
  _assert_same_grads(g1, g4)


def test_sharded_accumulation_equals_single_device_step():
  """k = 2 on an 8-device data-parallel mesh (32 images: 4 per device, 2 per micro-batch) equals k = 1 on
  one device."""
  mesh = parallel.create_mesh((-1,), ("data",))
  rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  assert mesh.size == 8

  def put(state, batch):
    return jax.device_put(state, rep), jax.device_put(batch, data)

  kwargs = dict(in_shardings=(rep, data, rep, rep, rep), out_shardings=(rep, rep))
  g8, m8 = _grads_of_one_step(2, n=32, jit_kwargs=kwargs, put=put)
  g1, m1 = _grads_of_one_step(1, n=32)
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  _assert_same_grads(g1, g8)


def test_accumulation_must_divide_the_batch():
  model, tx, state, precond, noise = _setup()
  cfg = steps_lib.StepConfig(patch_size=8, resolution=R, grad_accum_steps=3)
  with pytest.raises(ValueError, match="grad_accum_steps = 3 does not divide this step's batch of 16"):
    _run(model, tx, state, precond, noise, cfg, _batch(16))


@pytest.mark.parametrize("value,match", [(3, "train.grad_accum_steps = 3: must divide train.batch_size = 16"),
                                         (0, "train.grad_accum_steps = 0: must be > 0")])
def test_grad_accum_config_validation(value, match):
  c = tiny()  # batch 16
  for ok in (1, 2, 4, 16):
    c.train.grad_accum_steps = ok
    validate_config(c)
  c.train.grad_accum_steps = value
  with pytest.raises(ValueError, match=match):
    validate_config(c)


@pytest.mark.parametrize("before_crop", [False, True])
def test_augmentation_modes_and_coordinates(before_crop):
  """Default: the patch is augmented and x_pos is the crop's location in the un-augmented image.
  augment_before_crop: the full image is augmented, then cropped (x_pos: the crop's location in it)."""
  pipe = augment_lib.edm_augment_pipe(1.0)
  cfg = steps_lib.StepConfig(patch_size=8, resolution=R, augment=pipe, augment_before_crop=before_crop)
  plain = steps_lib.StepConfig(patch_size=8, resolution=R)
  batch = _batch(12, channels=3, seed=2)
  noise = loss_lib.get_noise_distribution("edm")
  key = jax.random.key(3)
  inputs = steps_lib.draw_step_inputs(cfg, noise, batch, key)
  patches, x_pos, labels = jax.jit(lambda mb: steps_lib.model_inputs(cfg, mb))(inputs)
  plain_inputs = steps_lib.draw_step_inputs(plain, noise, batch, key)
  plain_patches, plain_pos, plain_labels = steps_lib.model_inputs(plain, plain_inputs)
  # The augmentation does not change the other draws, and the coordinates are those of the crop.
  for name in ("row", "col", "sigma", "eps"):
    np.testing.assert_array_equal(inputs[name], plain_inputs[name])
  np.testing.assert_array_equal(x_pos, plain_pos)
  _, grid = patches_lib.crop_patches(jnp.zeros((12, R, R, 1)), inputs["row"], inputs["col"], 8)
  np.testing.assert_array_equal(x_pos, grid)
  assert plain_labels is None and labels.shape == (12, 9)
  images = steps_lib.images_to_float(batch["image"])
  if before_crop:
    augmented, _ = pipe.apply(images, inputs["augment"])
    expected, _ = patches_lib.crop_patches(augmented, inputs["row"], inputs["col"], 8)
  else:
    expected, _ = pipe.apply(plain_patches, inputs["augment"])
  np.testing.assert_allclose(patches, expected, atol=1e-5)
  np.testing.assert_allclose(labels, pipe.labels(inputs["augment"], *(2 * (R if before_crop else 8,))),
                             atol=1e-6)
  assert not np.allclose(patches, plain_patches, atol=1e-2)  # it really augmented
  flipped = np.asarray(inputs["augment"]["xflip"]) == 1
  assert 0 < flipped.sum() < 12


@pytest.mark.parametrize("before_crop", [False, True])
def test_augment_labels_reach_the_network(before_crop):
  pipe = augment_lib.edm_augment_pipe(1.0)
  grads, metrics = _grads_of_one_step(1, augment=pipe, before_crop=before_crop)
  assert np.isfinite(metrics["loss"])
  assert np.abs(grads["map_augment"]["kernel"]).max() > 0
  # Without augmentation the labels are None: map_augment is unused (zero gradient).
  model, tx, state, precond, noise = _setup(augment_dim=9, tx=optax.identity())
  new, _ = _run(model, tx, state, precond, noise, steps_lib.StepConfig(patch_size=8, resolution=R),
                _batch(16), lr=1.0)
  np.testing.assert_array_equal(new.params["map_augment"]["kernel"], state.params["map_augment"]["kernel"])


def test_augmented_network_samples_with_zero_labels():
  """A network with augment_dim 9 (e.g. converted from EDM's FFHQ/AFHQv2 models) denoises with no labels
  exactly as with the all-zero label, and the EDM sampler runs on it without any augmentation input."""
  model, _, state, precond, _ = _setup(augment_dim=9, channels=3)
  variables = state.variables(ema=True)
  den = precond_lib.make_denoiser(model.apply, variables, precond)
  x = jax.random.normal(jax.random.key(1), (2, R, R, 3))
  pos = patches_lib.full_grid(R, batch=2)
  sigma = jnp.array([0.5, 3.0])
  none = den(x, sigma, pos, None)
  np.testing.assert_array_equal(none, den(x, sigma, pos, None, augment_labels=jnp.zeros((2, 9))))
  assert not np.allclose(none, den(x, sigma, pos, None, augment_labels=jnp.ones((2, 9))))
  out = jax.jit(lambda lat: sampler_lib.edm_sample(den, lat, pos, settings=sampler_lib.SamplerSettings(num_steps=3)))(x)
  assert out.shape == (2, R, R, 3) and np.all(np.isfinite(out))
