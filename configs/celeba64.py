"""CelebA-64, DDPM++ with Patch Diffusion: the official Patch-Diffusion command's settings (docs/METHOD.md, "Numbers").

Official command (PyTorch, 16×V100): DDPM++, cres 1,2,2,2, batch 256 (paper: 512), lr 2e-4, dropout 0.05,
augment 0, duration 200 Mimg, EMA half-life 0.5 Mimg, real_p 0.5.

Launch (one host; on a TPU pod run the same command on every worker, see launch/):

  python -m patch_diffusion.main --config=configs/celeba64.py --workdir=/path/to/celeba64

Data: TFDS ``celeb_a`` (prepare once: python -m patch_diffusion.tools.prepare_dataset --name celeb_a),
center-cropped then resized to 64×64 (EDM's dataset_tool --transform=center-crop).

Paper (2nd-hand summaries of its tables): Patch Diffusion FID 1.77 in 24.6 h vs EDM 1.66 in 48.5 h.
real_p ablation p = 0 / 0.1 / 0.25 / 0.5 / 0.75 / 1.0 → FID 14.51 / 3.05 / 2.10 / 1.77 / 1.65 / 1.66.
Sampling: 50 deterministic Heun steps (--config.sample.num_steps=50).
"""
from configs import default


def get_config():
  c = default.get_config()
  c.data.name = "celeb_a"
  c.data.resolution = 64
  c.data.num_channels = 3
  c.data.xflip = False
  c.model.arch = "ddpmpp"
  c.model.model_channels = 128
  c.model.channel_mult = (1, 2, 2, 2)
  c.model.num_blocks = 4
  c.model.attn_resolutions = (16,)
  c.model.dropout = 0.05
  c.patch.real_p = 0.5
  c.train.batch_size = 256
  c.train.total_kimg = 200_000
  c.train.lr = 2e-4
  c.train.lr_rampup_kimg = 10_000
  c.train.ema_halflife_kimg = 500
  c.train.checkpoint_every_steps = 5000
  c.train.sample_every_steps = 10_000
  c.sample.num_steps = 50
  return c
