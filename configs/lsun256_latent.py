"""LSUN-Bedroom-256 / Church-256, unconditional latent Patch Diffusion (ADM on 32×32×4 SD-VAE latents),
with the official command's settings (docs/METHOD.md, "Numbers").

Official command: ADM, batch 1024, lr 1e-4, dropout 0.10, 200 Mimg, EMA half-life 50 Mimg, real_p 0.5,
latent patch sizes 16 and 32; VAE ``stabilityai/sd-vae-ft-ema`` (latents = 0.18215 · posterior sample).
Paper (2nd-hand): FID 2.75 (Bedroom), 2.66 (Church). Sampling: 256 Heun steps with churn S_churn 40,
S_min 0.05, S_max 50, S_noise 1.003 (no guidance: unconditional).

Data: TFDS ``lsun/bedroom`` (default) or ``lsun/church_outdoor`` (``--config.data.name=lsun/church_outdoor``),
prepared once with ``python -m patch_diffusion.tools.prepare_dataset --name lsun/bedroom --data_dir D``
(TFDS downloads it; needs the ``[prepare]`` extra); or any folder of images with
``--config.data.name=folder --config.data.folder=/path``. Images are center-cropped and resized to 256.

Launch (encode once, then train; on a pod run each command on every worker, see launch/):

  python -m patch_diffusion.tools.encode_latents --config=configs/lsun256_latent.py \\
      --set data.data_dir=/data/tfds --set model.vae=/models/sd-vae-ft-ema
  python -m patch_diffusion.main --config=configs/lsun256_latent.py --workdir=/runs/lsun_bedroom \\
      --config.data.data_dir=/data/tfds --config.model.vae=/models/sd-vae-ft-ema
"""
from configs import default


def get_config():
  c = default.get_config()
  c.data.name = "lsun/bedroom"
  c.data.resolution = 32            # latent R (256 px / 8)
  c.data.num_channels = 4
  c.data.xflip = True
  c.data.latents = "precomputed"
  c.model.vae = "sd-vae-ft-ema"
  c.model.vae_dtype = "bfloat16"
  c.model.arch = "adm"
  c.model.dropout = 0.10
  c.model.dtype = "bfloat16"
  c.patch.latent = True
  c.patch.real_p = 0.5
  c.train.batch_size = 1024
  c.train.total_kimg = 200_000
  c.train.lr = 1e-4
  c.train.lr_rampup_kimg = 10_000
  c.train.ema_halflife_kimg = 50_000
  c.sample.num_steps = 256
  c.sample.S_churn = 40
  c.sample.S_min = 0.05
  c.sample.S_max = 50
  c.sample.S_noise = 1.003
  c.sample.batch_size = 256
  c.eval.batch_size = 256
  return c
