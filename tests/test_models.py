"""Networks: parity with the official PyTorch code, level-based attention, init, registry, bf16."""
from __future__ import annotations

import importlib.util
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from patch_diffusion.edm.precond import EDMPrecond, denoise
from patch_diffusion.models import DhariwalUNet, SongUNet, create_model, init_params, registry
from patch_diffusion.interop.torch_mapping import torch_state_dict_to_variables

FIXTURES = ("ddpmpp_uncond", "ddpmpp_cond", "ncsnpp_uncond", "adm_cond")
TOLERANCE = 1e-4  # max |err| / max |D|, float32


def default_config():
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"
  spec = importlib.util.spec_from_file_location("default_config_for_tests", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def fixture_config(meta):
  """config.model for a fixture .json, every field verbatim (arch_presets off)."""
  config = default_config()
  m = config.model
  m.arch = "adm" if meta["model_type"] == "DhariwalUNet" else (
      "ncsnpp" if meta["model_kwargs"].get("embedding_type") == "fourier" else "ddpmpp")
  m.arch_presets = False
  for key, value in meta["model_kwargs"].items():
    m[key] = tuple(value) if isinstance(value, list) else value
  return config


@pytest.fixture(scope="module")
def fixture_nets(fixtures_dir):
  cache = {}

  def get(name):
    if name not in cache:
      meta = json.loads((fixtures_dir / "edm_torch" / f"{name}.json").read_text())
      data = np.load(fixtures_dir / "edm_torch" / f"{name}.npz")
      assert meta["in_channels"] == meta["img_channels"] + 2
      model = create_model(fixture_config(meta).model, img_resolution=meta["img_resolution"],
                           img_channels=meta["img_channels"], label_dim=meta["label_dim"])
      state = {k[len("param/"):]: data[k] for k in data.files if k.startswith("param/")}
      variables = torch_state_dict_to_variables(state, model)
      cache[name] = meta, data, model, variables
    return cache[name]

  return get


def nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


@pytest.mark.parametrize("name", FIXTURES)
def test_parity_with_official_code(fixture_nets, name):
  meta, data, model, variables = fixture_nets(name)
  assert type(model).__name__ == meta["model_type"]
  precond = EDMPrecond(sigma_data=meta["sigma_data"])

  @jax.jit
  def D(variables, x, sigma, x_pos, labels):
    return denoise(precond, lambda a, c, l: model.apply(variables, a, c, l), x, sigma, x_pos, labels)

  errors = {}
  for s in meta["patch_sizes"]:
    key = f"s{s}/class_labels"
    labels = data[key] if key in data.files else None
    assert (labels is not None) == bool(meta["label_dim"])
    out = np.asarray(D(variables, nhwc(data[f"s{s}/x"]), data[f"s{s}/sigma"], nhwc(data[f"s{s}/x_pos"]),
                       labels))
    ref = nhwc(data[f"s{s}/D"])
    assert out.shape == ref.shape == (meta["batch"], s, s, meta["img_channels"])
    errors[s] = float(np.abs(out - ref).max() / np.abs(ref).max())
  print(f"\nPARITY {name}: " + ", ".join(f"patch {s}: {e:.2e}" for s, e in errors.items()))
  for s, err in errors.items():
    assert err <= TOLERANCE, f"{name} patch {s}: max rel err {err:.3e}"


def test_fourier_frequencies_are_a_loaded_buffer(fixture_nets):
  meta, data, _, variables = fixture_nets("ncsnpp_uncond")
  np.testing.assert_array_equal(variables["buffers"]["map_noise"]["freqs"], data["param/model.map_noise.freqs"])
  assert "map_noise" not in variables["params"]


def tiny_song(**kw):
  args = dict(img_resolution=16, in_channels=5, out_channels=3, model_channels=16, channel_mult=(1, 2),
              num_blocks=1, attn_resolutions=(8,), dropout=0.0)
  args.update(kw)
  return SongUNet(**args)


def test_attention_follows_level_not_input_size():
  model = tiny_song()
  variables = init_params(model, jax.random.key(0))
  params = variables["params"]
  # Level 1 (nominal 8x8) has attention, level 0 (16x16) has none.
  assert "qkv" in params["enc_8x8_block0"] and "qkv" not in params["enc_16x16_block0"]
  assert "qkv" in params["dec_8x8_block1"] and "qkv" not in params["dec_8x8_block0"]
  assert "qkv" in params["dec_8x8_in0"] and "qkv" not in params["dec_16x16_block1"]

  # At an 8x8 patch, level 1 is 4x4 but still attends (the parity tests run the fixture networks,
  # attention at nominal 8, on 8x8 and 4x4 patches too): changing that block's attention projection
  # changes the output.
  fn = jax.jit(model.apply)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 5))
  noise = jnp.array([0.1, -0.3])
  perturbed = jax.tree_util.tree_map(lambda a: a, params)
  perturbed["enc_8x8_block0"]["proj"]["kernel"] = params["enc_8x8_block0"]["proj"]["kernel"] + 0.5
  base = fn({"params": params}, x, noise)
  changed = fn({"params": perturbed}, x, noise)
  assert float(jnp.abs(changed - base).max()) > 1e-2 * float(jnp.abs(base).max())


def test_edm_initialisation():
  model = tiny_song(model_channels=32)
  p = init_params(model, jax.random.key(0))["params"]
  k = np.asarray(p["enc_16x16_conv"]["kernel"])  # xavier_uniform, fan_in = 5*9, fan_out = 32*9
  bound = math.sqrt(6 / (5 * 9 + 32 * 9))
  assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound
  np.testing.assert_allclose(k.std(), bound / math.sqrt(3), rtol=0.1)
  assert not np.asarray(p["enc_16x16_conv"]["bias"]).any()
  zero = np.asarray(p["enc_16x16_block0"]["conv1"]["kernel"])  # init_zero: xavier_uniform * 1e-5
  assert 0 < np.abs(zero).max() <= 1e-5 * math.sqrt(6 / (32 * 9 * 2))
  qkv = np.asarray(p["enc_8x8_block0"]["qkv"]["kernel"])  # init_attn: xavier_uniform * sqrt(0.2)
  assert np.abs(qkv).max() <= math.sqrt(0.2) * math.sqrt(6 / (64 + 192))
  np.testing.assert_array_equal(p["enc_16x16_block0"]["norm0"]["scale"], 1.0)

  adm = DhariwalUNet(img_resolution=8, in_channels=6, out_channels=4, label_dim=3, model_channels=64,
                     channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.0)
  q = init_params(adm, jax.random.key(0))["params"]
  assert not np.asarray(q["out_conv"]["kernel"]).any() and not np.asarray(q["out_conv"]["bias"]).any()
  b = np.asarray(q["enc_8x8_conv"]["bias"])  # kaiming_uniform * sqrt(1/3): bound sqrt(1/fan_in)
  assert 0 < np.abs(b).max() <= math.sqrt(1 / (6 * 9))
  lab = np.asarray(q["map_label"]["kernel"])  # kaiming_normal * sqrt(label_dim), fan_in = 3: std 1
  assert lab.shape == (3, 256) and "bias" not in q["map_label"]
  np.testing.assert_allclose(lab.std(), 1.0, rtol=0.15)


def test_dropout_uses_rng_and_is_off_in_eval():
  model = tiny_song(dropout=0.5)
  variables = init_params(model, jax.random.key(0))
  # Make conv1 and the output conv matter (their init is ~1e-5) so dropout shows in the output.
  variables = jax.tree_util.tree_map_with_path(
      lambda path, a: a * 1e4 if ("conv1" in jax.tree_util.keystr(path)
                                  or "aux_conv" in jax.tree_util.keystr(path)) else a, variables)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 5))
  noise = jnp.zeros((2,))
  apply = jax.jit(model.apply, static_argnames="train")
  eval_a = apply(variables, x, noise, train=False, rngs={"dropout": jax.random.key(5)})
  eval_b = apply(variables, x, noise, train=False, rngs={"dropout": jax.random.key(6)})
  np.testing.assert_array_equal(eval_a, eval_b)
  t1 = apply(variables, x, noise, train=True, rngs={"dropout": jax.random.key(2)})
  t1b = apply(variables, x, noise, train=True, rngs={"dropout": jax.random.key(2)})
  t2 = apply(variables, x, noise, train=True, rngs={"dropout": jax.random.key(3)})
  np.testing.assert_array_equal(t1, t1b)
  scale = float(jnp.abs(eval_a).max())
  assert float(jnp.abs(t1 - t2).max()) > 1e-2 * scale and float(jnp.abs(t1 - eval_a).max()) > 1e-2 * scale


@pytest.mark.parametrize("arch", ["ddpmpp", "adm"])
def test_bfloat16_compute(arch):
  config = default_config()
  m = config.model
  m.arch, m.arch_presets, m.model_channels, m.channel_mult = arch, False, 64, (1, 2)
  m.num_blocks, m.attn_resolutions, m.dropout = 1, (4,), 0.0
  m32 = create_model(m, img_resolution=8, img_channels=3, label_dim=2)
  m.dtype = "bfloat16"
  m16 = create_model(m, img_resolution=8, img_channels=3, label_dim=2)
  variables = init_params(m16, jax.random.key(0))
  assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(variables))
  # Non-trivial weights everywhere (the zero-ish output inits would hide errors).
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map(
      lambda a: a + 0.05 * rng.standard_normal(a.shape).astype(np.float32), variables)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 5))
  noise = jnp.array([0.5, -1.0])
  labels = jnp.eye(2)
  out16 = jax.jit(m16.apply)(variables, x, noise, labels)
  out32 = jax.jit(m32.apply)(variables, x, noise, labels)
  assert out16.dtype == jnp.bfloat16 and out32.dtype == jnp.float32
  assert bool(jnp.isfinite(out16).all())
  rel = float(jnp.abs(out16.astype(jnp.float32) - out32).max() / jnp.abs(out32).max())
  assert rel < 0.1, rel


def test_registry_presets_and_overrides():
  config = default_config()
  m = config.model
  # The registry's notion of the defaults is configs/default.py.
  for key, value in registry.DEFAULTS.items():
    assert (tuple(m[key]) if isinstance(value, tuple) else m[key]) == value, key
  assert m.arch_presets is True

  name, kw = registry.resolve_model_kwargs(m)
  assert name == "SongUNet" and kw == registry.DEFAULTS

  m.arch = "ncsnpp"
  name, kw = registry.resolve_model_kwargs(m)
  assert (kw["embedding_type"], kw["encoder_type"], kw["channel_mult_noise"], kw["resample_filter"]) == (
      "fourier", "residual", 2, (1, 3, 3, 1))
  m.encoder_type = "skip"  # an explicit field wins over the preset
  assert registry.resolve_model_kwargs(m)[1]["encoder_type"] == "skip"
  m.arch_presets = False  # verbatim: DDPM++ fields under the ncsnpp name
  assert registry.resolve_model_kwargs(m)[1]["embedding_type"] == "positional"

  m = default_config().model
  m.arch = "adm"
  name, kw = registry.resolve_model_kwargs(m)
  assert name == "DhariwalUNet"
  assert (kw["model_channels"], kw["channel_mult"], kw["num_blocks"], kw["attn_resolutions"]) == (
      192, (1, 2, 3, 4), 3, (32, 16, 8))
  assert not set(registry.SONG_ONLY) & set(kw)
  m.model_channels = 64
  assert registry.resolve_model_kwargs(m)[1]["model_channels"] == 64
  m.encoder_type = "residual"
  with pytest.raises(ValueError, match="encoder_type"):
    registry.resolve_model_kwargs(m)
  m = default_config().model
  m.arch = "unet"
  with pytest.raises(ValueError, match="unknown"):
    registry.resolve_model_kwargs(m)

  model = create_model(default_config().model, img_resolution=32, img_channels=3, label_dim=10)
  assert isinstance(model, SongUNet)
  assert (model.in_channels, model.out_channels, model.label_dim, model.dtype) == (5, 3, 10, jnp.float32)


def test_skip_encoder_decoder_and_augment_labels():
  # The skip variants and augment labels run on every patch size and use their parameters.
  model = tiny_song(encoder_type="skip", decoder_type="skip", augment_dim=9, label_dim=4,
                    resample_filter=(1, 3, 3, 1))
  variables = init_params(model, jax.random.key(0))
  p = traverse_util.flatten_dict(variables["params"])
  assert ("enc_8x8_aux_skip", "kernel") in p and ("dec_8x8_aux_conv", "kernel") in p
  assert ("map_augment", "kernel") in p and ("map_augment", "bias") not in p
  fn = jax.jit(model.apply)
  for size in (16, 8):
    x = jax.random.normal(jax.random.key(2), (2, size, size, 5))
    a = fn(variables, x, jnp.zeros(2), jnp.eye(4)[:2], jnp.zeros((2, 9)))
    b = fn(variables, x, jnp.zeros(2), jnp.eye(4)[:2], jnp.ones((2, 9)))
    assert a.shape == (2, size, size, 3) and float(jnp.abs(a - b).max()) > 0


def _naive_conv_transpose(x, f, stride, padding):
  """PyTorch conv_transpose2d (depthwise, same filter per channel) by scattering, NHWC, numpy."""
  n, h, w, c = x.shape
  k = f.shape[0]
  full = np.zeros((n, (h - 1) * stride + k, (w - 1) * stride + k, c), np.float64)
  for i in range(h):
    for j in range(w):
      full[:, i * stride:i * stride + k, j * stride:j * stride + k, :] += (
          x[:, i, j, None, None, :] * f[None, :, :, None])
  return full[:, padding:full.shape[1] - padding, padding:full.shape[2] - padding]


def _naive_conv(x, f, stride, padding):
  """PyTorch conv2d (depthwise, same filter per channel), NHWC, numpy."""
  xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  k = f.shape[0]
  ho = (xp.shape[1] - k) // stride + 1
  wo = (xp.shape[2] - k) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, x.shape[3]), np.float64)
  for i in range(ho):
    for j in range(wo):
      patch = xp[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
      out[:, i, j] = (patch * f[None, :, :, None]).sum(axis=(1, 2))
  return out


@pytest.mark.parametrize("taps", [(1, 1), (1, 3, 3, 1), (1, 2, 1)])
def test_resampling_matches_pytorch_semantics(taps):
  from patch_diffusion.models import layers
  x = np.random.default_rng(0).standard_normal((2, 6, 6, 3)).astype(np.float32)
  f = layers.resample_filter_2d(taps).astype(np.float64)
  for pad in sorted({0, (len(taps) - 1) // 2}):
    np.testing.assert_allclose(layers.upsample(jnp.asarray(x), taps, pad),
                               _naive_conv_transpose(x, f[::-1, ::-1] * 4, 2, pad), atol=1e-5)
    np.testing.assert_allclose(layers.downsample(jnp.asarray(x), taps, pad),
                               _naive_conv(x, f, 2, pad), atol=1e-5)
  # Fused paths (Patch Diffusion's padding rules) keep the 2x / 0.5x sizes for a 3x3 kernel and the
  # even-length filters EDM uses (odd ones give 2H-1 in PyTorch as well).
  for up in ((True, False) if len(taps) % 2 == 0 else ()):
    conv = layers.Conv2d(4, 3, up=up, down=not up, resample_filter=taps, fused_resample=True)
    y, _ = conv.init_with_output(jax.random.key(0), jnp.asarray(x))
    assert y.shape == ((2, 12, 12, 4) if up else (2, 3, 3, 4))
