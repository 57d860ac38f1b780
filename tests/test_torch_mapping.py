"""PyTorch state dict <-> Flax variables: names, layouts, buffers, error reporting, coordinate padding."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from patch_diffusion.models import DhariwalUNet, SongUNet
from patch_diffusion.interop.torch_mapping import (StateDictMismatchError, flax_path, torch_name,
                                                  torch_state_dict_to_variables,
                                                  variables_to_torch_state_dict)

FIXTURES = ("ddpmpp_uncond", "ddpmpp_cond", "ncsnpp_uncond", "adm_cond")


def load(fixtures_dir, name):
  meta = json.loads((fixtures_dir / "edm_torch" / f"{name}.json").read_text())
  data = np.load(fixtures_dir / "edm_torch" / f"{name}.npz")
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["model_kwargs"].items()}
  cls = SongUNet if meta["model_type"] == "SongUNet" else DhariwalUNet
  model = cls(img_resolution=meta["img_resolution"], in_channels=meta["in_channels"],
              out_channels=meta["out_channels"], label_dim=meta["label_dim"], **kwargs)
  state = {k[len("param/"):]: data[k] for k in data.files if k.startswith("param/")}
  return model, state


def test_names():
  assert flax_path("enc.16x16_block0.conv0.weight") == ("enc_16x16_block0", "conv0", "weight")
  assert flax_path("map_layer0.bias") == ("map_layer0", "bias")
  assert torch_name(("dec_8x8_aux_norm", "weight")) == "dec.8x8_aux_norm.weight"
  assert torch_name(("map_noise", "freqs")) == "map_noise.freqs"


@pytest.mark.parametrize("name", FIXTURES)
def test_round_trip_is_exact(fixtures_dir, name):
  model, state = load(fixtures_dir, name)
  variables = torch_state_dict_to_variables(state, model)
  # Layouts: conv [out,in,kh,kw] -> [kh,kw,in,out], linear [out,in] -> [in,out].
  conv = state["model.enc.16x16_conv.weight"]
  np.testing.assert_array_equal(variables["params"]["enc_16x16_conv"]["kernel"], conv.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables["params"]["map_layer0"]["kernel"], state["model.map_layer0.weight"].T)
  back = variables_to_torch_state_dict(variables, model)
  assert sorted(back) == sorted(state)  # includes the resample_filter buffers
  for key, value in state.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  assert ("buffers" in variables) == (name == "ncsnpp_uncond")


def test_prefix_is_optional(fixtures_dir):
  model, state = load(fixtures_dir, "ddpmpp_cond")
  bare = {k[len("model."):]: v for k, v in state.items()}
  a = torch_state_dict_to_variables(state, model)
  b = torch_state_dict_to_variables(bare, model)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_one_error_lists_every_problem(fixtures_dir):
  model, state = load(fixtures_dir, "ncsnpp_uncond")
  bad = dict(state)
  del bad["model.enc.8x8_block0.qkv.weight"]
  del bad["model.map_noise.freqs"]
  bad["model.enc.8x8_block0.extra.weight"] = np.zeros((3,), np.float32)
  bad["model.map_layer1.weight"] = np.zeros((5, 5), np.float32)
  bad["model.enc.8x8_down.conv0.resample_filter"] = np.full((1, 1, 4, 4), 1 / 16, np.float32)
  with pytest.raises(StateDictMismatchError) as info:
    torch_state_dict_to_variables(bad, model)
  msg = str(info.value)
  for expected in ("unknown keys (1)", "model.enc.8x8_block0.extra.weight",
                   "missing keys (2)", "enc.8x8_block0.qkv.weight", "map_noise.freqs",
                   "shape mismatches (1)", "model.map_layer1.weight: got (5, 5)", "(128, 128)",
                   "resample filter mismatches (1)", "model.enc.8x8_down.conv0.resample_filter"):
    assert expected in msg, (expected, msg)


def test_wrong_architecture_is_reported(fixtures_dir):
  model, state = load(fixtures_dir, "ddpmpp_uncond")
  _, adm_state = load(fixtures_dir, "adm_cond")
  with pytest.raises(StateDictMismatchError, match="map_label"):
    torch_state_dict_to_variables(adm_state, model)


def test_padding_coordinate_channels_for_plain_edm_networks(fixtures_dir):
  # A plain EDM network has no coordinate channels: its input convolutions read C channels only.
  model, state = load(fixtures_dir, "ncsnpp_uncond")
  edm = dict(state)
  for key in ("model.enc.16x16_conv.weight", "model.enc.8x8_aux_residual.weight"):
    edm[key] = state[key][:, :3]
  with pytest.raises(StateDictMismatchError, match="shape mismatches"):
    torch_state_dict_to_variables(edm, model)
  variables = torch_state_dict_to_variables(edm, model, pad_input_channels=2)
  for name in ("enc_16x16_conv", "enc_8x8_aux_residual"):
    kernel = np.asarray(variables["params"][name]["kernel"])
    assert kernel.shape[2] == 5 and not kernel[:, :, 3:].any()
  # Deeper aux_residual convs read feature maps and are untouched.
  np.testing.assert_array_equal(variables["params"]["enc_4x4_aux_residual"]["kernel"],
                                state["model.enc.4x4_aux_residual.weight"].transpose(2, 3, 1, 0))
  # The converted network ignores the coordinate channels entirely.
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
  noise = np.array([0.3, -0.2], np.float32)
  fn = jax.jit(model.apply)
  a = fn(variables, np.concatenate([x, rng.uniform(-1, 1, (2, 8, 8, 2)).astype(np.float32)], -1), noise)
  b = fn(variables, np.concatenate([x, rng.uniform(-1, 1, (2, 8, 8, 2)).astype(np.float32)], -1), noise)
  np.testing.assert_array_equal(a, b)
