"""FFHQ-64, DDPM++ with Patch Diffusion: EDM's FFHQ-64 training recipe plus the patch schedule.

Sources of the values:
* EDM README, table of the configurations behind its released models (ffhq-64x64-uncond-vp, 8×V100,
  ~4 days): ``--cond=0 --arch=ddpmpp --batch=256 --cres=1,2,2,2 --lr=2e-4 --dropout=0.05 --augment=0.15``
  with train.py's defaults for the rest: 200 Mimg (``--duration``), EMA half-life 0.5 Mimg, LR ramp-up
  10 Mimg, no dataset x-flip (the augment pipe's x-flip covers it).
* ``--augment=0.15`` builds EDM's AugmentPipe preset (x-flip always a fair coin; y-flip, scale, rotation,
  anisotropic scale, fractional translation each with probability 0.15) and ``augment_dim = 9``:
  ``data.augment_p = 0.15``, ``model.augment_dim = 9``. As in the official Patch Diffusion loss, the
  augmentation applies to the cropped patch and the coordinate channels are left untouched
  (``data.augment_before_crop = False``).
* Patch Diffusion README: "We follow the hyperparameter settings of EDM" and adds ``--real_p=0.5``
  (``patch.real_p``); it publishes no separate FFHQ command. Its DDPM++ sampling uses 50 deterministic
  Heun steps (``generate.py --steps=50``); EDM samples FFHQ-64 with 40.

Reported FID (docs/METHOD.md, "Numbers", 2nd-hand summaries of the Patch Diffusion paper): EDM 2.60, Patch Diffusion
3.11. EDM's own README gives 2.39 for its released ffhq-64x64-uncond-vp model (40 steps).

Data: FFHQ is not in TFDS. Download the 70,000 1024×1024 PNGs (github.com/NVlabs/ffhq-dataset,
``images1024x1024``) and point ``data.folder`` at that folder; it is converted once (Lanczos resize to
64×64, like EDM's ``dataset_tool.py --resolution=64x64``) into an ArrayRecord cache (docs/DATA.md).

Launch (one host; on a TPU pod run the same command on every worker, see launch/):

  python -m patch_diffusion.main --config=configs/ffhq64.py --workdir=/path/to/runs/ffhq64 \\
      --config.data.folder=/path/to/ffhq/images1024x1024

Full-image EDM baseline on the same budget: add ``--config.patch.schedule=full``.
"""
from configs import default


def get_config():
  c = default.get_config()
  c.data.name = "folder"
  c.data.folder = ""          # set to the FFHQ images1024x1024 folder (see the docstring)
  c.data.resolution = 64
  c.data.num_channels = 3
  c.data.xflip = False
  c.data.augment_p = 0.15     # EDM --augment=0.15
  c.data.augment_before_crop = False
  c.model.arch = "ddpmpp"
  c.model.model_channels = 128
  c.model.channel_mult = (1, 2, 2, 2)
  c.model.num_blocks = 4
  c.model.attn_resolutions = (16,)
  c.model.dropout = 0.05
  c.model.augment_dim = 9
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
