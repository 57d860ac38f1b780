"""Embedded latent demo: latent Patch Diffusion end to end on a laptop — encode → train → sample → decode.

The images are scikit-learn's digits at 16×16 (shipped offline); the VAE is a small ``AutoencoderKL``
(the SD VAE's architecture at 2 levels, 2× downsampling, 4 latent channels) that the project trains on
the digits itself on first use (``model.vae = 'builtin:digits'``, cached in ``~/.cache/patch_diffusion``).
The dataset's posterior moments are then encoded once (``data.prepare_latents``) and the network trains on
8×8×4 latents with the latent patch sizes R/2 = 4 (×2 batch) and R = 8; samples are decoded by the VAE.

  python -m patch_diffusion.main --config=configs/digits_latent.py --workdir=/tmp/pd_digits_latent

writes the same artifacts as the pixel demo (grids and ``samples.npz`` hold decoded images).
"""
from configs import digits


def get_config():
  c = digits.get_config()
  c.patch.latent = True          # latent patch sizes R/2, R with [1 - p, p]
  c.data.resolution = 8          # latent R: 16 px / 2
  c.data.num_channels = 4        # the VAE's latent channels
  c.data.prepare_latents = True  # encode the 1,797 digits on first use (seconds)
  c.model.vae = "builtin:digits"
  c.model.channel_mult = (1, 2)  # the smallest latent patch (4) must be divisible by 2
  c.model.attn_resolutions = (4,)
  c.train.total_kimg = 40.0
  c.train.lr_rampup_kimg = 2.5
  c.train.sample_every_steps = 200
  return c
