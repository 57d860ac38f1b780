"""The paper recipes in configs/ (ffhq64, afhqv2_64, celeba64_5k) and the validation of the new fields."""
import importlib

import pytest

from configs import default
from patch_diffusion.config_validation import validate_config
from patch_diffusion.data import patches


@pytest.mark.parametrize("name,expected", [
    ("ffhq64", {"data.name": "folder", "data.augment_p": 0.15, "model.augment_dim": 9, "model.dropout": 0.05,
                "train.total_kimg": 200_000, "train.batch_size": 256, "train.lr": 2e-4,
                "model.channel_mult": (1, 2, 2, 2), "patch.real_p": 0.5}),
    ("afhqv2_64", {"data.name": "folder", "data.augment_p": 0.15, "model.augment_dim": 9,
                   "model.dropout": 0.25, "train.total_kimg": 75_000, "train.batch_size": 256}),
    ("celeba64_5k", {"data.name": "celeb_a", "data.max_examples": 5000, "data.augment_p": 0.0,
                     "model.dropout": 0.05, "train.total_kimg": 75_000, "patch.real_p": 0.5}),
])
def test_recipe_values_and_launch_command(name, expected):
  module = importlib.import_module(f"configs.{name}")
  c = module.get_config()
  validate_config(c)
  for dotted, value in expected.items():
    section, field = dotted.split(".")
    assert c[section][field] == value, dotted
  assert f"python -m patch_diffusion.main --config=configs/{name}.py --workdir=" in module.__doc__
  assert patches.PatchSchedule.from_config(c).variants() == ((16, 4), (32, 2), (64, 1))


@pytest.mark.parametrize("overrides,match", [
    ({"data.augment_p": 0.15}, "model.augment_dim = 9"),
    ({"data.augment_p": 1.5}, "data.augment_p"),
    ({"data.augment_p": -0.1}, "data.augment_p"),
    ({"patch.schedule": "multigrid", "patch.multigrid_final_fraction": 1.0}, "multigrid_final_fraction"),
    ({"patch.schedule": "multigrid", "patch.multigrid_lr_scaling": "cubic"}, "multigrid_lr_scaling"),
    ({"patch.schedule": "multigrid", "patch.multigrid_long_cycle": (0.5, 0.5)}, "multigrid_long_cycle"),
    ({"patch.multigrid_long_cycle": ("a",)}, "multigrid_long_cycle"),
    ({"model.augment_dim": -1}, "model.augment_dim"),
])
def test_new_fields_are_validated(overrides, match):
  c = default.get_config()
  for dotted, value in overrides.items():
    section, field = dotted.split(".")
    c[section].unlock()
    c[section][field] = value
  with pytest.raises(ValueError, match=match):
    validate_config(c)


def test_defaults_keep_todays_behaviour():
  c = default.get_config()
  validate_config(c)
  assert (c.data.augment_p, c.data.augment_before_crop, c.train.grad_accum_steps) == (0.0, False, 1)
  assert c.patch.schedule == "stochastic"
  # Multigrid validates against the U-Net depth: R = 32 with 4 levels allows 8, 16, 32.
  c.patch.schedule = "multigrid"
  validate_config(c)
  assert patches.PatchSchedule.from_config(c).variants() == ((8, 16), (16, 4), (32, 1))
