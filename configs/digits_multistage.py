"""Embedded demo, multi-stage: configs/digits.py with the multi-stage multi-decoder U-Net (Zhang et al.,
CVPR 2024, arch 'ddpmpp-multistage') and Patch Diffusion's stochastic patch schedule. DRAFT.
"""
from configs import digits


def get_config():
  c = digits.get_config()
  c.model.arch = "ddpmpp-multistage"
  c.model.decoder_channels = (48, 32, 8)
  c.model.stage_boundaries = (2.5103, 7.6577)
  return c
