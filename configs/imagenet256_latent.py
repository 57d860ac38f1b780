"""ImageNet-256, class-conditional latent Patch Diffusion (ADM on 32×32×4 SD-VAE latents): the paper's
flagship setting, with the official command's settings (docs/METHOD.md, "Latent space" and "Numbers").

Official command (PyTorch, latent_diffusion): ADM (model_channels 192, cres 1,2,3,4, 3 blocks, attention
at 32/16/8), batch 4096, lr 1e-4, 2500 Mimg, fp16 with loss scale 100 (here: bf16 compute, float32
parameters, no loss scaling needed), real_p 0.5, dropout 0.10, latent patch sizes 16 and 32 with the ×2
batch for 16, EMA half-life 50 Mimg; VAE ``stabilityai/sd-vae-ft-ema``, latents = 0.18215 · posterior
sample. Label dropout 0.1 for classifier-free guidance (**fix**: the paper guides with w = 1.3, the
official training code never drops labels).

Sampling (released checkpoints): 256 Heun steps with churn S_churn 40, S_min 0.05, S_max 50,
S_noise 1.003, guidance 1.3. Paper: FID 2.72 (ADM 4.59, LDM-4 3.60).

Data: TFDS ``imagenet2012`` is manual-download: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar
(from image-net.org) in ``<data_dir>/downloads/manual/`` and run
``python -m patch_diffusion.tools.prepare_dataset --name imagenet2012 --data_dir <data_dir>`` (needs the
``[prepare]`` extra). Images are center-cropped and resized to 256×256. The VAE: download
``config.json`` and ``diffusion_pytorch_model.safetensors`` of huggingface.co/stabilityai/sd-vae-ft-ema into a
folder (no torch needed to read them).

Launch (encode once, then train; on a TPU pod / SLURM run each command on every worker, see launch/):

  python -m patch_diffusion.tools.encode_latents --config=configs/imagenet256_latent.py \\
      --set data.data_dir=/data/tfds --set model.vae=/models/sd-vae-ft-ema
  python -m patch_diffusion.main --config=configs/imagenet256_latent.py --workdir=gs://bucket/runs/in256 \\
      --config.data.data_dir=/data/tfds --config.model.vae=/models/sd-vae-ft-ema
"""
from configs import default


def get_config():
  c = default.get_config()
  c.data.name = "imagenet2012"
  c.data.resolution = 32            # latent R (256 px / 8)
  c.data.num_channels = 4           # SD VAE latent channels
  c.data.use_labels = True
  c.data.num_classes = 1000         # used when no dataset is opened (sampling a converted network)
  c.data.xflip = True               # stored as a second, mirrored latent record (encode_latents)
  c.data.latents = "precomputed"
  c.model.vae = "sd-vae-ft-ema"     # a folder with config.json + diffusion_pytorch_model.safetensors
  c.model.vae_dtype = "bfloat16"
  c.model.arch = "adm"              # preset: 192 channels, (1,2,3,4), 3 blocks, attention 32/16/8
  c.model.dropout = 0.10
  c.model.dtype = "bfloat16"
  c.patch.latent = True             # sizes R/2 = 16 (×2 batch) and R = 32
  c.patch.real_p = 0.5
  c.edm.label_dropout = 0.1
  c.train.batch_size = 4096
  c.train.total_kimg = 2_500_000
  c.train.lr = 1e-4
  c.train.lr_rampup_kimg = 10_000
  c.train.ema_halflife_kimg = 50_000
  c.train.checkpoint_every_steps = 5000
  c.train.sample_every_steps = 10_000
  c.sample.num_steps = 256
  c.sample.S_churn = 40
  c.sample.S_min = 0.05
  c.sample.S_max = 50
  c.sample.S_noise = 1.003
  c.sample.guidance = 1.3
  c.sample.batch_size = 256
  c.eval.batch_size = 256
  return c
