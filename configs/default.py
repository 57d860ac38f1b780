"""Every knob of patch_diffusion, with its default. Experiment files import this and override.

Sizes are in pixels (or latent pixels), counts of images in kimg (thousands of *counted* images:
a step at patch size s counts ``batch_size * batch_mul(s)`` images, docs/METHOD.md, "Training").
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # base seed: model init, patch-size schedule, data order, step keys. Never random.

  # ---- data -----------------------------------------------------------------------------------
  c.data = d = ml_collections.ConfigDict()
  d.name = "digits"           # 'digits' (embedded), a TFDS name ('celeb_a', 'cifar10', ...) or 'folder'
  d.folder = ""               # image folder for name='folder' (converted once to ArrayRecord in data_dir)
  d.data_dir = ""             # TFDS data dir; '' = TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR)
  d.split = "train"
  d.resolution = 32           # R: full training resolution (square)
  d.num_channels = 3          # C: image channels fed to the network (digits are replicated to 3)
  d.xflip = False             # random horizontal flip of the full image
  # EDM's augmentation pipe (patch_diffusion/data/augment.py) with EDM's --augment preset: x-flip always
  # a 50/50 coin (EDM's xflip=1e8), y-flip, isotropic scale, rotation, anisotropic scale and fractional
  # translation each with this probability; the 9 augmentation labels condition the network, so
  # model.augment_dim must be 9 when > 0. EDM's FFHQ/AFHQv2-64 commands use 0.15; 0 = off (CelebA).
  d.augment_p = 0.0
  # False (the official Patch Diffusion order): augment the cropped patch, coordinate channels untouched
  # (they keep the patch's location in the un-augmented image). True: augment the full image, then crop,
  # so the coordinates describe the augmented image.
  d.augment_before_crop = False
  d.max_examples = 0          # >0: train on the first N images only (data-efficiency setting)
  d.use_labels = False        # condition on class labels (one-hot)
  d.num_classes = 0           # filled from the dataset when use_labels; read from converted networks
  # Latent runs (patch.latent): data.resolution / num_channels are the LATENT R and C (e.g. 32, 4 for
  # 256x256 images and the SD VAE); the images are read at R x the VAE's downsampling factor.
  d.latents = "precomputed"   # precomputed (posterior moments stored once: tools/encode_latents) | on_the_fly
  d.latent_dir = ""           # precomputed latents; '' = <data dir>/latents/<dataset>-<split>-<px>-vae<id>
  d.prepare_latents = False   # True: encode the dataset on first use when its latents are missing (demo)
  d.num_workers = 0           # grain worker processes per host (0 = in-process)
  d.prefetch = 2              # grain read-ahead (batches)

  # ---- network ----------------------------------------------------------------------------------
  c.model = m = ml_collections.ConfigDict()
  m.arch = "ddpmpp"           # ddpmpp | ncsnpp | adm | ddpmpp-multistage
  m.model_channels = 128      # base width (ddpmpp-multistage: of the shared encoder)
  m.channel_mult = (1, 2, 2, 2)
  m.channel_mult_emb = 4
  m.channel_mult_noise = 1
  m.num_blocks = 4
  m.attn_resolutions = (16,)  # nominal resolutions R >> level that get attention
  m.dropout = 0.10
  m.embedding_type = "positional"  # positional | fourier
  m.encoder_type = "standard"       # standard | skip | residual
  m.decoder_type = "standard"       # standard | skip
  m.resample_filter = (1, 1)
  m.augment_dim = 0
  # Multi-stage multi-decoder U-Net (arch 'ddpmpp-multistage', Zhang et al. CVPR 2024; must stay at these
  # defaults for the other archs). decoder_channels: one decoder base width per σ stage, lowest σ first;
  # () = not multistage, and the arch preset fills in the authors' (192, 128, 16) (their train.py).
  # stage_boundaries: the σ values between stages (stage k: b[k-1] < σ <= b[k]); the authors'
  # stage_interval for CIFAR-10 from their timestep clustering.
  m.decoder_channels = ()
  m.stage_boundaries = (2.5103, 7.6577)
  m.dtype = "float32"         # compute dtype: float32 | bfloat16 (params stay float32)
  # Latent runs: the VAE — a diffusers model dir (config.json + diffusion_pytorch_model.safetensors, e.g.
  # stabilityai/sd-vae-ft-ema), a .safetensors file, or 'builtin:digits' (trained by the project, cached).
  m.vae = ""
  m.vae_dtype = "float32"     # the VAE's compute dtype (encoding and decoding)
  # float32 matmul/conv precision: 'default' lets GPUs use TF32 and TPUs bf16 passes (fast); 'highest'
  # is true float32 (what EDM trains with: it disables TF32), needed for 1e-4 parity on GPUs.
  m.matmul_precision = "default"
  # (networks, patch_diffusion/models/registry.py) True: arch ncsnpp/adm fill the fields above that are
  # left at these default values with their EDM preset; False: every field is used verbatim.
  m.arch_presets = True

  # ---- preconditioning and loss ----------------------------------------------------------------
  c.edm = e = ml_collections.ConfigDict()
  e.precond = "edm"           # edm | vp | ve
  e.sigma_data = 0.5
  e.P_mean = -1.2
  e.P_std = 1.2
  e.label_dropout = 0.0       # probability of the zero label (classifier-free guidance), e.g. 0.1

  # ---- patches ----------------------------------------------------------------------------------
  c.patch = p = ml_collections.ConfigDict()
  p.schedule = "stochastic"   # stochastic | progressive | full | multigrid
  p.real_p = 0.5              # probability of a full-size step (stochastic schedule)
  p.latent = False            # latent-space size set {R/2, R} instead of {R/4, R/2, R}
  # schedule='multigrid' (Wu et al. CVPR 2020; PatchSchedule docstring in patch_diffusion/data/patches.py):
  # one long cycle over patch sides R·S (rounded to sizes that divide R and are multiples of
  # 2^(len(model.channel_mult)-1)), batch x (R/s)^2 so patches x pixels per step stay constant, equal
  # steps per stage, then a full-size phase.
  p.multigrid_long_cycle = (0.25, 0.5, 1.0)  # spatial factors S of the long-cycle stages, coarse to fine
  p.multigrid_short_cycle = False   # inside each stage, cycle s_base x [1/2, sqrt(1/2), 1] step by step
  p.multigrid_final_fraction = 0.2  # share of the counted images in the final full-size phase, [0, 1)
  p.multigrid_lr_scaling = "linear"  # LR x long-cycle batch factor (R/s)^2: linear (paper) | sqrt | none

  # ---- optimisation -------------------------------------------------------------------------------
  c.train = t = ml_collections.ConfigDict()
  t.batch_size = 256          # global images per full-size step (smaller patches draw batch_mul x more)
  # Gradient accumulation (the official --batch-gpu): each step runs its batch (batch_size x batch_mul
  # images) as this many equal micro-batches in a loop and takes one optimizer step on the summed
  # gradient — the same update as one large step, with the activation memory of one micro-batch. Must
  # divide batch_size (and, for even micro-batches per device, batch_size / data-parallel devices).
  t.grad_accum_steps = 1
  t.total_kimg = 200_000.0    # training length in counted kimg (float: fractions allowed)
  t.lr = 2e-4
  t.lr_rampup_kimg = 10_000.0
  t.adam_b1 = 0.9
  t.adam_b2 = 0.999
  t.adam_eps = 1e-8
  t.ema_halflife_kimg = 500.0
  t.ema_rampup_ratio = 0.05   # EMA half-life ramp: min(h, ratio * nimg); 0/None disables
  t.log_every_steps = 100
  t.checkpoint_every_steps = 5000
  t.keep_checkpoints = 3
  t.checkpoint_dir = ""       # '' = <workdir>/checkpoints; e.g. a local disk while logs go to gs://
  # A checkpoint whose files differ from its manifest is never restored. False (default): stop with an
  # error naming the damaged file. True: move damaged checkpoints to <workdir>/checkpoints_damaged/ and
  # resume from the newest intact one.
  t.skip_damaged_checkpoints = False
  t.preemption_check_every_steps = 10  # multi-host: how often hosts agree on a SIGTERM (a small sync)
  t.sample_every_steps = 10_000  # PNG/TensorBoard grid from the EMA network; 0 disables
  t.grid_size = 64               # images in a sample grid
  t.final_num_samples = 0        # >0: write samples.npz with this many EMA samples after training
  t.init_from = ""               # directory of a converted/pretrained network to fine-tune from

  # ---- sampling -----------------------------------------------------------------------------------
  c.sample = s = ml_collections.ConfigDict()
  s.solver = "heun"           # heun | euler
  s.num_steps = 18
  s.sigma_min = 0.002
  s.sigma_max = 80.0
  s.rho = 7.0
  s.S_churn = 0.0
  s.S_min = 0.0
  s.S_max = float("inf")
  s.S_noise = 1.0
  s.guidance = 1.0            # classifier-free guidance weight w (1 = off)
  s.class_label = -1          # class-conditional sampling: -1 = classes drawn uniformly, else this class
  s.keep_latents = False      # latent runs: also save the sampled latents in samples.npz
  s.num_samples = 1000        # --mode=sample
  s.batch_size = 256          # global images per sampling batch (bounds memory)
  s.checkpoint_step = -1      # -1 = latest
  s.pretrained = ""           # sample from a converted network directory instead of workdir checkpoints

  # ---- evaluation (FID / KID / precision-recall with the TF-FID Inception-v3) -----------------------
  c.eval = v = ml_collections.ConfigDict()
  v.num_samples = 50_000      # --mode=eval: generated images (the paper's protocol)
  v.batch_size = 256          # global images per generation / feature batch
  v.every_kimg = 0.0          # in-training eval period in counted kimg; 0 disables
  v.train_num_samples = 5_000  # images per in-training eval (smaller, cheaper than the final protocol)
  v.ref_num_images = 0        # reference statistics over the first N training images; 0 = whole split
  v.kid = True
  v.precision_recall = True
  v.inception_path = ""       # converted Inception weights (.npz) or a source; '' = default cache
  v.checkpoint_step = -1      # --mode=eval: -1 = latest

  # ---- device mesh --------------------------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1,)        # -1 = all devices
  c.mesh.axes = ("data",)
  return c
