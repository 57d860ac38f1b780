"""AFHQv2-64 (one category, ~5,000 images), DDPM++ with Patch Diffusion: the paper's small-data setting.

Sources of the values:
* Patch Diffusion paper (docs/METHOD.md, "Numbers"): AFHQv2 Cat / Dog / Wild trained separately (about 5,000 images
  each) for 75 Mimg; FID EDM 4.60 / 4.94 / 2.59 vs Patch Diffusion 3.11 / 4.80 / 1.93 (1.93 on Wild is
  the abstract's headline number). ``train.total_kimg = 75_000``.
* Everything else follows EDM's AFHQv2-64 recipe, as the Patch Diffusion README says it does ("We follow
  the hyperparameter settings of EDM"; it publishes no AFHQv2 command): EDM README table, afhqv2-64x64-
  uncond-vp: ``--cond=0 --arch=ddpmpp --batch=256 --cres=1,2,2,2 --lr=2e-4 --dropout=0.25
  --augment=0.15`` and train.py's defaults (EMA half-life 0.5 Mimg, LR ramp-up 10 Mimg). EDM trained on
  the three categories together (15,803 images, 200 Mimg): for that run, point ``data.folder`` at
  ``afhq/train`` and set ``--config.train.total_kimg=200000``.
* ``--augment=0.15`` = EDM's AugmentPipe preset with 9 augmentation labels: ``data.augment_p = 0.15``,
  ``model.augment_dim = 9``, applied to the cropped patch as the official Patch Diffusion loss does.
* ``patch.real_p = 0.5`` (the paper's default); 50 Heun steps for sampling as in the Patch Diffusion README
  (EDM samples AFHQv2-64 with 40).

Data: AFHQv2 is not in TFDS. Download ``afhq-v2-dataset`` (github.com/clovaai/stargan-v2, 512×512 PNGs
in ``train/{cat,dog,wild}``) and point ``data.folder`` at one category; it is converted once (Lanczos
resize to 64×64, like EDM's ``dataset_tool.py --resolution=64x64``) into an ArrayRecord cache.

Launch (Wild; use .../train/cat or .../train/dog for the other two):

  python -m patch_diffusion.main --config=configs/afhqv2_64.py --workdir=/path/to/runs/afhqv2_wild \\
      --config.data.folder=/path/to/afhq/train/wild

EDM baseline on the same budget: add ``--config.patch.schedule=full``. FID against the same category's
statistics: ``--mode=eval`` with the same ``data.folder``.
"""
from configs import default


def get_config():
  c = default.get_config()
  c.data.name = "folder"
  c.data.folder = ""          # set to afhq/train/{cat,dog,wild} (see the docstring)
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
  c.model.dropout = 0.25      # EDM's AFHQv2 value
  c.model.augment_dim = 9
  c.patch.real_p = 0.5
  c.train.batch_size = 256
  c.train.total_kimg = 75_000
  c.train.lr = 2e-4
  c.train.lr_rampup_kimg = 10_000
  c.train.ema_halflife_kimg = 500
  c.train.checkpoint_every_steps = 5000
  c.train.sample_every_steps = 10_000
  c.eval.ref_num_images = 0   # statistics of the whole category folder
  c.sample.num_steps = 50
  return c
