"""Which σ stage each training step of a multi-stage network trains (Zhang et al., CVPR 2024), host side.

The authors' ``EDMMultistageLoss`` (LucasYFL/Multistage_Diffusion ``edm/training/loss.py``) draws, on
every loss call, one σ from EDM's log-normal, ``exp(randn · P_std + P_mean)``; the step's stage is the one
whose interval holds it (``lo < σ <= hi``, the convention of ``stage_of_sigma``). The batch's σ are then
drawn from the same log-normal restricted to that stage (``loss.TruncatedEDMNoise``), so every batch is
single-stage and, averaged over steps, σ follows EDM's distribution. With the default boundaries
(2.5103, 7.6577) and P_mean = −1.2, P_std = 1.2 the stage probabilities are 0.9614 / 0.0351 / 0.0035.

Here the draw is a pure function of ``(seed, step)`` — a fresh ``np.random.default_rng([seed, STAGE_STREAM,
step])`` per step, like ``PatchSchedule``'s patch size (stream 0x5EED), with its own stream constant so
the two draws are independent — so every host of a multi-host job trains the same stage on the same step
without communicating, and a resumed run repeats the stages of an uninterrupted one. (The authors draw
per GPU and per accumulation round, so one of their optimizer steps can mix stages across GPUs; we do
not copy that, as we do not for the patch size.)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np

from patch_diffusion.models.multistage_unet import check_stage_boundaries

#: Stream constant of the stage draw (the patch-size draw uses 0x5EED).
STAGE_STREAM = 0x57A6E


def stage_bounds(boundaries: Sequence[float]) -> tuple[tuple[float, float], ...]:
  """The σ interval ``(lo, hi]`` of every stage: ``((0, b1), (b1, b2), ..., (b_{K-1}, inf))``."""
  b = check_stage_boundaries(boundaries)
  edges = (0.0,) + b + (math.inf,)
  return tuple(zip(edges[:-1], edges[1:]))


def _normal_cdf(x: float) -> float:
  return 0.5 * math.erfc(-x / math.sqrt(2.0))


def stage_probabilities(boundaries: Sequence[float], P_mean: float = -1.2,
                        P_std: float = 1.2) -> tuple[float, ...]:
  """P(lo < σ <= hi) of each stage under ln σ ~ N(P_mean, P_std²) (float64; sums to 1)."""
  out = []
  for lo, hi in stage_bounds(boundaries):
    a = _normal_cdf((math.log(lo) - P_mean) / P_std) if lo > 0 else 0.0
    b = _normal_cdf((math.log(hi) - P_mean) / P_std) if hi < math.inf else 1.0
    out.append(b - a)
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class StageSchedule:
  """The stage of every training step: a pure function of ``(seed, step)`` (module docstring).

  Attributes:
    boundaries: the K − 1 σ values between stages (``config.model.stage_boundaries``).
    P_mean, P_std: EDM's log-normal σ distribution (``config.edm``).
    seed: the run's seed.
  """
  boundaries: tuple[float, ...]
  P_mean: float = -1.2
  P_std: float = 1.2
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "boundaries", check_stage_boundaries(self.boundaries))
    if not (math.isfinite(self.P_std) and self.P_std > 0 and math.isfinite(self.P_mean)):
      raise ValueError(f"P_mean = {self.P_mean}, P_std = {self.P_std}: need a finite P_mean and P_std > 0 "
                       "(config.edm)")

  @classmethod
  def from_config(cls, config) -> Optional["StageSchedule"]:
    """The schedule of a ``ddpmpp-multistage`` run (``model.stage_boundaries`` after the arch preset,
    ``edm.P_mean``/``P_std``, ``seed``); None for a single-decoder network."""
    from patch_diffusion.models import registry  # pylint: disable=g-import-not-at-top
    class_name, kwargs = registry.resolve_model_kwargs(config.model)
    if class_name != "MultistageUNet":
      return None
    return cls(tuple(kwargs["stage_boundaries"]), float(config.edm.P_mean), float(config.edm.P_std),
               int(config.seed))

  @property
  def num_stages(self) -> int:
    return len(self.boundaries) + 1

  @property
  def bounds(self) -> tuple[tuple[float, float], ...]:
    """``(lo, hi]`` of every stage."""
    return stage_bounds(self.boundaries)

  @property
  def probabilities(self) -> tuple[float, ...]:
    """Long-run fraction of steps that train each stage."""
    return stage_probabilities(self.boundaries, self.P_mean, self.P_std)

  def sigma(self, step: int) -> float:
    """The step's stage-selecting σ = exp(z · P_std + P_mean), z ~ N(0, 1) from the (seed, step) stream."""
    z = np.random.default_rng([int(self.seed) & 0xFFFFFFFF, STAGE_STREAM, int(step)]).standard_normal()
    return math.exp(z * self.P_std + self.P_mean)

  def stage(self, step: int) -> int:
    """The stage step ``step`` trains: ``#{k : b_k < σ}`` for the step's σ (float64; identical on every
    host)."""
    sigma = self.sigma(step)
    return sum(1 for b in self.boundaries if sigma > b)

  def describe(self, param_counts: Optional[Sequence[int]] = None, shared: Optional[int] = None) -> str:
    """Start-of-run summary: each stage's σ interval, probability and, with parameter counts, its active
    parameters (shared + its decoder) and their expected share per step."""
    lines = [f"multi-stage training: {self.num_stages} stages, one stage per step drawn from EDM's "
             f"log-normal (P_mean {self.P_mean:g}, P_std {self.P_std:g}); the batch's σ from the log-normal "
             f"truncated to the stage"]
    for k, ((lo, hi), p) in enumerate(zip(self.bounds, self.probabilities)):
      line = f"  stage {k}: {lo:g} < σ <= {hi:g}  p {p:.4f}"
      if param_counts is not None and shared is not None:
        line += (f"  decoder {param_counts[k] / 1e6:.3f} M, active per step {(shared + param_counts[k]) / 1e6:.3f} M "
                 f"of {(shared + sum(param_counts)) / 1e6:.3f} M")
      lines.append(line)
    if param_counts is not None and shared is not None:
      mean = shared + sum(p * c for p, c in zip(self.probabilities, param_counts))
      lines.append(f"  shared (mapping + encoder) {shared / 1e6:.3f} M; expected active parameters per step "
                   f"{mean / 1e6:.3f} M")
    return "\n".join(lines)
