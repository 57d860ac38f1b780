"""CelebA-64 with the multi-stage multi-decoder U-Net (Zhang et al., CVPR 2024) and Patch Diffusion:
configs/celeba64.py (the official Patch-Diffusion CelebA-64 DDPM++ settings) with the DDPM++ encoder
(128 channels, channel_mult (1,2,2,2), 4 blocks, attention at 16×16) shared by three σ-stage decoders of
base widths 192 / 128 / 16 (block widths 192/128/16 × channel_mult), the authors' EDM sizing
(``train.py --arch=ddpmpp-multistage``: en_model_channels 128, de_model_channels [192, 128, 16]), and
their stage boundaries σ = 2.5103 / 7.6577 (stage probabilities 0.9614 / 0.0351 / 0.0035 per step).

Launch (one host; on a TPU pod run the same command on every worker, see launch/):

  python -m patch_diffusion.main --config=configs/celeba64_multistage.py --workdir=/path/to/celeba64_ms

Boundaries fitted to CelebA instead of CIFAR-10 (the authors' timestep clustering, docs/MODELS.md):

  python -m patch_diffusion.tools.stage_boundaries --config configs/celeba64.py --max_reference 5000

Parameters: shared mapping + encoder 21.46 M; decoders 76.88 / 40.35 / 4.98 M (143.67 M in all, vs 61.81 M
for the single-decoder DDPM++ of configs/celeba64.py); a step of stage 0 / 1 / 2 trains 98.34 / 61.81 /
26.44 M of them (stage 1 is exactly the DDPM++ network's size), 96.80 M on average. One executable per
(patch size, stage) is compiled ahead of time: 9 in all.
"""
from configs import celeba64


def get_config():
  c = celeba64.get_config()
  c.model.arch = "ddpmpp-multistage"
  c.model.decoder_channels = (192, 128, 16)
  c.model.stage_boundaries = (2.5103, 7.6577)
  return c
