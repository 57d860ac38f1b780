"""Embedded demo, multi-stage: configs/digits.py (DDPM++ 32 channels, Patch Diffusion's stochastic patch
schedule, 80 kimg) with the multi-stage multi-decoder U-Net of Zhang et al., CVPR 2024
(arch 'ddpmpp-multistage'): the DDPM++ encoder and mapping shared, three decoders for the σ stages
split at the authors' boundaries σ = 2.5103 / 7.6577, sized as the authors size theirs against a
128-channel encoder (192 / 128 / 16 → 1.5× / 1× / 0.125×), here 48 / 32 / 8 (8: the narrowest width
GroupNorm's 4-channels-per-group rule allows with two groups).

  python -m patch_diffusion.main --config=configs/digits_multistage.py --workdir=/tmp/pd_digits_ms

Each step trains one stage (probabilities 0.9614 / 0.0351 / 0.0035 under EDM's log-normal) with one
patch size: 9 executables (3 sizes × 3 stages) are compiled ahead of time. docs/MODELS.md has the
details; benchmarks/time_to_quality.py compares it with the single-decoder demo.
"""
from configs import digits


def get_config():
  c = digits.get_config()
  c.model.arch = "ddpmpp-multistage"
  c.model.decoder_channels = (48, 32, 8)
  c.model.stage_boundaries = (2.5103, 7.6577)
  return c
