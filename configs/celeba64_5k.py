"""CelebA-64 restricted to 5,000 training images: the data-efficiency setting, patches vs full images.

The Patch Diffusion paper claims better results than full-image training on small datasets "as few as
5,000 images" (abstract; docs/METHOD.md, "Numbers" reports it on the ~5,000-image AFHQv2 categories: FID EDM 4.60 /
4.94 / 2.59 vs Patch Diffusion 3.11 / 4.80 / 1.93 for Cat / Dog / Wild at 75 Mimg). docs/METHOD.md gives no
numbers for a 5,000-image CelebA subset: this config is the controlled comparison on the project's own
dataset, with everything equal to ``configs/celeba64.py`` (the official CelebA-64 command: DDPM++, cres
1,2,2,2, batch 256, lr 2e-4, dropout 0.05, augment 0, EMA 0.5 Mimg, real_p 0.5) except:

* ``data.max_examples = 5000``: the first 5,000 images of TFDS ``celeb_a``'s train split (center crop →
  64×64, as celeba64.py);
* ``train.total_kimg = 75_000``: the paper's budget for its ~5,000-image datasets (AFHQv2), i.e. 15,000
  passes over the subset;
* ``eval.ref_num_images = 0`` keeps FID against the statistics of the *whole* train split, so the score
  measures generalisation rather than memorisation of the 5,000 images (set it to 5000 to compare with
  the training subset itself).

Launch, Patch Diffusion (stochastic patches, p = 0.5) and the full-image EDM baseline on the same budget:

  python -m patch_diffusion.main --config=configs/celeba64_5k.py --workdir=/path/to/runs/celeba64_5k_patch
  python -m patch_diffusion.main --config=configs/celeba64_5k.py --workdir=/path/to/runs/celeba64_5k_full \\
      --config.patch.schedule=full

Data: TFDS ``celeb_a`` (prepare once: python -m patch_diffusion.tools.prepare_dataset --name celeb_a).
EDM's augmentation, often used against overfitting on small data, is off here to match the official
CelebA command; ``--config.data.augment_p=0.15 --config.model.augment_dim=9`` turns it on.
"""
from configs import celeba64


def get_config():
  c = celeba64.get_config()
  c.data.max_examples = 5000
  c.train.total_kimg = 75_000
  c.eval.ref_num_images = 0
  return c
