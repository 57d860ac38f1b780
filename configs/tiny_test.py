"""A tiny configuration for tests: a 2-level DDPM++ with 16 channels at 16×16, a few steps."""
from configs import default


def get_config():
  c = default.get_config()
  c.data.name = "digits"
  c.data.resolution = 16
  c.data.num_channels = 1
  c.model.model_channels = 16
  c.model.channel_mult = (1, 2)
  c.model.num_blocks = 1
  c.model.attn_resolutions = (8,)
  c.model.dropout = 0.0
  c.train.batch_size = 16
  c.train.total_kimg = 0.16   # 5 steps at batch 16 × average multiplier 1.9 (30.4 images per step)
  c.train.lr = 1e-3
  c.train.lr_rampup_kimg = 0.1
  c.train.ema_halflife_kimg = 0.05
  c.train.log_every_steps = 2
  c.train.checkpoint_every_steps = 3
  c.train.sample_every_steps = 0
  c.train.grid_size = 8
  c.sample.num_steps = 3
  c.sample.num_samples = 16
  c.sample.batch_size = 8
  return c
