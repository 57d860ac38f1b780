"""MultistageUNet (Zhang et al. CVPR 2024): parity with the authors' PyTorch network, stage selection,
state-dict mapping, per-stage gradients, initialisation and registry."""
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

from patch_diffusion.models import MultistageUNet, create_model, init_params, registry, stage_of_sigma
from patch_diffusion.models.multistage_unet import boundaries_from_stage_interval, check_stage_boundaries
from patch_diffusion.interop.torch_mapping import (_leaf_candidates, _to_flax, flax_path,
                                                  torch_state_dict_to_variables,
                                                  variables_to_torch_state_dict)

TOLERANCE = 1e-4  # max |err| / max |F|, float32
NAME = "multistage_uncond"


def default_config():
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"
  spec = importlib.util.spec_from_file_location("default_config_for_multistage_tests", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def fixture_model_config(ctor):
  """config.model for the fixture's constructor arguments, every field verbatim."""
  m = default_config().model
  m.arch, m.arch_presets = "ddpmpp-multistage", False
  m.model_channels = ctor["en_model_channels"]
  m.decoder_channels = tuple(ctor["de_model_channels"])
  m.stage_boundaries = boundaries_from_stage_interval(ctor["stage_interval"])
  for key in ("channel_mult", "attn_resolutions", "resample_filter"):
    m[key] = tuple(ctor[key])
  for key in ("num_blocks", "dropout", "embedding_type", "channel_mult_noise", "encoder_type",
              "decoder_type"):
    m[key] = ctor[key]
  return m


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
  meta = json.loads((fixtures_dir / "multistage" / f"{NAME}.json").read_text())
  data = np.load(fixtures_dir / "multistage" / f"{NAME}.npz")
  ctor = meta["constructor"]
  assert ctor["stage_num"] == len(ctor["de_model_channels"]) == 3
  model = create_model(fixture_model_config(ctor), img_resolution=ctor["img_resolution"],
                       img_channels=ctor["out_channels"], label_dim=ctor["label_dim"])
  assert isinstance(model, MultistageUNet) and model.in_channels == ctor["in_channels"]
  state = {k[len("param/"):]: data[k] for k in data.files if k.startswith("param/")}
  variables = torch_state_dict_to_variables(state, model)
  return meta, data, model, state, variables


def nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


def case(data, stage, size):
  g = f"stage{stage}_s{size}/"
  return nhwc(data[g + "x_in"]), data[g + "noise_labels"], float(data[g + "sigma"]), nhwc(data[g + "F"])


@pytest.mark.parametrize("mode", ["static", "from_sigma"])
def test_parity_with_authors_network(fixture, mode):
  meta, data, model, _, variables = fixture
  if mode == "static":
    # `stage` is a Python int: one decoder compiled per call signature.
    fn = jax.jit(model.apply, static_argnames="stage")
  else:
    # stage=None: chosen inside jit from the traced noise labels (sigma_0 = exp(4 * noise_labels[0])).
    fn = jax.jit(model.apply)
  errors = {}
  for stage, sigma_expected in enumerate(meta["stage_sigmas"]):
    for size in meta["patch_sizes"]:
      x, noise_labels, sigma, ref = case(data, stage, size)
      assert sigma == pytest.approx(sigma_expected)
      np.testing.assert_allclose(noise_labels, np.log(sigma) / 4, rtol=1e-6)
      out = np.asarray(fn(variables, x, noise_labels, stage=stage) if mode == "static"
                       else fn(variables, x, noise_labels))
      assert out.shape == ref.shape == (x.shape[0], size, size, 3) and out.dtype == np.float32
      errors[stage, size] = float(np.abs(out - ref).max() / np.abs(ref).max())
  print(f"\nPARITY {NAME} ({mode}): " + ", ".join(
      f"stage {k} (sigma {meta['stage_sigmas'][k]}) patch {s}: {e:.2e}" for (k, s), e in errors.items()))
  for (stage, size), err in errors.items():
    assert err <= TOLERANCE, f"stage {stage} patch {size}: max rel err {err:.3e}"


def test_wrong_decoder_is_far_off(fixture):
  # The parity above is only meaningful if the decoders differ: every other stage's decoder misses
  # the reference by O(1).
  _, data, model, _, variables = fixture
  fn = jax.jit(model.apply, static_argnames="stage")
  x, noise_labels, _, ref = case(data, 1, 8)
  for other in (0, 2):
    out = np.asarray(fn(variables, x, noise_labels, stage=other))
    assert np.abs(out - ref).max() > 0.1 * np.abs(ref).max()


def test_batch_uses_the_first_samples_stage(fixture):
  # As the authors' forward: one stage per batch, that of sample 0.
  _, data, model, _, variables = fixture
  x, _, _, _ = case(data, 2, 8)
  mixed = np.log(np.array([30.0, 0.7, 4.0], np.float32)) / 4
  by_sigma = np.asarray(jax.jit(model.apply)(variables, x, mixed))
  static = jax.jit(model.apply, static_argnames="stage")
  want = np.asarray(static(variables, x, mixed, stage=2))
  np.testing.assert_allclose(by_sigma, want, rtol=0, atol=1e-5 * np.abs(want).max())
  assert np.abs(by_sigma - np.asarray(static(variables, x, mixed, stage=0))).max() > 0.1 * np.abs(want).max()
  # A traced integer stage selects the same way.
  traced = np.asarray(jax.jit(model.apply)(variables, x, mixed, stage=jnp.int32(2)))
  np.testing.assert_allclose(traced, want, rtol=0, atol=1e-5 * np.abs(want).max())


def _authors_stage(noise_label, sigma0, stage_interval):
  """The authors' forward loop, literally, in float32: the last stage with
  sigma0 = exp(4 * noise_label) > lower and noise_label <= upper; None when no stage matches."""
  nl, sigma0 = np.float32(noise_label), np.float32(sigma0)
  current = None
  for i, intervals in enumerate(stage_interval):
    for lo, hi in intervals:
      if sigma0 > np.float32(lo) and nl <= np.float32(hi):
        current = i
  return current


def test_stage_of_sigma_boundaries():
  b = (2.5103, 7.6577)
  f32 = np.float32
  up = lambda v: np.nextafter(f32(v), f32(np.inf))  # noqa: E731
  down = lambda v: np.nextafter(f32(v), f32(0))  # noqa: E731
  cases = {0.002: 0, down(2.5103): 0, f32(2.5103): 0, up(2.5103): 1, 4.0: 1, down(7.6577): 1,
           f32(7.6577): 1, up(7.6577): 2, 80.0: 2, 1e30: 2, np.inf: 2,
           # Outside the authors' domain (their loop selects nothing): stage 0.
           0.0: 0, -1.0: 0, np.nan: 0}
  sigma = np.array(list(cases), np.float32)
  want = np.array(list(cases.values()), np.int32)
  got = stage_of_sigma(sigma, b)
  assert got.dtype == jnp.int32 and got.shape == sigma.shape
  np.testing.assert_array_equal(got, want)
  # Elementwise on any shape, jittable with traced sigma and traced boundaries.
  np.testing.assert_array_equal(stage_of_sigma(sigma.reshape(2, 7), b), want.reshape(2, 7))
  np.testing.assert_array_equal(jax.jit(stage_of_sigma, static_argnums=1)(sigma, b), want)
  np.testing.assert_array_equal(jax.jit(stage_of_sigma)(sigma, jnp.asarray(b, jnp.float32)), want)
  assert int(stage_of_sigma(3.0, b)) == 1 and stage_of_sigma(3.0, b).shape == ()
  assert int(stage_of_sigma(3.0, ())) == 0  # one stage
  for bad in ((7.6577, 2.5103), (2.5, 2.5), (0.0, 1.0), (1.0, math.inf), ((1.0, 2.0),)):
    with pytest.raises(ValueError, match="stage boundaries"):
      stage_of_sigma(1.0, bad)
  with pytest.raises(ValueError, match="need 2 stage boundaries"):
    check_stage_boundaries((1.0,), num_stages=3)


def test_stage_selection_matches_the_authors_loop():
  # Their loop compares sigma with the lower bound but ln(sigma)/4 with the upper bound; on a dense
  # sigma grid and right around the boundaries it picks exactly what stage_of_sigma(exp(4 nl)) does.
  interval = [[[0, 2.5103]], [[2.5103, 7.6577]], [[7.6577, math.inf]]]
  model = MultistageUNet(img_resolution=8, in_channels=5, out_channels=3,
                         stage_boundaries=boundaries_from_stage_interval(interval))
  sigmas = np.concatenate([np.geomspace(1e-4, 1e6, 2001), [2.5103, 7.6577]]).astype(np.float32)
  labels = np.log(sigmas) / 4
  labels = np.concatenate([labels] + [np.nextafter(labels, np.float32(d)) for d in (-np.inf, np.inf)])
  # Labels whose exp(4 nl) lands on a boundary exactly (both sides of it).
  for boundary in (2.5103, 7.6577):
    nl = np.float32(np.log(np.float32(boundary)) / 4)
    labels = np.concatenate([labels, [np.nextafter(nl, np.float32(-1)), nl, np.nextafter(nl, np.float32(1))]])
  labels = labels.astype(np.float32)
  ours = np.asarray(jax.vmap(lambda nl: model.select_stage(nl[None]))(labels))
  # exp(4 nl) itself is taken from XLA: PyTorch's and XLA's float32 exp may round differently in the
  # last bit, which can move a label within one ulp of a boundary to the other stage (a rounding
  # difference, not a rule difference).
  sigma0 = np.asarray(jnp.exp(jnp.asarray(labels) * 4))
  theirs = np.array([_authors_stage(nl, s, interval) for nl, s in zip(labels, sigma0)])
  np.testing.assert_array_equal(ours, theirs)
  assert set(theirs) == {0, 1, 2}


def test_boundaries_from_stage_interval():
  assert boundaries_from_stage_interval([[[0, 2.5103]], [[2.5103, 7.6577]], [[7.6577, "inf"]]]) == (
      2.5103, 7.6577)
  with pytest.raises(ValueError, match="only one contiguous"):
    boundaries_from_stage_interval([[[0, 1.0], [5.0, "inf"]], [[1.0, 5.0]]])
  with pytest.raises(ValueError, match="tile"):
    boundaries_from_stage_interval([[[0, 1.0]], [[2.0, "inf"]]])


def test_mapping_covers_every_parameter_once(fixture):
  _, _, model, state, variables = fixture
  flat = traverse_util.flatten_dict(variables["params"])
  targets = {}
  buffers = []
  for name, value in state.items():
    path = flax_path(name)
    if path[-1] == "resample_filter":
      buffers.append(name)
      continue
    hits = [path[:-1] + (c,) for c in _leaf_candidates(path[-1]) if path[:-1] + (c,) in flat]
    assert len(hits) == 1, (name, hits)
    assert hits[0] not in targets, f"{name} and {targets.get(hits[0])} map to the same leaf"
    targets[hits[0]] = name
    np.testing.assert_array_equal(flat[hits[0]], _to_flax(value), err_msg=name)
  assert set(targets) == set(flat)  # every Flax leaf comes from exactly one PyTorch tensor
  assert "buffers" not in variables
  assert len(buffers) == 16  # conv0 + skip of each resampling block: 2 encoder downs, 3 x 2 decoder ups
  # The decoders are the submodules decs_<k>; the shared part is named as in SongUNet.
  assert {p[0] for p in flat if p[0].startswith("decs")} == {"decs_0", "decs_1", "decs_2"}
  assert ("decs_1", "8x8_block1", "qkv", "kernel") in flat and ("enc_16x16_conv", "kernel") in flat
  assert targets["decs_1", "8x8_block1", "qkv", "kernel"] == "decs.1.8x8_block1.qkv.weight"

  # Round trip variables -> state dict -> variables is exact, resample buffers included.
  back = variables_to_torch_state_dict(variables, model, prefix="")
  assert sorted(back) == sorted(state)
  for key, value in state.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  again = torch_state_dict_to_variables(back, model)
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, variables)
  # The 'model.' prefix of EDM's precond wrapper is optional, as for the other networks.
  prefixed = variables_to_torch_state_dict(variables, model)
  assert all(k.startswith("model.decs.") or not k.startswith("model.dec") for k in prefixed)
  jax.tree_util.tree_map(np.testing.assert_array_equal, torch_state_dict_to_variables(prefixed, model),
                         variables)


def test_init_creates_every_decoder_and_counts_parameters(fixture):
  meta, _, model, _, variables = fixture
  fresh = init_params(model, jax.random.key(0))
  assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(variables)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), fresh, variables)
  n = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(fresh))
  print(f"\nPARAMS {NAME}: {n} (authors' network: {meta['num_params']})")
  assert n == meta["num_params"]
  # init with a static stage still creates all decoders.
  x = jnp.zeros((1, 4, 4, 5))
  only = jax.eval_shape(lambda: model.init(jax.random.key(0), x, jnp.zeros((1,)), stage=2))
  assert {k for k in only["params"] if k.startswith("decs")} == {"decs_0", "decs_1", "decs_2"}
  # EDM's init in every decoder: xavier_uniform * 1e-5 for the output conv.
  for k, width in enumerate(model.decoder_channels):
    kernel = np.asarray(fresh["params"][f"decs_{k}"]["16x16_aux_conv"]["kernel"])
    assert kernel.shape == (3, 3, width, 3)
    assert 0 < np.abs(kernel).max() <= 1e-5 * math.sqrt(6 / (width * 9 + 3 * 9))


def _grad_norms(grads):
  return {p: float(jnp.abs(g).max()) for p, g in traverse_util.flatten_dict(grads["params"]).items()}


@pytest.mark.parametrize("stage", [0, 1, 2, None])
def test_only_the_selected_decoder_gets_gradients(fixture, stage):
  _, data, model, _, variables = fixture
  sigma_stage = 1 if stage is None else stage
  x, noise_labels, _, ref = case(data, sigma_stage, 8)

  def loss(v, x, nl):
    return jnp.mean(jnp.square(model.apply(v, x, nl, stage=stage) - ref))

  norms = _grad_norms(jax.jit(jax.grad(loss))(variables, x, noise_labels))
  selected = f"decs_{sigma_stage}"
  if stage is not None:
    # A static stage traces only its decoder: the others' parameters need not even be present.
    pruned = {"params": {k: v for k, v in variables["params"].items()
                         if not k.startswith("decs_") or k == selected}}
    assert jax.eval_shape(lambda: model.apply(pruned, x, noise_labels, stage=stage)).shape == ref.shape
  for path, norm in norms.items():
    if path[0].startswith("decs_") and path[0] != selected:
      assert norm == 0.0, (path, norm)  # exactly zero, not small
    else:
      assert norm > 0.0, (path, norm)  # the shared part and the selected decoder all learn


def test_registry_fields_and_presets():
  config = default_config()
  m = config.model
  # The registry's multistage defaults are those of configs/default.py.
  for key, value in registry.MULTISTAGE_DEFAULTS.items():
    assert tuple(m[key]) == value, key
  m.arch = "ddpmpp-multistage"
  name, kw = registry.resolve_model_kwargs(m)
  assert name == "MultistageUNet"
  assert kw["decoder_channels"] == (192, 128, 16) and kw["stage_boundaries"] == (2.5103, 7.6577)
  assert {k: kw[k] for k in registry.DEFAULTS} == registry.DEFAULTS  # the DDPM++ fields, untouched
  m.decoder_channels = (64, 32)
  m.stage_boundaries = (1.0,)
  model = create_model(m, img_resolution=16, img_channels=3, label_dim=0)
  assert isinstance(model, MultistageUNet) and tuple(model.decoder_channels) == (64, 32)
  assert model.model_channels == 128 and tuple(model.stage_boundaries) == (1.0,)
  m.stage_boundaries = (1.0, 2.0)
  with pytest.raises(ValueError, match="stage_boundaries"):
    registry.resolve_model_kwargs(m)
  m = default_config().model
  m.arch, m.arch_presets = "ddpmpp-multistage", False
  with pytest.raises(ValueError, match="decoder_channels"):
    registry.resolve_model_kwargs(m)
  # The other archs are unchanged and refuse the multistage fields.
  m = default_config().model
  assert registry.resolve_model_kwargs(m) == ("SongUNet", registry.DEFAULTS)
  m.decoder_channels = (64, 32)
  with pytest.raises(ValueError, match="ddpmpp-multistage"):
    registry.resolve_model_kwargs(m)


def test_dropout_runs_through_the_stage_switch():
  model = MultistageUNet(img_resolution=8, in_channels=5, out_channels=3, model_channels=16,
                         decoder_channels=(16, 8), stage_boundaries=(1.0,), channel_mult=(1, 2),
                         num_blocks=1, attn_resolutions=(4,), dropout=0.5)
  variables = init_params(model, jax.random.key(0))
  # Make conv1 and the output conv matter (their init is ~1e-5) so dropout shows in the output.
  variables = jax.tree_util.tree_map_with_path(
      lambda path, a: a * 1e4 if ("conv1" in jax.tree_util.keystr(path)
                                  or "aux_conv" in jax.tree_util.keystr(path)) else a, variables)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 5))
  noise = jnp.full((2,), np.log(3.0) / 4)  # sigma 3: stage 1
  apply = jax.jit(model.apply, static_argnames="train")
  a = apply(variables, x, noise, train=True, rngs={"dropout": jax.random.key(2)})
  a2 = apply(variables, x, noise, train=True, rngs={"dropout": jax.random.key(2)})
  b = apply(variables, x, noise, train=True, rngs={"dropout": jax.random.key(3)})
  e = apply(variables, x, noise, train=False)
  np.testing.assert_array_equal(a, a2)
  scale = float(jnp.abs(e).max())
  assert float(jnp.abs(a - b).max()) > 1e-2 * scale and float(jnp.abs(a - e).max()) > 1e-2 * scale
  with pytest.raises(ValueError, match="out of range"):
    model.apply(variables, x, noise, stage=2)
