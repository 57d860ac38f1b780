"""Embedded demo: Patch Diffusion on scikit-learn's handwritten digits (1,797 real 8×8 images, shipped
inside scikit-learn, so it runs offline), upscaled to 16×16 grayscale. Trains on a 2-core CPU in five to six
minutes and writes a sample grid and ``samples.npz`` (1,000 samples).

Wall time, FID and the comparison with full-image training on this network: README "Results and
benchmarks" (each figure with the command that printed it; logs and JSON in benchmarks/results/).

  python -m patch_diffusion.main --config=configs/digits.py --workdir=/tmp/pd_digits

Full-image training for comparison (same budget in counted images):

  python -m patch_diffusion.main --config=configs/digits.py --workdir=/tmp/pd_digits_full \
      --config.patch.real_p=1.0

Patch sizes at R = 16: 4×4 (p 0.2, 4× batch), 8×8 (p 0.3, 2×), 16×16 (p 0.5, 1×).
"""
from configs import default


def get_config():
  c = default.get_config()
  c.data.name = "digits"
  c.data.resolution = 16
  c.data.num_channels = 1
  c.model.arch = "ddpmpp"
  c.model.model_channels = 32
  c.model.channel_mult = (1, 2, 2)
  c.model.num_blocks = 1
  c.model.attn_resolutions = (8,)
  c.model.dropout = 0.0
  c.train.batch_size = 64
  c.train.total_kimg = 80.0
  c.train.lr = 1e-3
  c.train.lr_rampup_kimg = 5.0
  c.train.ema_halflife_kimg = 5
  c.train.log_every_steps = 100
  c.train.checkpoint_every_steps = 500
  c.train.sample_every_steps = 300
  c.train.grid_size = 100
  c.train.final_num_samples = 1000
  c.sample.num_steps = 18
  c.sample.num_samples = 1000
  c.sample.batch_size = 100   # = grid_size: the final samples reuse the grids' sampler executable
  c.eval.batch_size = 125     # Inception at 299×299 on a laptop CPU: keep memory modest
  return c
