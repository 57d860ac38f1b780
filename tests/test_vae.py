"""Stable-Diffusion VAE: parity with diffusers, both attention namings, the real-size layout, loader errors,
sharded encode/decode, bfloat16 compute.

``python3 -m pytest -q -s tests/test_vae.py -k parity`` prints the parity figures quoted in docs/MODELS.md.
"""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from patch_diffusion.interop import diffusers_vae as dv
from patch_diffusion.models import vae

TOLERANCE = 1e-4  # max |err| / max |ref|, float32
BF16_TOLERANCE = 5e-2  # max |err| / max |ref| of bfloat16 compute against float32


def nhwc(a: np.ndarray) -> np.ndarray:
  return np.transpose(a, (0, 2, 3, 1))


def rel_err(got, ref) -> float:
  return float(np.max(np.abs(np.asarray(got, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def vae_dir(fixtures_dir):
  return fixtures_dir / "sd_vae"


@pytest.fixture(scope="module")
def loaded(vae_dir):
  return dv.load_vae(vae_dir)


@pytest.fixture(scope="module")
def io(vae_dir):
  data = np.load(vae_dir / "io.npz")
  return {k: nhwc(data[k]) for k in data.files}


def test_parity_with_diffusers(loaded, io):
  module, variables = loaded
  assert module.config == vae.VAEConfig(block_out_channels=(32, 64, 64, 64))
  # CPU float32 convolutions are exact float32 either way (the figures are identical without it); on
  # GPUs the default would be TF32.
  with jax.default_matmul_precision("highest"):
    mean, logvar = jax.jit(functools.partial(vae.encode_moments, module))(variables, io["x"])
    decoded = jax.jit(functools.partial(vae.decode_latents, module))(variables, io["z"])
  sample = vae.posterior_sample(mean, logvar, io["eps"])
  got = {"mean": mean, "logvar": logvar, "sample": sample, "decoded": decoded}
  errors = {}
  for name, value in got.items():
    assert value.shape == io[name].shape and value.dtype == jnp.float32, name
    errors[name] = rel_err(value, io[name])
  print("\nVAE parity, max|err|/max|ref| (float32): "
        + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
  assert max(errors.values()) <= TOLERANCE, errors


def test_group_norm_groups_and_eps():
  # The fixture parity only moves by ~3e-5 when eps is 1e-5 instead of 1e-6 (below TOLERANCE), so eps and
  # the channel-to-group assignment are pinned here on inputs whose variance (1e-6) is comparable to eps.
  rng = np.random.default_rng(0)
  offsets = np.repeat(rng.normal(size=32), 2)  # one offset per group: the group variance stays 1e-6
  x = (rng.normal(size=(2, 4, 4, 64)) * 1e-3 + offsets).astype(np.float32)
  xg = x.astype(np.float64).reshape(2, 4, 4, 32, 2)  # channel c is in group c // 2, as in PyTorch
  ref = (xg - xg.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(xg.var(axis=(1, 2, 4), keepdims=True) + 1e-6)
  norm = vae.group_norm(32)
  got = norm.apply(norm.init(jax.random.key(0), x), x)
  assert rel_err(got, ref.reshape(x.shape)) < 1e-2  # eps 1e-5 would give ~0.5


def test_legacy_attention_names_give_identical_params(loaded, vae_dir):
  _, current = loaded
  _, legacy = dv.load_vae(vae_dir / "legacy_attention_names.safetensors", vae_dir / "config.json")
  a, b = traverse_util.flatten_dict(current["params"]), traverse_util.flatten_dict(legacy["params"])
  assert a.keys() == b.keys()
  for path in a:
    assert a[path].dtype == b[path].dtype == np.float32
    assert np.array_equal(a[path], b[path]), path
  # The legacy file really uses the old names (otherwise this test would prove nothing).
  names = dv.read_safetensors(vae_dir / "legacy_attention_names.safetensors").keys()
  assert "encoder.mid_block.attentions.0.proj_attn.weight" in names
  assert not any(".to_q." in n for n in names)


def test_bare_file_infers_the_fixture_config(loaded, vae_dir):
  module, variables = dv.load_vae(vae_dir / dv.WEIGHTS_NAME)
  assert module.config == loaded[0].config
  assert jax.tree.all(jax.tree.map(np.array_equal, variables, loaded[1]))


def _to_legacy(name: str) -> str:
  for old, new in dv.LEGACY_ATTENTION_NAMES.items():
    name = name.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
  return name


@pytest.mark.parametrize("naming", ["current", "legacy"])
def test_real_size_layout_maps_one_to_one(vae_dir, naming):
  manifest = json.loads((vae_dir / "real_config_shapes.json").read_text())
  shapes = {k: tuple(v) for k, v in manifest["state_dict_shapes"].items()}
  if naming == "legacy":
    shapes = {_to_legacy(k): v for k, v in shapes.items()}
    assert sum(".query." in k for k in shapes) == 4  # 2 (weight, bias) x encoder/decoder
  config = vae.VAEConfig.from_diffusers_config(manifest["config"])
  assert config == vae.VAEConfig()  # the defaults are the SD VAE
  assert dv.infer_config(shapes) == config

  mapped = traverse_util.flatten_dict(dv.map_state_dict_shapes(shapes))
  expected = traverse_util.flatten_dict(vae.abstract_vae_params(vae.AutoencoderKL(config))["params"])
  # Every state-dict entry reaches its own param (no two share one), every param is reached, and the
  # shapes agree after transposition.
  assert len(mapped) == len(shapes) == len(expected) == 248
  assert mapped.keys() == expected.keys()
  assert {p: tuple(v.shape) for p, v in expected.items()} == mapped
  assert sum(int(np.prod(s)) for s in shapes.values()) == manifest["num_params"] == 83_653_863
  dv.map_state_dict_shapes(shapes, config)  # the checked variant agrees


def test_every_problem_reported_in_one_error(loaded, vae_dir):
  module, _ = loaded
  sd = dict(dv.read_safetensors(vae_dir / dv.WEIGHTS_NAME))
  del sd["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"]  # missing
  sd["encoder.mid_block.attentions.1.to_q.weight"] = np.zeros((64, 64), np.float32)  # unknown
  sd["encoder.conv_in.weight"] = np.zeros((32, 4, 3, 3), np.float32)  # mis-shaped
  # The same parameter under both namings.
  sd["decoder.mid_block.attentions.0.query.bias"] = sd["decoder.mid_block.attentions.0.to_q.bias"]
  with pytest.raises(dv.VAEWeightsError) as info:
    dv.convert_state_dict(sd, module.config)
  msg = str(info.value)
  assert isinstance(info.value, ValueError)
  assert "missing keys (1):\n    decoder.up_blocks.3.resnets.0.conv_shortcut.weight" in msg
  assert "unknown keys (1):\n    encoder.mid_block.attentions.1.to_q.weight (64, 64)" in msg
  assert "encoder.conv_in.weight: got (32, 4, 3, 3) (PyTorch layout), expected (32, 3, 3, 3)" in msg
  assert ("decoder.mid_block.attentions.0.query.bias and decoder.mid_block.attentions.0.to_q.bias both map "
          "to decoder/mid_block/attentions_0/to_q/bias") in msg


def test_config_rejections_list_every_problem():
  bad = dict(vae.VAEConfig(block_out_channels=(32, 64)).to_diffusers_config(),
             act_fn="gelu", up_block_types=["UpDecoderBlock2D", "AttnUpDecoderBlock2D"],
             use_quant_conv=False, shift_factor=0.1159, some_new_option=1,
             _diffusers_version="0.30.0", sample_size=512, force_upcast=True)
  with pytest.raises(ValueError) as info:
    vae.VAEConfig.from_diffusers_config(bad)
  msg = str(info.value)
  for word in ("act_fn 'gelu'", "AttnUpDecoderBlock2D", "use_quant_conv=False", "shift_factor=0.1159",
               "unknown keys ['some_new_option']"):
    assert word in msg, word
  with pytest.raises(ValueError, match="multiples of norm_num_groups"):
    vae.VAEConfig(block_out_channels=(32, 48))
  with pytest.raises(ValueError, match=r"transpose NCHW"):
    vae.AutoencoderKL(vae.VAEConfig(block_out_channels=(32, 32))).init(
        jax.random.key(0), jnp.zeros((1, 3, 16, 16)))


def test_sharded_encode_decode_matches_single_device(loaded, io):
  module, variables = loaded
  devices = np.array(jax.devices()[:8])
  assert devices.size == 8, "tests/conftest.py provides 8 CPU devices"
  mesh = Mesh(devices, ("data",))
  batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  x = io["x"]
  # Eight different images: the two fixtures, flipped, negated, transposed.
  images = np.concatenate([x, x[:, ::-1], x[:, :, ::-1], -np.swapaxes(x, 1, 2)])
  z = np.concatenate([io["z"], io["z"][:, ::-1], -io["z"], np.swapaxes(io["z"], 1, 2)])

  encode = functools.partial(vae.encode_moments, module)
  decode = functools.partial(vae.decode_latents, module)
  mean1, logvar1 = jax.jit(encode)(variables, images)
  dec1 = jax.jit(decode)(variables, z)
  mean8, logvar8 = jax.jit(encode, in_shardings=(replicated, batch),
                           out_shardings=(batch, batch))(variables, images)
  dec8 = jax.jit(decode, in_shardings=(replicated, batch), out_shardings=batch)(variables, z)
  for value in (mean8, logvar8, dec8):
    assert value.sharding.is_equivalent_to(batch, value.ndim)
    assert len({s.device for s in value.addressable_shards}) == 8
  for got, ref in ((mean8, mean1), (logvar8, logvar1), (dec8, dec1)):
    assert rel_err(got, np.asarray(ref)) <= 1e-6
  # The samples differ, so a mix-up between shards could not pass.
  assert rel_err(dec1[4:], np.asarray(dec1[:4])) > 1e-2


def test_bfloat16_compute_close_to_float32(loaded, io):
  module32, variables = loaded
  module = vae.AutoencoderKL(module32.config, dtype=jnp.bfloat16)
  mean, logvar = jax.jit(functools.partial(vae.encode_moments, module))(variables, io["x"])
  decoded = jax.jit(functools.partial(vae.decode_latents, module))(variables, io["z"])
  errors = {"mean": rel_err(mean, io["mean"]), "logvar": rel_err(logvar, io["logvar"]),
            "decoded": rel_err(decoded, io["decoded"])}
  print("\nVAE bfloat16 vs float32 reference, max|err|/max|ref|: "
        + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
  assert all(v.dtype == jnp.float32 for v in (mean, logvar, decoded))
  assert all(a.dtype == np.float32 for a in jax.tree.leaves(variables))  # params untouched
  assert max(errors.values()) <= BF16_TOLERANCE, errors
  assert min(errors.values()) > 1e-5, "bfloat16 compute gave float32 results: the dtype is not applied"
