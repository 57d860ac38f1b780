"""Patch-size schedules (host side) and the per-sample random crop with coordinate channels (device side).

Patch Diffusion (docs/METHOD.md, "Training") trains on random square patches of side ``s`` cut from full-resolution
images of side ``R``, with two extra input channels giving each pixel's location in the full image.
Per step one size is used; a step with a smaller patch draws proportionally more images (the batch
multiplier), so the image counter advances faster than the step count.

**Schedules** (``patch.schedule``), each a :class:`PatchSchedule` whose :meth:`PatchSchedule.plan` says
what one step does (:class:`StepPlan`: patch size, batch multiplier, counted images, LR scale):

* ``stochastic`` (the paper's default): size drawn per step with probabilities
  [(1-p)·2/5, (1-p)·3/5, p] (latent: [1-p, p]). The image counter advances by the *average*
  multiplier, ``batch · Σ p_k m_k``, on every step, whatever size was drawn — as the official loop does
  (it adds ``int(batch · batch_mul_avg)``, truncated to an integer; we keep the exact product, a
  difference of < 1 image per step, e.g. 486.4 vs 486 at batch 256, p = 0.5).
* ``progressive``: R/4, then R/2, then R (latent: R/2, then R), with the official loop's arithmetic:
  the phase is the first k with ``floor(nimg / 1000) / total_kimg <= c_k``, where c_k are the cumulative
  probabilities of ``stochastic`` ((1-p)·0.4, (1-p); latent 1-p) and the last phase never ends; the
  counter (and the EMA) advance by the *current* size's images, ``batch · m_k``. Phases of zero width
  (p = 0 or 1) are skipped (the official ``<=`` would run R/4 while nimg < 1000 at p = 1).
* ``full``: always R, one batch per step.
* ``multigrid``: the long/short-cycle schedule of Wu et al. (CVPR 2020) transposed to patch sizes;
  see :class:`PatchSchedule` for the mapping.

Every schedule is a pure function of ``(seed, step, nimg, total)``: every host of a multi-host job
computes the same plan for the same step without communicating (the official code draws the size per
GPU, so one of its steps can mix sizes; we do not copy that).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("stochastic", "progressive", "full", "multigrid")
MULTIGRID_LR_SCALINGS = ("linear", "sqrt", "none")
#: Short-cycle spatial factors of the multigrid paper (SlowFast ``MULTIGRID.SHORT_CYCLE_FACTORS`` plus the
#: base shape itself): iteration i uses ``s_base · SHORT_CYCLE_FACTORS[i mod 3]``.
SHORT_CYCLE_FACTORS = (0.5, math.sqrt(0.5), 1.0)


def patch_sizes(resolution: int, latent: bool = False) -> tuple[int, ...]:
  """The patch sizes used at full resolution ``resolution``, smallest first.

  Pixel space: (R/4, R/2, R). Latent space: (R/2, R).
  """
  divisor = 2 if latent else 4
  if resolution <= 0 or resolution % divisor:
    space = "latent" if latent else "pixel"
    raise ValueError(
        f"resolution {resolution} must be a positive multiple of {divisor} for {space}-space patch "
        f"training (patch sizes R/{divisor} .. R); pick a resolution divisible by {divisor}")
  if latent:
    return (resolution // 2, resolution)
  return (resolution // 4, resolution // 2, resolution)


def batch_multipliers(resolution: int, latent: bool = False) -> tuple[int, ...]:
  """Images drawn per step relative to a full-size step, aligned with :func:`patch_sizes`.

  The explicit table R/4 -> 4, R/2 -> 2, R -> 1 (the official ``batch_mul_dict`` is keyed by absolute
  sizes and is wrong at resolutions other than 64 pixel / 32 latent).
  """
  return (2, 1) if latent else (4, 2, 1)


def size_probabilities(real_p: float, latent: bool = False) -> tuple[float, ...]:
  """Stochastic-schedule probabilities aligned with :func:`patch_sizes`.

  Pixel: [(1-p)*2/5, (1-p)*3/5, p]; latent: [1-p, p].
  """
  if not 0.0 <= real_p <= 1.0:
    raise ValueError(f"patch.real_p = {real_p} must lie in [0, 1] (probability of a full-size step)")
  if latent:
    return (1.0 - real_p, real_p)
  return ((1.0 - real_p) * 2 / 5, (1.0 - real_p) * 3 / 5, real_p)


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """What one training step does. Pure data: every host computes the same plan for the same step.

  Attributes:
    patch_size: s, the side of this step's patches (pixels or latent pixels).
    batch_mul: host batches of ``train.batch_size / processes`` concatenated this step: the step sees
      ``batch_size · batch_mul`` full-resolution images, one patch each.
    counted_images: what the image counter ``nimg`` advances by after this step; also the images the EMA
      half-life is measured in for this step (``state.ema_beta(nimg, counted_images, ...)``).
    lr_scale: multiplies the base learning-rate schedule (``state.learning_rate``) for this step: the
      multigrid schedule's linear scaling with the long-cycle batch factor; 1 otherwise.
  """
  patch_size: int
  batch_mul: int
  counted_images: float
  lr_scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class MultigridStage:
  """One stage of the multigrid schedule (see :class:`PatchSchedule`).

  Attributes:
    name: 'long k/K' or 'final'.
    base_size: the stage's (long-cycle) patch side.
    cycle: patch sides the steps of the stage go through, ``cycle[step % len(cycle)]`` (the short cycle;
      ``(base_size,)`` without it).
    lr_scale: LR multiplier of every step of the stage (long-cycle batch factor, per ``lr_scaling``).
    start, end: the stage's share of the run as fractions of the total counted images.
  """
  name: str
  base_size: int
  cycle: tuple[int, ...]
  lr_scale: float
  start: float
  end: float


def valid_patch_sizes(resolution: int, min_divisor: int = 1) -> tuple[int, ...]:
  """Patch sides s usable at resolution R, smallest first: s divides R (so the batch multiplier (R/s)² of
  the multigrid schedule is an integer) and ``min_divisor`` divides s (the U-Net halves the patch
  ``len(channel_mult) - 1`` times: pass 2^(levels-1))."""
  return tuple(s for s in range(1, resolution + 1) if resolution % s == 0 and s % min_divisor == 0)


def nearest_valid_size(target: float, valid: Sequence[int]) -> int:
  """The valid size nearest to ``target`` pixels (linear distance; a tie goes to the larger size)."""
  return min(valid, key=lambda s: (abs(s - target), -s))


@dataclasses.dataclass(frozen=True)
class PatchSchedule:
  """Which patch size, batch multiplier, counted images and LR scale each training step uses.

  The loop asks :meth:`plan` once per step (a pure function of ``(seed, step, nimg, total)``), compiles one
  executable per entry of :meth:`variants`, and logs :meth:`describe` at start. The older per-size view
  (:attr:`sizes`, :attr:`batch_muls`, :attr:`probabilities`, :attr:`average_batch_mul`,
  :attr:`expected_step_cost`, :meth:`size_index`) stays for the benchmarks.

  Attributes:
    resolution: full image side R (pixels or latent pixels).
    schedule: 'stochastic' | 'progressive' | 'full' | 'multigrid' (module docstring).
    real_p: p, the probability of a full-size step ('stochastic'); also sets the phase lengths of
      'progressive' (R/4 for a fraction (1-p)·0.4 of the counted images, R/2 until (1-p), then R).
    latent: latent-space size set {R/2, R} instead of {R/4, R/2, R} ('stochastic', 'progressive').
    seed: schedule seed; the stochastic draw for a step depends only on (seed, step).
    min_divisor: every patch side the schedule uses must be a multiple of this (the U-Net's
      2^(len(channel_mult) - 1)); 1 = no constraint. 'multigrid' only picks sizes that satisfy it; the
      other schedules raise if one of their sizes does not.
    multigrid_long_cycle: long-cycle spatial factors S, coarse to fine; stage k trains on patches of the
      valid size nearest to R·S_k.
    multigrid_short_cycle: run the short cycle inside every long-cycle stage.
    multigrid_final_fraction: fraction of the counted images spent in the final full-size phase.
    multigrid_lr_scaling: 'linear' (the paper: LR × long-cycle batch factor (R/s_base)²), 'sqrt'
      (× R/s_base, the usual rule for Adam) or 'none'.

  **Multigrid** (Wu et al., "A Multigrid Method for Efficiently Training Video Models", CVPR 2020;
  SlowFast ``slowfast/utils/multigrid.py``), mapped to patches:

  * *Grid → patch side.* The paper varies a clip's frames T and side S; an image patch has only a side,
    so a long-cycle factor S maps to the patch side s = R·S, rounded to the nearest *valid* size
    (:func:`valid_patch_sizes`: s divides R and is a multiple of ``min_divisor``; a tie goes to the larger
    size). Valid sizes at R = 2^k are powers of two, so the paper's S = √½ (and its volume factors T·S² =
    ⅛, ¼, ½) fall between grid points: √½·64 = 45.3 rounds to 32, √⅛·64 = 22.6 to 16. The default
    long cycle S = (¼, ½, 1) is the power-of-two ladder R/4, R/2, R; each stage quarters the area (the
    paper halves the volume per stage). Factors that round to the same size are an error.
  * *Batch.* A step at side s draws (R/s)² times the base batch, so patches × pixels per step — the
    compute of a step — stays that of a full-size step (the paper: batch × T₀S₀²/(TS²)). The short cycle
    changes the batch the same way.
  * *Learning rate.* Scaled linearly with the long-cycle batch factor (R/s_base)² (``'linear'``, the
    paper's rule for SGD); the short cycle leaves it unchanged. The base LR ramp (``lr_rampup_kimg``)
    applies underneath. Linear scaling by 16 at R/4 is aggressive for Adam: ``'sqrt'`` or ``'none'``
    are the conservative choices.
  * *Epochs → counted images.* The paper gives each long-cycle shape epochs ∝ its (average) batch factor,
    i.e. the same number of iterations; here a stage's share of the counted images ∝ its average batch
    factor (mean of (R/s)² over its short cycle). One epoch of the paper = one pass over the data = the
    dataset size in counted images; a step counts ``batch · (R/s)²`` images (every image drawn counts,
    as in the progressive schedule). The paper trains 1.5× the baseline's epochs at fewer iterations: to
    mirror that, set ``train.total_kimg`` to 1.5× the full-size budget.
  * *One long cycle, then a full-size phase.* The paper runs one long cycle per LR stage and a fine-tune
    phase at the full shape; EDM's LR is constant after the ramp (one stage), so the schedule is one long
    cycle over a fraction 1 - f of the counted images, then R at ×1 batch and LR ×1 for the last f
    (``multigrid_final_fraction``).
  * *Short cycle.* Iteration i of a stage with base side s_b uses s_b·[½, √½, 1][i mod 3] rounded to a
    valid size (at least the smallest valid size), with batch ×(R/s)², LR unchanged. i is the global step.
  * *Cost.* Every multigrid step costs about one full-size step; a counted image at side s costs (s/R)² of
    a full-size image. :meth:`describe` prints the stages and the expected cost per counted image.
  """
  resolution: int
  schedule: str = "stochastic"
  real_p: float = 0.5
  latent: bool = False
  seed: int = 0
  min_divisor: int = 1
  multigrid_long_cycle: tuple[float, ...] = (0.25, 0.5, 1.0)
  multigrid_short_cycle: bool = False
  multigrid_final_fraction: float = 0.2
  multigrid_lr_scaling: str = "linear"

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"patch.schedule = {self.schedule!r}; expected one of {SCHEDULES}")
    if not (isinstance(self.min_divisor, (int, np.integer)) and self.min_divisor >= 1):
      raise ValueError(f"min_divisor = {self.min_divisor!r} must be a positive integer (2^(levels-1))")
    if self.schedule == "multigrid":
      self._multigrid_stages  # validates the multigrid fields and R  # pylint: disable=pointless-statement
    else:
      patch_sizes(self.resolution, self.latent)  # validates R
      size_probabilities(self.real_p, self.latent)  # validates p
      bad = [s for s, _ in self.variants() if s % self.min_divisor]
      if bad:
        raise ValueError(
            f"patch size {bad[0]} (resolution {self.resolution}, schedule {self.schedule!r}) must be divisible "
            f"by {self.min_divisor} = 2^(len(model.channel_mult)-1) for the U-Net's downsampling; use fewer "
            f"levels, a larger resolution or patch.real_p = 1")

  @classmethod
  def from_config(cls, config) -> "PatchSchedule":
    """The schedule of a full config (``data.resolution``, ``patch.*``, ``seed``, ``model.channel_mult``)."""
    p = config.patch
    return cls(
        int(config.data.resolution), p.schedule, float(p.real_p), bool(p.latent), int(config.seed),
        min_divisor=2 ** (len(config.model.channel_mult) - 1),
        multigrid_long_cycle=tuple(float(f) for f in p.multigrid_long_cycle),
        multigrid_short_cycle=bool(p.multigrid_short_cycle),
        multigrid_final_fraction=float(p.multigrid_final_fraction),
        multigrid_lr_scaling=str(p.multigrid_lr_scaling))

  # ---- the step plan: what the loop uses -------------------------------------------------------------

  def plan(self, step: int, nimg: float, total_nimg: float, batch_size: int) -> StepPlan:
    """The plan of one step; identical on every host.

    Args:
      step: the global training step about to run (0-based; the number of steps taken so far).
      nimg: counted images before this step (the loop's host-side float64 counter).
      total_nimg: the run's length in counted images (``train.total_kimg · 1000``).
      batch_size: global images per full-size step (``train.batch_size``).

    Returns:
      A :class:`StepPlan`; the loop advances ``nimg += plan.counted_images`` after the step.
    """
    if not batch_size > 0:
      raise ValueError(f"batch_size = {batch_size!r} must be > 0 (train.batch_size)")
    if not total_nimg > 0:
      raise ValueError(f"total_nimg = {total_nimg!r} must be > 0 (train.total_kimg)")
    if self.schedule == "stochastic":
      k = self.size_index(step)
      # The average multiplier, whatever was drawn: the official counter (module docstring).
      return StepPlan(self.sizes[k], self.batch_muls[k], batch_size * self.average_batch_mul)
    if self.schedule == "full":
      return StepPlan(self.resolution, 1, float(batch_size))
    if self.schedule == "progressive":
      # The official ``cur_nimg // 1000 / total_kimg``: whole kimg done over the run's kimg (exact for the
      # integer-valued counts this schedule produces).
      k = self._progressive_index((float(nimg) // 1000) / (total_nimg / 1000))
      return StepPlan(self.sizes[k], self.batch_muls[k], float(batch_size * self.batch_muls[k]))
    stage = self._multigrid_stage(nimg / total_nimg)
    size = stage.cycle[int(step) % len(stage.cycle)]
    mul = (self.resolution // size)**2
    return StepPlan(size, mul, float(batch_size * mul), stage.lr_scale)

  def variants(self) -> tuple[tuple[int, int], ...]:
    """Every (patch_size, batch_mul) :meth:`plan` can return, smallest patch first: one executable each."""
    if self.schedule == "multigrid":
      sizes = sorted({s for st in self._multigrid_stages for s in st.cycle})
      return tuple((s, (self.resolution // s)**2) for s in sizes)
    return tuple((s, m) for s, m, p in zip(self.sizes, self.batch_muls, self.probabilities) if p > 0)

  def describe(self, batch_size: int, total_nimg: float | None = None) -> str:
    """Human-readable summary for the start-of-run log: sizes, batches, LR scales, image shares and the
    expected cost per counted image relative to full-size training (1.0). With ``total_nimg``, also the
    counted Mimg and approximate steps of each part."""
    r = self.resolution
    lines = []
    if self.schedule == "multigrid":
      valid = valid_patch_sizes(r, self.min_divisor)
      lines.append(f"multigrid schedule at R={r} (valid patch sizes: divide {r}, multiples of {self.min_divisor}: "
                   f"{', '.join(map(str, valid))}); LR scaling {self.multigrid_lr_scaling}, short cycle "
                   f"{'on' if self.multigrid_short_cycle else 'off'}")
      for st in self._multigrid_stages:
        muls = [(r // s)**2 for s in st.cycle]
        cost = len(muls) / sum(muls)  # every step costs one full step; images per step = Σ muls / n
        share = st.end - st.start
        cyc = "/".join(f"{s}:{batch_size * m}(x{m})" for s, m in zip(st.cycle, muls))
        line = (f"  {st.name:<9} {100 * share:6.2f}% of images  patch:batch {cyc}  LR x{st.lr_scale:g}  "
                f"cost/counted image {cost:.4g}")
        if total_nimg:
          steps = share * total_nimg / (batch_size * sum(muls) / len(muls))
          line += f"  ({share * total_nimg / 1e6:.4g} Mimg, ~{steps:,.0f} steps)"
        lines.append(line)
    elif self.schedule == "progressive":
      bounds = self._progressive_bounds()
      lines.append(f"progressive schedule at R={r}, real_p={self.real_p}: phase k runs while floor(kimg)/"
                   f"total_kimg <= c_k; counter += batch x current multiplier")
      start = 0.0
      for k, (s, m, w) in enumerate(zip(self.sizes, self.batch_muls, self._phase_widths())):
        if w <= 0:
          continue
        c = "end" if k == self._last_phase() else f"{bounds[k]:.4g}"
        line = (f"  patch {s:>4}  batch {batch_size * m} (x{m})  {100 * w:6.2f}% of images (c = {c})  "
                f"cost/counted image {(s / r)**2:.4g}")
        if total_nimg:
          line += f"  ({w * total_nimg / 1e6:.4g} Mimg, ~{w * total_nimg / (batch_size * m):,.0f} steps)"
        lines.append(line)
        start += w
    else:
      lines.append(f"{self.schedule} schedule at R={r}" +
                   (f", real_p={self.real_p}" if self.schedule == "stochastic" else "") +
                   f": counter += batch x average multiplier {self.average_batch_mul:.4g} per step")
      for s, m, p in zip(self.sizes, self.batch_muls, self.probabilities):
        if p > 0:
          lines.append(f"  patch {s:>4}  batch {batch_size * m} (x{m})  p {p:.4g}  step cost {(s / r)**2 * m:.4g}")
      if total_nimg:
        lines.append(f"  ~{total_nimg / (batch_size * self.average_batch_mul):,.0f} steps for "
                     f"{total_nimg / 1e6:.4g} Mimg")
    lines.append(f"  expected cost per counted image: {self.cost_per_counted_image:.4g} of full-size training "
                 f"(expected step cost {self.expected_step_cost:.3g} of a full step, "
                 f"{self.average_batch_mul:.4g} images per step on average)")
    return "\n".join(lines)

  @property
  def cost_per_counted_image(self) -> float:
    """Expected compute per counted image relative to full-size training: the speed-up is its inverse."""
    return self.expected_step_cost / self.average_batch_mul

  # ---- the per-size view (benchmarks, the current loop) --------------------------------------------

  @property
  def sizes(self) -> tuple[int, ...]:
    """Patch sides, smallest first (multigrid: the sides it uses)."""
    if self.schedule == "multigrid":
      return tuple(s for s, _ in self.variants())
    return patch_sizes(self.resolution, self.latent)

  @property
  def batch_muls(self) -> tuple[int, ...]:
    if self.schedule == "multigrid":
      return tuple(m for _, m in self.variants())
    return batch_multipliers(self.resolution, self.latent)

  @property
  def probabilities(self) -> tuple[float, ...]:
    """Long-run fraction of *steps* at each size (for 'progressive' and 'multigrid': over the whole run)."""
    n = len(self.sizes)
    if self.schedule == "full":
      return tuple([0.0] * (n - 1) + [1.0])
    if self.schedule == "progressive":
      steps = [w / m for w, m in zip(self._phase_widths(), self.batch_muls)]
      return tuple(x / sum(steps) for x in steps)
    if self.schedule == "multigrid":
      steps = dict.fromkeys(self.sizes, 0.0)
      for st in self._multigrid_stages:
        muls = [(self.resolution // s)**2 for s in st.cycle]
        stage_steps = (st.end - st.start) / (sum(muls) / len(muls))  # ∝ images / images per step
        for s in st.cycle:
          steps[s] += stage_steps / len(st.cycle)
      total = sum(steps.values())
      return tuple(steps[s] / total for s in self.sizes)
    return size_probabilities(self.real_p, self.latent)

  @property
  def average_batch_mul(self) -> float:
    """Images per step relative to a full-size step, averaged over steps (pixel, p=0.5: 1.9; latent: 1.5).

    For 'stochastic' this is what the image counter advances by on every step (times the batch).
    """
    return float(sum(p * m for p, m in zip(self.probabilities, self.batch_muls)))

  @property
  def expected_step_cost(self) -> float:
    """Expected compute of a step relative to a full-size step: sum_k p_k (s_k/R)^2 mul_k (p=0.5: 0.70)."""
    return float(sum(p * (s / self.resolution)**2 * m
                     for p, s, m in zip(self.probabilities, self.sizes, self.batch_muls)))

  def size_index(self, step: int, progress: float = 0.0) -> int:
    """Index into :attr:`sizes` for a step; identical on every host.

    Args:
      step: the global training step (0-based).
      progress: fraction of training done in [0, 1] (counted images / total), used by 'progressive' and
        'multigrid' (:meth:`plan` is exact; this is the per-size view).
    """
    n = len(self.sizes)
    if self.schedule == "full":
      return n - 1
    if self.schedule == "progressive":
      return self._progressive_index(progress)
    if self.schedule == "multigrid":
      return self.sizes.index(self.plan(step, progress, 1.0, 1).patch_size)
    # A fresh generator keyed by (seed, step): stateless, so resume and multi-host agree by construction.
    u = np.random.default_rng([int(self.seed) & 0xFFFFFFFF, 0x5EED, int(step)]).random()
    cdf = np.cumsum(self.probabilities)
    return int(min(np.searchsorted(cdf, u, side="right"), n - 1))

  def patch_size(self, step: int, progress: float = 0.0) -> int:
    return self.sizes[self.size_index(step, progress)]

  def batch_mul(self, step: int, progress: float = 0.0) -> int:
    return self.batch_muls[self.size_index(step, progress)]

  # ---- progressive ------------------------------------------------------------------------------------

  def _phase_widths(self) -> tuple[float, ...]:
    """Fraction of the counted images each progressive phase lasts: the stochastic probabilities."""
    return size_probabilities(self.real_p, self.latent)

  @functools.cached_property
  def _progressive_table(self) -> tuple[tuple[float, ...], tuple[float, ...], int]:
    """(widths, cumulative ends c_k as the official loop computes them (numpy float64 cumsum), last phase)."""
    widths = self._phase_widths()
    bounds = tuple(float(c) for c in np.cumsum(np.asarray(widths, np.float64)))
    return widths, bounds, max(k for k, w in enumerate(widths) if w > 0)

  def _progressive_bounds(self) -> tuple[float, ...]:
    return self._progressive_table[1]

  def _last_phase(self) -> int:
    return self._progressive_table[2]

  def _progressive_index(self, progress: float) -> int:
    """First phase k (of nonzero width) with progress <= c_k; the last phase never ends.

    The official loop computes ``mask = cur_nimg // 1000 / total_kimg <= p_cumsum`` with the last entry of
    ``p_cumsum`` replaced by 10, and takes the first size where the mask holds: a phase includes its
    right end (at progress exactly c_k the smaller size still runs).
    """
    widths, bounds, last = self._progressive_table
    for k in range(last):
      if widths[k] > 0 and progress <= bounds[k]:
        return k
    return last

  # ---- multigrid --------------------------------------------------------------------------------------

  @functools.cached_property
  def _multigrid_stages(self) -> tuple[MultigridStage, ...]:
    r = self.resolution
    if not (isinstance(r, (int, np.integer)) and r > 0):
      raise ValueError(f"data.resolution = {r!r} must be a positive integer")
    if r % self.min_divisor:
      raise ValueError(f"data.resolution = {r} is not a multiple of {self.min_divisor} = 2^(len(model.channel_mult)"
                       f"-1): the full-size phase of patch.schedule='multigrid' cannot run; change either")
    factors = tuple(self.multigrid_long_cycle)
    if not factors or any(not (0 < f <= 1) for f in factors):
      raise ValueError(f"patch.multigrid_long_cycle = {factors}: give at least one spatial factor in (0, 1], "
                       f"coarse to fine, e.g. (0.25, 0.5, 1.0)")
    if not 0 <= self.multigrid_final_fraction < 1:
      raise ValueError(f"patch.multigrid_final_fraction = {self.multigrid_final_fraction} must lie in [0, 1) "
                       f"(share of the counted images in the final full-size phase)")
    if self.multigrid_lr_scaling not in MULTIGRID_LR_SCALINGS:
      raise ValueError(f"patch.multigrid_lr_scaling = {self.multigrid_lr_scaling!r}; expected one of "
                       f"{MULTIGRID_LR_SCALINGS}")
    valid = valid_patch_sizes(r, self.min_divisor)
    bases = [nearest_valid_size(r * f, valid) for f in factors]
    for a, b, fa, fb in zip(bases, bases[1:], factors, factors[1:]):
      if b <= a:
        raise ValueError(
            f"patch.multigrid_long_cycle = {factors}: factors {fa} and {fb} give patch sizes {a} and {b} at R={r} "
            f"(valid sizes {valid}); the factors must be increasing and round to distinct sizes — drop one")

    def lr_scale(base: int) -> float:
      factor = (r / base)**2
      return {"linear": factor, "sqrt": math.sqrt(factor), "none": 1.0}[self.multigrid_lr_scaling]

    cycles = []
    for base in bases:
      if self.multigrid_short_cycle:
        cycles.append(tuple(min(nearest_valid_size(base * f, valid), base) for f in SHORT_CYCLE_FACTORS))
      else:
        cycles.append((base,))
    # Equal iterations per long-cycle stage: a stage's share of the images ∝ its mean batch factor.
    weights = [sum((r // s)**2 for s in cyc) / len(cyc) for cyc in cycles]
    long_share = 1.0 - self.multigrid_final_fraction
    stages, start = [], 0.0
    for k, (base, cyc, w) in enumerate(zip(bases, cycles, weights)):
      end = start + long_share * w / sum(weights)
      stages.append(MultigridStage(f"long {k + 1}/{len(bases)}", base, cyc, lr_scale(base), start, end))
      start = end
    if self.multigrid_final_fraction > 0:
      stages.append(MultigridStage("final", r, (r,), 1.0, start, 1.0))
    else:
      stages[-1] = dataclasses.replace(stages[-1], end=1.0)
    return tuple(stages)

  @property
  def multigrid_stages(self) -> tuple[MultigridStage, ...]:
    """The multigrid stages, in order (only for ``schedule='multigrid'``)."""
    if self.schedule != "multigrid":
      raise ValueError(f"multigrid_stages: schedule is {self.schedule!r}, not 'multigrid'")
    return self._multigrid_stages

  def _multigrid_stage(self, progress: float) -> MultigridStage:
    """The stage holding ``progress`` = nimg / total: the first whose end lies beyond it."""
    for st in self._multigrid_stages:
      if progress < st.end:
        return st
    return self._multigrid_stages[-1]


def coordinate_grid(row_start, col_start, height: int, width: int, resolution: int | Sequence[int],
                    dtype=jnp.float32) -> jnp.ndarray:
  """Coordinate channels of a window, NHWC-ready.

  Pixel (r, c) of a window whose top-left corner sits at pixel (row_start, col_start) of a full image of
  size ``resolution`` gets x = (col_start + c)/(W_full - 1)·2 - 1 and y = (row_start + r)/(H_full - 1)·2 - 1,
  so the full image spans [-1, 1] with its top-left pixel at (-1, -1). Starts may be negative or put the
  window past the edge (outpainting / extrapolation beyond [-1, 1]); they may be arrays of shape [N].

  Args:
    row_start, col_start: scalars or [N] arrays (pixels, int or float).
    height, width: window size in pixels.
    resolution: full-image side R, or (H_full, W_full) for non-square images.

  Returns:
    [height, width, 2] for scalar starts, [N, height, width, 2] for [N] starts; channel 0 = x (column),
    channel 1 = y (row).
  """
  res_h, res_w = (resolution, resolution) if np.isscalar(resolution) else tuple(resolution)
  row_start = jnp.asarray(row_start)
  col_start = jnp.asarray(col_start)
  rows = row_start[..., None] + jnp.arange(height)  # [..., H]
  cols = col_start[..., None] + jnp.arange(width)  # [..., W]
  y = _normalize(rows, res_h, dtype)
  x = _normalize(cols, res_w, dtype)
  x = jnp.broadcast_to(x[..., None, :], x.shape[:-1] + (height, width))
  y = jnp.broadcast_to(y[..., :, None], y.shape[:-1] + (height, width))
  return jnp.stack([x, y], axis=-1)


def _normalize(index: jnp.ndarray, size: int, dtype) -> jnp.ndarray:
  """Maps pixel indices to [-1, 1] over ``size`` pixels: index/(size-1)·2 - 1.

  Integer indices inside the image are looked up in a table computed on the host in float32, so the
  values are bit-identical to the reference (XLA rewrites division by a constant as a multiplication by
  its reciprocal, which is 1 ulp off for some indices). Other indices (fractional, or outside the image
  for extrapolation) use the formula.
  """
  if jnp.issubdtype(index.dtype, jnp.integer):
    table = (np.arange(size, dtype=np.float32) / np.float32(size - 1) - np.float32(0.5)) * np.float32(2)
    inside = (index >= 0) & (index < size)
    formula = (index.astype(dtype) / (size - 1) - 0.5) * 2
    return jnp.where(inside, jnp.asarray(table, dtype)[jnp.clip(index, 0, size - 1)], formula)
  return ((index.astype(dtype) / (size - 1) - 0.5) * 2).astype(dtype)


def full_grid(resolution: int, batch: int | None = None, dtype=jnp.float32) -> jnp.ndarray:
  """Coordinates of the whole image ([R, R, 2], or [batch, R, R, 2]); what sampling uses."""
  grid = coordinate_grid(0, 0, resolution, resolution, resolution, dtype)
  return grid if batch is None else jnp.broadcast_to(grid, (batch,) + grid.shape)


def crop_patches(images: jnp.ndarray, row_offset: jnp.ndarray, col_offset: jnp.ndarray,
                 patch_size: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Cuts one patch per image at given offsets; returns (patches, coordinates).

  Args:
    images: [N, R, R, C] full-resolution images (any dtype).
    row_offset, col_offset: int [N], in 0 .. R - patch_size.
    patch_size: static patch side s.

  Returns:
    patches [N, s, s, C] with patch[n, r, c] = images[n, i + r, j + c], and coordinates [N, s, s, 2]
    (float32, see :func:`coordinate_grid`).
  """
  n, res_h, res_w, ch = images.shape
  if patch_size == res_h and patch_size == res_w:
    patches = images  # the crop is the identity; skip the gather
  else:
    # vmap of dynamic_slice lowers to a single batched gather: no Python loop over samples.
    cut = lambda img, i, j: jax.lax.dynamic_slice(img, (i, j, 0), (patch_size, patch_size, ch))
    patches = jax.vmap(cut)(images, row_offset.astype(jnp.int32), col_offset.astype(jnp.int32))
  coords = coordinate_grid(row_offset, col_offset, patch_size, patch_size, (res_h, res_w))
  return patches, coords


def random_offsets(key: jax.Array, batch: int, resolution: int, patch_size: int):
  """Independent uniform row/column offsets in 0 .. R - s inclusive, int32 [batch] each."""
  k_row, k_col = jax.random.split(key)
  hi = resolution - patch_size + 1
  return (jax.random.randint(k_row, (batch,), 0, hi, dtype=jnp.int32),
          jax.random.randint(k_col, (batch,), 0, hi, dtype=jnp.int32))


def random_patches(key: jax.Array, images: jnp.ndarray, patch_size: int):
  """Random per-sample crop of ``images`` [N, R, R, C] to [N, s, s, C] plus coordinates [N, s, s, 2]."""
  row, col = random_offsets(key, images.shape[0], images.shape[1], patch_size)
  return crop_patches(images, row, col, patch_size)
