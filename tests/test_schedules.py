"""Step plans of every patch schedule (patch_diffusion/data/patches.py: StepPlan, PatchSchedule.plan).

The progressive schedule is checked against a replay of the official training loop's counter arithmetic
(Zhendong-Wang/Patch-Diffusion, training/training_loop.py), re-expressed here independently of our code.
"""
import collections
import math
import subprocess
import sys

import numpy as np
import pytest

from configs import default
from patch_diffusion.config_validation import validate_config
from patch_diffusion.data import patches


# ---- the official loop's arithmetic, for comparison --------------------------------------------------


def official_progressive_run(resolution: int, real_p: float, latent: bool, total_kimg: int, batch: int):
  """Steps of the official loop with --progressive=True: (total steps, {patch size: steps}, final nimg).

  Per step: ``mask = cur_nimg // 1000 / total_kimg <= cumsum(p_list)`` (last entry replaced by 10), the
  size is the first where the mask holds, ``cur_nimg += int(batch · mul(size))``; stop once
  ``cur_nimg >= total_kimg · 1000``. The multipliers are the explicit table (= the official dict at
  R = 64 pixel / 32 latent, the settings tested here).
  """
  if latent:
    probs = np.array([1 - real_p, real_p])
    table = [(resolution // 2, 2), (resolution, 1)]
  else:
    probs = np.array([(1 - real_p) * 2 / 5, (1 - real_p) * 3 / 5, real_p])
    table = [(resolution // 4, 4), (resolution // 2, 2), (resolution, 1)]
  ends = probs.cumsum()
  ends[-1] = 10.0
  cur_nimg, steps, per_size = 0, 0, collections.Counter()
  while True:
    k = int(np.argmax((cur_nimg // 1000 / total_kimg) <= ends))
    size, mul = table[k]
    per_size[size] += 1
    steps += 1
    cur_nimg += int(batch * mul)
    if cur_nimg >= total_kimg * 1000:
      return steps, dict(per_size), cur_nimg


def our_run(sched: patches.PatchSchedule, total_nimg: float, batch: int):
  """The loop the schedule API asks for: plan, step, ``nimg += plan.counted_images`` until total."""
  nimg, step, per_size, plans = 0.0, 0, collections.Counter(), set()
  while nimg < total_nimg:
    plan = sched.plan(step, nimg, total_nimg, batch)
    per_size[plan.patch_size] += 1
    plans.add((plan.patch_size, plan.batch_mul, plan.counted_images, plan.lr_scale))
    step += 1
    nimg += plan.counted_images
  return step, dict(per_size), nimg, plans


# ---- progressive ------------------------------------------------------------------------------------


def test_progressive_celeba64_matches_official_exactly():
  """R = 64, real_p = 0.5, 200 Mimg, batch 256 (the CelebA-64 command with --progressive=True).

  The issue quotes 546,875 steps (390,625 at full size): the idealised count 40 M/1024 + 60 M/512 +
  100 M/256. The official loop's integer-kimg comparison with ``<=`` keeps R/4 until floor(kimg) > 40,000
  (nimg 40,001,536 after 39,064 steps) and R/2 until floor(kimg) > 100,000 (nimg 100,001,280 after 117,187
  more), leaving 99,998,720 / 256 = 390,620 full-size steps: 546,871 in all.
  """
  sched = patches.PatchSchedule(64, "progressive", real_p=0.5)
  official = official_progressive_run(64, 0.5, False, 200_000, 256)
  steps, per_size, nimg, plans = our_run(sched, 200_000 * 1000.0, 256)
  assert official == (546_871, {16: 39_064, 32: 117_187, 64: 390_620}, 200_000_000)
  assert (steps, per_size, nimg) == official
  # The counter (and the EMA) advance by the current size's images, not the average multiplier.
  assert plans == {(16, 4, 1024.0, 1.0), (32, 2, 512.0, 1.0), (64, 1, 256.0, 1.0)}
  # The idealised figure of the issue, for the record.
  assert 40e6 / 1024 + 60e6 / 512 + 100e6 / 256 == 546_875


@pytest.mark.parametrize("resolution,real_p,latent,total_kimg,batch", [
    (64, 0.25, False, 200_000, 256),   # thresholds 0.3, 0.75
    (32, 0.5, True, 20_000, 256),      # latent: R/2 until 1 - p, then R
    (32, 0.3, True, 7_001, 96),        # latent, odd batch and total: boundaries fall mid-kimg
    (16, 0.1, False, 3_333, 52),       # pixel, thresholds 0.36, 0.9 of an odd total
])
def test_progressive_matches_official(resolution, real_p, latent, total_kimg, batch):
  sched = patches.PatchSchedule(resolution, "progressive", real_p=real_p, latent=latent)
  steps, per_size, nimg, _ = our_run(sched, total_kimg * 1000.0, batch)
  assert (steps, per_size, nimg) == official_progressive_run(resolution, real_p, latent, total_kimg, batch)


def test_progressive_real_p_edges_skip_empty_phases():
  # p = 1: the official `<=` would run R/4 while nimg < 1000; we skip phases of zero width.
  assert patches.PatchSchedule(64, "progressive", real_p=1.0).variants() == ((64, 1),)
  p0 = patches.PatchSchedule(64, "progressive", real_p=0.0)
  assert p0.variants() == ((16, 4), (32, 2))
  assert p0.plan(0, 0.0, 1e6, 8).patch_size == 16 and p0.plan(0, 999_000.0, 1e6, 8).patch_size == 32


def test_progressive_step_fractions():
  sched = patches.PatchSchedule(64, "progressive", real_p=0.5)
  # Steps ∝ image share / multiplier: 0.2/4, 0.3/2, 0.5/1 -> 0.05, 0.15, 0.5 of 0.7.
  np.testing.assert_allclose(sched.probabilities, (0.05 / 0.7, 0.15 / 0.7, 0.5 / 0.7))
  assert sched.average_batch_mul == pytest.approx(1 / 0.7)  # images per step over the run
  assert sched.cost_per_counted_image == pytest.approx(0.2 / 16 + 0.3 / 4 + 0.5)


# ---- stochastic and full ------------------------------------------------------------------------------

#: size indices of steps 0..59, PatchSchedule(64, seed=0), from the schedule before the StepPlan API.
PINNED_SEED0 = "221002002221201220222122200101200222202021210020021022120221"
#: the same for PatchSchedule(32, real_p=0.3, latent=True, seed=12345).
PINNED_LATENT = "000001001010010010101100010010100010101000000100000010110000"


def test_stochastic_plan_reproduces_the_pinned_size_sequence():
  sched = patches.PatchSchedule(64, seed=0)
  got = "".join(str(sched.sizes.index(sched.plan(i, 123.0 * i, 1e9, 256).patch_size)) for i in range(60))
  assert got == PINNED_SEED0
  assert "".join(str(sched.size_index(i)) for i in range(60)) == PINNED_SEED0
  latent = patches.PatchSchedule(32, real_p=0.3, latent=True, seed=12345)
  assert "".join(str(latent.size_index(i)) for i in range(60)) == PINNED_LATENT
  # The plan depends only on (seed, step): not on nimg, total or the batch.
  assert sched.plan(17, 0.0, 1e3, 8).patch_size == sched.plan(17, 5e8, 1e9, 512).patch_size


def test_stochastic_counter_is_the_average_multiplier():
  """The official loop adds int(batch · Σ p_k m_k) on every step whatever size was drawn, and its EMA
  uses batch · Σ p_k m_k untruncated. We count the exact product for both (the current loop's value)."""
  sched = patches.PatchSchedule(64, real_p=0.5, seed=0)
  plans = [sched.plan(i, 0.0, 1e9, 256) for i in range(200)]
  assert {p.counted_images for p in plans} == {256 * sched.average_batch_mul} == {256 * 1.9}
  assert {(p.patch_size, p.batch_mul) for p in plans} == {(16, 4), (32, 2), (64, 1)}
  assert {p.lr_scale for p in plans} == {1.0}
  # The official counter's truncation, for the record: 486 images per step instead of 486.4.
  assert int(256 * float(np.sum(np.array([0.2, 0.3, 0.5]) * np.array([4, 2, 1])))) == 486
  latent = patches.PatchSchedule(32, real_p=0.5, latent=True)
  assert latent.plan(3, 0.0, 1e9, 100).counted_images == 150.0


def test_full_plan():
  sched = patches.PatchSchedule(64, "full")
  assert sched.plan(5, 1e6, 2e6, 256) == patches.StepPlan(64, 1, 256.0, 1.0)
  assert sched.variants() == ((64, 1),)


def test_variants_skip_zero_probability_sizes():
  assert patches.PatchSchedule(64, real_p=1.0).variants() == ((64, 1),)
  assert patches.PatchSchedule(64, real_p=0.0).variants() == ((16, 4), (32, 2))
  assert patches.PatchSchedule(32, real_p=0.5, latent=True).variants() == ((16, 2), (32, 1))


def test_plan_is_the_same_in_another_process():
  code = ("from patch_diffusion.data.patches import PatchSchedule as S;"
          "s=S(64,'multigrid',min_divisor=8,multigrid_short_cycle=True);t=S(64,seed=5);"
          "print([tuple(s.plan(i,i*997.0,1e6,64).__dict__.values()) for i in range(0,2000,7)],"
          "[t.plan(i,0.,1.,8).patch_size for i in range(300)])")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
  s = patches.PatchSchedule(64, "multigrid", min_divisor=8, multigrid_short_cycle=True)
  t = patches.PatchSchedule(64, seed=5)
  local = str([tuple(s.plan(i, i * 997.0, 1e6, 64).__dict__.values()) for i in range(0, 2000, 7)]) + " " + str(
      [t.plan(i, 0., 1., 8).patch_size for i in range(300)])
  assert out.strip() == local


def test_min_divisor_rejects_unusable_sizes():
  with pytest.raises(ValueError, match="must be divisible by 8"):
    patches.PatchSchedule(16, min_divisor=8)  # R/4 = 4
  patches.PatchSchedule(16, real_p=1.0, min_divisor=8)  # only 16 is used
  patches.PatchSchedule(16, schedule="full", min_divisor=16)


@pytest.mark.parametrize("args,match", [
    (dict(batch_size=0), "batch_size"), (dict(total_nimg=0.0), "total_nimg")])
def test_plan_argument_errors(args, match):
  kwargs = dict(step=0, nimg=0.0, total_nimg=1e6, batch_size=8) | args
  with pytest.raises(ValueError, match=match):
    patches.PatchSchedule(64).plan(**kwargs)


# ---- multigrid ------------------------------------------------------------------------------------------


def test_valid_sizes_and_rounding():
  assert patches.valid_patch_sizes(64, 8) == (8, 16, 32, 64)
  assert patches.valid_patch_sizes(16, 4) == (4, 8, 16)
  assert patches.valid_patch_sizes(48, 8) == (8, 16, 24, 48)
  valid = patches.valid_patch_sizes(64, 8)
  # The video paper's spatial factors: √½·64 = 45.3 -> 32, √⅛·64 = 22.6 -> 16; ties go to the larger.
  assert patches.nearest_valid_size(64 * math.sqrt(0.5), valid) == 32
  assert patches.nearest_valid_size(64 * math.sqrt(0.125), valid) == 16
  assert patches.nearest_valid_size(24, valid) == 32 and patches.nearest_valid_size(2, valid) == 8


@pytest.mark.parametrize("resolution,min_divisor,batch", [(16, 4, 64), (64, 8, 256)])
def test_multigrid_default_design(resolution, min_divisor, batch):
  """R = 16 (digits, 3-level U-Net) and R = 64 (4 levels): long cycle R/4, R/2, R then the final phase."""
  sched = patches.PatchSchedule(resolution, "multigrid", min_divisor=min_divisor)
  stages = sched.multigrid_stages
  r = resolution
  assert [(st.name, st.base_size, st.cycle, st.lr_scale) for st in stages] == [
      ("long 1/3", r // 4, (r // 4,), 16.0), ("long 2/3", r // 2, (r // 2,), 4.0), ("long 3/3", r, (r,), 1.0),
      ("final", r, (r,), 1.0)]
  shares = [st.end - st.start for st in stages]
  # Equal iterations per long-cycle stage: image shares ∝ batch factors 16 : 4 : 1 of the 80 % long cycle.
  np.testing.assert_allclose(shares, [0.8 * 16 / 21, 0.8 * 4 / 21, 0.8 / 21, 0.2])
  assert sched.variants() == ((r // 4, 16), (r // 2, 4), (r, 1))
  for size, mul in sched.variants():
    assert size * size * mul == r * r            # patches × pixels of a full-size step
    assert r % size == 0 and size % min_divisor == 0
  assert sched.expected_step_cost == pytest.approx(1.0)
  assert sched.cost_per_counted_image == pytest.approx(0.8 * 3 / 21 + 0.2)  # 0.314
  text = sched.describe(batch, total_nimg=1e6)
  for piece in (f"{r // 4}:{16 * batch}(x16)", "LR x16", f"{r // 2}:{4 * batch}(x4)", "final", "0.3143"):
    assert piece in text, text


def test_multigrid_run_follows_stages():
  sched = patches.PatchSchedule(16, "multigrid", min_divisor=4)
  total, batch = 200_000.0, 64
  steps, per_size, nimg, plans = our_run(sched, total, batch)
  assert nimg >= total
  assert plans == {(4, 16, 1024.0, 16.0), (8, 4, 256.0, 4.0), (16, 1, 64.0, 1.0)}
  # Stage k runs while nimg < its end (160 k images · (16, 4, 1)/21 cumulated, then the total); the last
  # step of a stage may overshoot its end by less than one step's images.
  ends = total * np.array([0.8 * 16 / 21, 0.8 * 20 / 21, 0.8, 1.0])
  n, expected = 0.0, []
  for end, images in zip(ends, (1024, 256, 64, 64)):
    k = max(math.ceil((end - n) / images), 0)
    expected.append(k)
    n += k * images
  assert per_size == {4: expected[0], 8: expected[1], 16: expected[2] + expected[3]}
  # About the same number of steps in each long-cycle stage (the paper's rule): 119.05 each.
  assert expected[:3] == [120, 116, 116] and 0.8 * total / 21 / batch == pytest.approx(119.05, abs=0.01)
  # The plan at a given count: stage boundaries in counted images.
  b1 = 0.8 * 16 / 21 * total
  assert sched.plan(0, b1 - 1, total, batch).patch_size == 4
  assert sched.plan(0, b1, total, batch).patch_size == 8
  assert sched.plan(0, 0.8 * total, total, batch) == patches.StepPlan(16, 1, 64.0, 1.0)


def test_multigrid_short_cycle():
  sched = patches.PatchSchedule(64, "multigrid", min_divisor=8, multigrid_short_cycle=True)
  stages = sched.multigrid_stages
  # s_base · [½, √½, 1] rounded to valid sizes (√½·64 = 45 -> 32, √½·32 = 22.6 -> 16, √½·16 = 11.3 -> 8).
  assert [st.cycle for st in stages] == [(8, 8, 16), (16, 16, 32), (32, 32, 64), (64,)]
  # The LR follows the long cycle only; the batch follows each step's size.
  plans = [sched.plan(i, 0.0, 1e6, 32) for i in range(6)]
  assert [(p.patch_size, p.batch_mul, p.lr_scale) for p in plans] == [
      (8, 64, 16.0), (8, 64, 16.0), (16, 16, 16.0)] * 2
  assert sched.variants() == ((8, 64), (16, 16), (32, 4), (64, 1))
  # Stage shares ∝ the mean batch factor of each cycle: (64+64+16)/3, (16+16+4)/3, (4+4+1)/3.
  weights = np.array([48.0, 12.0, 3.0])
  np.testing.assert_allclose([st.end - st.start for st in stages[:3]], 0.8 * weights / weights.sum())


@pytest.mark.parametrize("scaling,expected", [("linear", 16.0), ("sqrt", 4.0), ("none", 1.0)])
def test_multigrid_lr_scaling(scaling, expected):
  sched = patches.PatchSchedule(64, "multigrid", min_divisor=8, multigrid_lr_scaling=scaling)
  assert sched.plan(0, 0.0, 1e6, 8).lr_scale == expected


def test_multigrid_without_final_phase_and_custom_cycle():
  sched = patches.PatchSchedule(64, "multigrid", min_divisor=8, multigrid_long_cycle=(0.5, 1.0),
                                multigrid_final_fraction=0.0)
  assert [(st.base_size, st.start, st.end) for st in sched.multigrid_stages] == [(32, 0.0, 0.8), (64, 0.8, 1.0)]
  assert sched.plan(0, 0.99e6, 1e6, 8).patch_size == 64
  assert sched.plan(0, 2e6, 1e6, 8).patch_size == 64  # past the end: the last stage


@pytest.mark.parametrize("kwargs,match", [
    (dict(multigrid_long_cycle=(0.5, 0.6, 1.0)), "round to distinct sizes"),  # 32, 32
    (dict(multigrid_long_cycle=(1.0, 0.5)), "increasing"),
    (dict(multigrid_long_cycle=()), "at least one"),
    (dict(multigrid_long_cycle=(0.0, 1.0)), r"\(0, 1\]"),
    (dict(multigrid_long_cycle=(0.5, 1.5)), r"\(0, 1\]"),
    (dict(multigrid_final_fraction=1.0), "multigrid_final_fraction"),
    (dict(multigrid_lr_scaling="cubic"), "multigrid_lr_scaling"),
    (dict(resolution=60, min_divisor=8), "not a multiple of 8"),
])
def test_multigrid_errors(kwargs, match):
  kwargs = dict(resolution=64, schedule="multigrid", min_divisor=8) | kwargs
  with pytest.raises(ValueError, match=match):
    patches.PatchSchedule(**kwargs)


def test_multigrid_per_size_view_is_consistent():
  sched = patches.PatchSchedule(64, "multigrid", min_divisor=8)
  assert sched.sizes == (16, 32, 64) and sched.batch_muls == (16, 4, 1)
  # Equal steps in the three long stages (1/3 of the long-cycle steps each) plus the final phase.
  long_steps = 0.8 / 21  # per unit of images / batch
  final_steps = 0.2
  total = 3 * long_steps + final_steps
  np.testing.assert_allclose(sched.probabilities, [long_steps / total, long_steps / total,
                                                   (long_steps + final_steps) / total])
  assert [sched.patch_size(0, p) for p in (0.0, 0.6, 0.7, 0.79, 0.81)] == [16, 16, 32, 64, 64]


def test_from_config_and_validation():
  c = default.get_config()
  c.data.resolution = 64
  c.patch.schedule = "multigrid"
  c.patch.multigrid_short_cycle = True
  c.patch.multigrid_lr_scaling = "sqrt"
  sched = patches.PatchSchedule.from_config(c)
  assert sched.min_divisor == 8 and sched.multigrid_lr_scaling == "sqrt" and sched.multigrid_short_cycle
  validate_config(c)
  c.model.channel_mult = (1, 2, 2, 2, 2)  # 16 divides 64: the sizes become 16, 32, 64 (short cycle)
  assert patches.PatchSchedule.from_config(c).variants() == ((16, 16), (32, 4), (64, 1))
  validate_config(c)
  c.patch.multigrid_long_cycle = (0.5, 0.6, 1.0)
  with pytest.raises(ValueError, match="patch.multigrid_long_cycle"):
    validate_config(c)
