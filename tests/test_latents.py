"""The latent path end to end (data/latents.py, experiment's LatentCodec, vae_training, tools/encode_latents):
encode a dataset once with a VAE (sharded, resumable, x-flip copies), train on the posterior moments,
resume bit-exactly, sample and decode to images, evaluate against the pixel data; clear errors.

The VAE is the fixture-sized SD VAE (``../shared/fixtures/sd_vae``: the SD architecture at reduced width,
8× downsampling, random weights), so 64×64 images give 8×8×4 latents; the data is TFDS ``celeb_a`` mock
data (``tfds.testing.mock_data``) or the embedded digits.
"""
from __future__ import annotations

import os
import pathlib

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from patch_diffusion import experiment
from patch_diffusion import generate
from patch_diffusion import parallel
from patch_diffusion import train
from patch_diffusion import vae_training
from patch_diffusion.config_validation import ConfigError
from patch_diffusion.data import latents
from patch_diffusion.interop import diffusers_vae
from patch_diffusion.tools import encode_latents
from helpers import steps_to_kimg, tiny


def latent_config(fixtures_dir, data_dir, **overrides):
  """Tiny latent run: 8×8×4 latents of 64×64 images (fixture VAE), latent patch sizes 4 and 8."""
  base = {"patch.latent": True, "data.resolution": 8, "data.num_channels": 4, "data.name": "digits",
          "data.max_examples": 48, "data.data_dir": str(data_dir), "data.prepare_latents": True,
          "model.vae": str(fixtures_dir / "sd_vae"), "model.channel_mult": (1, 2),
          "model.attn_resolutions": (4,), "train.checkpoint_every_steps": 2, "train.log_every_steps": 1,
          "sample.num_samples": 8, "sample.batch_size": 8, "eval.batch_size": 16}
  c = tiny(**{**base, **overrides})
  c.train.total_kimg = steps_to_kimg(c, 4)
  return c


def test_record_roundtrip():
  mean = np.random.default_rng(0).normal(size=(8, 8, 4)).astype(np.float16)
  std = np.abs(mean) / 10
  rec = latents.decode_record(latents.encode_record(7, mean, std), (8, 8, 4))
  assert rec["label"] == 7
  np.testing.assert_array_equal(rec["mean"], mean)
  np.testing.assert_array_equal(rec["std"], std)
  with pytest.raises(latents.LatentDatasetError, match="encode it again"):
    latents.decode_record(latents.encode_record(7, mean, std), (4, 4, 4))


def test_sharded_encoding_equals_single_device(fixtures_dir):
  module, variables = diffusers_vae.load_vae(fixtures_dir / "sd_vae")
  spec = latents.EncodeSpec(pixel_data_config=None, vae_module=module, vae_variables=variables,
                            fingerprint="x", scaling_factor=0.18215)
  images = np.random.default_rng(1).integers(0, 256, (8, 64, 64, 3), np.uint8)
  out = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = parallel.create_mesh((-1,), ("data",), devices=devices)
    mean, std = latents.make_encode_fn(spec, mesh, dtype=np.float32)(
        jax.device_put(images, parallel.data_sharding(mesh)))
    out.append((np.asarray(mean), np.asarray(std)))
  assert len(jax.devices()) == 8
  np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-5, atol=1e-6)
  assert out[0][0].shape == (8, 8, 8, 4)


@pytest.fixture(scope="module")
def latent_run(fixtures_dir, tmp_path_factory):
  """A 4-step latent run on mock CelebA at 64×64 (encoded once on first use), and its pieces."""
  root = tmp_path_factory.mktemp("latent_run")
  c = latent_config(fixtures_dir, root / "data", **{"data.name": "celeb_a", "data.num_channels": 4,
                                                     "data.max_examples": 0})
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    result = train.train_and_evaluate(c, str(root / "run"))
    exp = experiment.build_experiment(c)
  return c, root, result, exp


def test_latent_run_encodes_once_trains_and_samples_images(latent_run):
  c, root, result, exp = latent_run
  assert result["step"] == 4 and np.isfinite(result["loss"])
  folder = pathlib.Path(experiment.latent_dir(c, exp.codec))
  meta = latents.read_metadata(str(folder))
  assert meta["num_records"] == 24 and tuple(meta["shape"]) == (8, 8, 4) and meta["vae"] == exp.codec.fingerprint
  assert folder.is_relative_to(root / "data")  # cached under data.data_dir
  assert exp.schedule.sizes == (4, 8) and exp.codec.factor == 8
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    c.sample.keep_latents = True
    path = generate.sample(c, str(root / "run"))
  with np.load(path) as f:
    images, lats = f["images"], f["latents"]
  assert images.shape == (8, 64, 64, 3) and images.dtype == np.uint8 and images.std() > 0  # decoded
  assert lats.shape == (8, 8, 8, 4) and lats.dtype == np.float32
  # The decoded images are the VAE's decoding of the kept latents.
  decoded = np.asarray(jax.jit(exp.codec.decode)(lats))
  np.testing.assert_allclose(images.astype(int), np.clip(decoded * 127.5 + 128, 0, 255).astype(int), atol=1)
  assert (root / "run" / "samples.png").exists()


def test_latent_run_resumes_bit_exactly(latent_run, fixtures_dir, tmp_path):
  c, root, _, _ = latent_run
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    first = latent_config(fixtures_dir, root / "data", **{"data.name": "celeb_a", "data.max_examples": 0})
    first.train.total_kimg = steps_to_kimg(first, 2)
    train.train_and_evaluate(first, str(tmp_path))
    resumed = train.train_and_evaluate(c, str(tmp_path))
    assert resumed["resumed_from"] == 2 and resumed["step"] == 4
    exp = experiment.build_experiment(c)
    states = []
    for workdir in (root / "run", tmp_path):
      _, variables, info = experiment.load_ema_variables(c, str(workdir))
      assert info["step"] == 4
      states.append(jax.device_get(variables))
  for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
    np.testing.assert_array_equal(a, b)
  assert exp.codec is not None


def test_encoding_resumes_and_stores_flipped_copies(fixtures_dir, tmp_path):
  c = latent_config(fixtures_dir, tmp_path / "data", **{"data.max_examples": 12, "data.xflip": True})
  mesh = parallel.create_mesh()
  codec = experiment.load_codec(c, mesh)
  spec = experiment.encode_spec(c, codec)
  spec = type(spec)(**{**spec.__dict__, "batch_size": 8, "chunk_batches": 1})
  folder = tmp_path / "lat"
  meta = latents.encode_dataset(spec, str(folder), mesh)
  assert meta["num_records"] == 2 * 12 and meta["xflip"]  # every image and its mirror
  source = latents.LatentSource(str(folder))
  # Record 2k+1 of a batch is the mirror of record k: its latent is the encoding of the flipped image.
  pixels = experiment.pixel_data_config(c, codec)
  from patch_diffusion.data import datasets, input_pipeline  # pylint: disable=g-import-not-at-top
  src, info = datasets.get_data_source(pixels)
  pre = input_pipeline.PreprocessedSource(src, info.resolution, info.num_channels, False)
  enc = latents.make_encode_fn(spec, mesh, dtype=np.float32)
  batch = np.stack([pre[i]["image"] for i in range(8)])
  flipped_mean, _ = enc(jax.device_put(np.ascontiguousarray(batch[:, :, ::-1]), parallel.data_sharding(mesh)))
  np.testing.assert_allclose(source[8]["mean"].astype(np.float32), np.asarray(flipped_mean)[0], rtol=2e-3, atol=2e-3)
  # Resume: a lost chunk (and the completion marker) is re-encoded; the other chunks are kept as they were.
  chunks = sorted(p for p in folder.iterdir() if p.suffix == ".array_record")
  assert len(chunks) == 2
  mtime = chunks[0].stat().st_mtime_ns
  before = [source[i]["mean"] for i in range(len(source))]
  chunks[1].unlink()
  (folder / latents.METADATA).unlink()
  latents.encode_dataset(spec, str(folder), mesh)
  assert chunks[0].stat().st_mtime_ns == mtime and chunks[1].exists()
  again = latents.LatentSource(str(folder))
  for i, m in enumerate(before):
    np.testing.assert_array_equal(again[i]["mean"], m)


def test_encode_latents_cli(fixtures_dir, tmp_path, capsys):
  config_file = tmp_path / "latent_cfg.py"
  config_file.write_text(
      "from configs import tiny_test\n\n"
      "def get_config():\n"
      "  c = tiny_test.get_config()\n"
      "  c.patch.latent = True\n  c.data.resolution = 8\n  c.data.num_channels = 4\n"
      "  c.model.channel_mult = (1, 2)\n  c.model.attn_resolutions = (4,)\n"
      f"  c.model.vae = {str(fixtures_dir / 'sd_vae')!r}\n  c.data.max_examples = 16\n"
      f"  c.data.data_dir = {str(tmp_path / 'data')!r}\n  c.eval.batch_size = 8\n"
      "  return c\n")
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  assert encode_latents.main(["--config", str(config_file)]) == 0
  out = capsys.readouterr().out
  assert "16 records of shape (8, 8, 4)" in out


def test_vae_training_saves_a_diffusers_vae_that_loads(tmp_path):
  _, config, _ = vae_training.BUILTIN["digits"]
  images = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 1), np.uint8)
  trained, variables = vae_training.train_vae(images, config, vae_training.TrainSettings(steps=3, batch_size=8))
  assert trained.scaling_factor > 0 and trained.scaling_factor != 1.0  # set from the latents' std
  diffusers_vae.save_vae(tmp_path / "vae", trained, variables)
  module, loaded = diffusers_vae.load_vae(tmp_path / "vae")
  assert module.config == trained
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_fixed_class_sampling(tmp_path):
  c = tiny(**{"data.use_labels": True, "sample.class_label": 3, "sample.num_steps": 2})
  exp = experiment.build_experiment(c)
  gen = exp.generate_fn(8)
  _, labels = gen(exp.init_variables(jax.random.key(0)), jax.random.key(1), 0)
  assert np.all(np.asarray(labels) == 3)


@pytest.mark.parametrize("case", ["missing VAE file", "VAE latent channels differ", "no VAE for a latent run",
                                  "latent run pointed at an image folder"])
def test_latent_errors_are_clear(case, fixtures_dir, tmp_path):
  c = latent_config(fixtures_dir, tmp_path / "data", **{"data.prepare_latents": False})
  if case == "missing VAE file":
    c.model.vae = str(tmp_path / "nope")
    error, match = FileNotFoundError, "model.vae = .*no such file or directory.*sd-vae-ft-ema"
  elif case == "VAE latent channels differ":
    c.data.num_channels = 3
    error, match = ConfigError, "data.num_channels = 3: the VAE .* has 4 latent channels"
  elif case == "no VAE for a latent run":
    c.model.vae = ""
    error, match = ConfigError, "model.vae = '': patch.latent=True trains on VAE latents"
  else:
    folder = tmp_path / "images"
    folder.mkdir()
    c.data.latent_dir = str(folder)  # an image folder, not a latent dataset
    error, match = latents.LatentDatasetError, "(?s)no latent dataset at .*encode_latents"
  with pytest.raises(error, match=match):
    train.train_and_evaluate(c, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_converted_latent_network_samples_decoded_images(fixtures_dir, tmp_path):
  """A converted EDM/Patch Diffusion latent-like network (the ADM fixture: 4 channels, 10 classes) and the
  fixture-built VAE give a PNG grid of decoded images through --mode=sample's code path."""
  from patch_diffusion.tools import convert_torch  # pylint: disable=g-import-not-at-top
  dst = tmp_path / "adm"
  assert convert_torch.main([str(fixtures_dir / "edm_torch" / "adm_cond.npz"), str(dst), "--img_channels", "4"]) == 0
  c = tiny(**{"sample.pretrained": str(dst), "patch.latent": True, "data.num_channels": 4,
              "model.vae": str(fixtures_dir / "sd_vae"), "sample.num_samples": 4, "sample.batch_size": 8,
              "sample.num_steps": 3, "sample.guidance": 1.3, "sample.class_label": 2})
  path = generate.sample(c, str(tmp_path / "work"))
  with np.load(path) as f:
    images, labels = f["images"], f["labels"]
  assert images.shape == (4, 128, 128, 3) and images.dtype == np.uint8  # 16x16x4 latents, 8x VAE
  assert np.all(labels == 2) and images.std() > 0
  assert (tmp_path / "work" / "samples.png").is_file()


def test_convert_torch_converts_a_vae_with_legacy_names(fixtures_dir, tmp_path, capsys):
  from patch_diffusion.tools import convert_torch  # pylint: disable=g-import-not-at-top
  src = tmp_path / "legacy"
  src.mkdir()
  (src / "config.json").write_text((fixtures_dir / "sd_vae" / "config.json").read_text())
  (src / "diffusion_pytorch_model.safetensors").write_bytes(
      (fixtures_dir / "sd_vae" / "legacy_attention_names.safetensors").read_bytes())
  assert convert_torch.main([str(src), str(tmp_path / "vae")]) == 0
  assert "use it with --config.model.vae=" in capsys.readouterr().out
  _, converted = diffusers_vae.load_vae(tmp_path / "vae")
  _, reference = diffusers_vae.load_vae(fixtures_dir / "sd_vae")
  for a, b in zip(jax.tree.leaves(converted), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(a, b)
