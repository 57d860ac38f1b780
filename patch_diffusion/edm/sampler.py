"""EDM sampler (Karras et al. 2022, Algorithm 2): Heun or Euler steps, optional churn and CFG.

The sampler is one jittable function: the step loop is a ``lax.fori_loop``, so a whole trajectory compiles
into a single executable. It takes any denoiser ``denoise_fn(x, sigma, x_pos, labels)``; build that closure
inside your jitted function so that network parameters stay arguments of the executable, e.g.::

  @jax.jit
  def generate(params, latents, key):
    fn = lambda x, s, pos, lab: precond.denoise(pc, lambda *a: net(params, *a), x, s, pos, lab)
    return edm_sample(fn, latents, full_grid(R), key, **settings)
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

#: Names ``config.sample.solver`` accepts.
SOLVERS = ("heun", "euler")

DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray, Optional[jnp.ndarray]], jnp.ndarray]


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """Sampler hyper-parameters (EDM defaults). ``guidance`` = w of D = D_u + w (D_c − D_u); 1 = off."""
  num_steps: int = 18
  sigma_min: float = 0.002
  sigma_max: float = 80.0
  rho: float = 7.0
  S_churn: float = 0.0
  S_min: float = 0.0
  S_max: float = float("inf")
  S_noise: float = 1.0
  solver: str = "heun"
  guidance: float = 1.0

  def __post_init__(self):
    if self.num_steps < 1:
      raise ValueError(f"sample.num_steps = {self.num_steps} must be >= 1")
    if self.solver not in SOLVERS:
      raise ValueError(f"sample.solver = {self.solver!r}; expected 'heun' or 'euler'")
    if not 0 < self.sigma_min < self.sigma_max:
      raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")

  @classmethod
  def from_config(cls, sample_config) -> "SamplerSettings":
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{n: sample_config[n] for n in names if n in sample_config})

  @property
  def nfe(self) -> int:
    """Network evaluations per sample (2N−1 for Heun, N for Euler; doubled by CFG)."""
    n = 2 * self.num_steps - 1 if self.solver == "heun" else self.num_steps
    return n * (2 if self.guidance != 1.0 else 1)


def sigma_steps(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                dtype=np.float64) -> np.ndarray:
  """EDM time steps σ_0 > … > σ_{N−1} = σ_min, followed by σ_N = 0 (numpy, ``[num_steps + 1]``).

  σ_i = (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ.
  """
  i = np.arange(num_steps, dtype=np.float64)
  denom = max(num_steps - 1, 1)
  t = (sigma_max**(1 / rho) + i / denom * (sigma_min**(1 / rho) - sigma_max**(1 / rho)))**rho
  return np.concatenate([t, np.zeros(1)]).astype(dtype)


def guided(denoise_fn: DenoiseFn, guidance: float) -> DenoiseFn:
  """Classifier-free guidance: D = D_u + w (D_c − D_u), with the zero label as unconditional.

  Both branches run as one batch of 2N so the network is called once per evaluation. Keyword arguments
  (``stage=`` of a multi-stage denoiser) are passed through.
  """
  if guidance == 1.0:
    return denoise_fn

  def fn(x, sigma, x_pos, labels, **kwargs):
    if labels is None:
      raise ValueError("classifier-free guidance (guidance != 1) needs class labels")
    n = x.shape[0]
    both = denoise_fn(jnp.concatenate([x, x]), jnp.concatenate([sigma, sigma]),
                      jnp.concatenate([x_pos, x_pos]), jnp.concatenate([jnp.zeros_like(labels), labels]),
                      **kwargs)
    d_u, d_c = both[:n], both[n:]
    return d_u + guidance * (d_c - d_u)

  return fn


def evaluation_sigmas(settings: SamplerSettings, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
  """The σ of every network evaluation of :func:`edm_sample`, known before sampling.

  Returns:
    (t_hat [N]: σ of step i's first evaluation, after churn; t_next [N]: σ of its Heun correction,
    NaN where there is none — the last step and every Euler step), in ``dtype`` with the sampler's
    arithmetic (t_hat = t_cur + γ t_cur).
  """
  s = settings
  dtype = np.dtype(dtype)
  t_steps = sigma_steps(s.num_steps, s.sigma_min, s.sigma_max, s.rho).astype(dtype)
  t_cur = t_steps[:-1]
  gamma_max = min(s.S_churn / s.num_steps, np.sqrt(2) - 1) if s.S_churn > 0 else 0.0
  gamma = np.where((t_cur >= s.S_min) & (t_cur <= s.S_max), gamma_max, 0.0).astype(dtype)
  t_hat = (t_cur + gamma * t_cur).astype(dtype)
  t_next = t_steps[1:].copy()
  t_next[-1] = np.nan
  if s.solver != "heun":
    t_next[:] = np.nan
  return t_hat, t_next


def stage_plan(settings: SamplerSettings, boundaries, dtype=np.float32) -> list[tuple[int, int, int, Optional[int]]]:
  """The decoders a multi-stage network runs, as segments of consecutive sampler steps.

  Each evaluation uses the decoder of the stage its σ falls in (``lo < σ <= hi``; float64 comparison of
  the σ the sampler passes, :func:`evaluation_sigmas`). Steps with the same (first, correction) stages
  form one segment.

  Returns:
    ``[(start, stop, stage of the first evaluation, stage of the Heun correction or None)]`` covering steps
    ``0 .. num_steps − 1`` in order (the last step, plain Euler, is always its own segment).
  """
  b = np.asarray(tuple(boundaries), np.float64)
  t_hat, t_next = evaluation_sigmas(settings, dtype)

  def stage(t):
    return None if np.isnan(t) else int(np.sum(np.float64(t) > b))

  pairs = [(stage(a), stage(c)) for a, c in zip(t_hat, t_next)]
  segments = []
  for i, pair in enumerate(pairs):
    if segments and i < len(pairs) - 1 and segments[-1][2:] == pair:
      segments[-1] = (segments[-1][0], i + 1) + pair
    else:
      segments.append((i, i + 1) + pair)
  return segments


def _check_churn_inputs(s: SamplerSettings, latents, key, step_noise) -> None:
  if s.S_churn > 0 and key is None and step_noise is None:
    raise ValueError("S_churn > 0 needs a PRNG key (or step_noise)")
  if step_noise is not None and tuple(step_noise.shape) != (s.num_steps,) + tuple(latents.shape):
    raise ValueError(f"step_noise must have shape {(s.num_steps,) + tuple(latents.shape)}, got "
                     f"{tuple(step_noise.shape)}")


def edm_sample(denoise_fn: DenoiseFn, latents: jnp.ndarray, x_pos: jnp.ndarray, key: jax.Array | None = None,
               class_labels: Optional[jnp.ndarray] = None, settings: SamplerSettings = SamplerSettings(),
               *, step_noise: Optional[jnp.ndarray] = None, stage_boundaries=()) -> jnp.ndarray:
  """Generates images by integrating the probability-flow ODE (or the churned SDE) from σ_max to 0.

  Args:
    denoise_fn: ``(x [N,H,W,C], sigma [N], x_pos [N,H,W,2], labels) -> D`` (same dtype as x).
    latents: standard normal noise [N, H, W, C]; its dtype sets the integration precision
      (float64 needs ``jax_enable_x64``). x_0 = latents · σ_0.
    x_pos: coordinate channels [H, W, 2] or [N, H, W, 2], constant over steps (the full-image grid for
      ordinary sampling; a crop or a grid beyond [−1, 1] for crop/extrapolation demos).
    key: PRNG key for churn noise (required when S_churn > 0).
    class_labels: [N, L] one-hot, or None.
    settings: :class:`SamplerSettings`.
    step_noise: optional standard-normal churn noise ``[num_steps, N, H, W, C]`` to use instead of
      drawing it from ``key``: ``step_noise[i]`` is step i's draw (as the official ``edm_sampler`` makes one
      on every step, also where γ = 0). For reproducing another implementation's trajectory exactly.
    stage_boundaries: for a multi-stage denoiser (one that takes ``stage=``): the σ boundaries between its
      decoders. Every evaluation's σ is known before sampling (:func:`stage_plan`), so the step loop is
      split into segments of consecutive steps that use the same decoders, each a ``fori_loop`` whose
      evaluations pass a static ``stage=k``: each compiles to exactly one decoder, with no run-time
      switch. () (default): one loop, the denoiser called without ``stage``.

  Returns:
    The final sample x_N, same shape and dtype as ``latents`` (images in about [−1, 1]).
  """
  s = settings
  dtype = latents.dtype
  n = latents.shape[0]
  if x_pos.ndim == 3:
    x_pos = jnp.broadcast_to(x_pos, (n,) + x_pos.shape)
  _check_churn_inputs(s, latents, key, step_noise)
  t_steps = jnp.asarray(sigma_steps(s.num_steps, s.sigma_min, s.sigma_max, s.rho), dtype)
  denoise = guided(denoise_fn, s.guidance)
  gamma_max = min(s.S_churn / s.num_steps, np.sqrt(2) - 1)

  def derivative(x, t, stage):
    extra = {} if stage is None else {"stage": stage}
    return (x - denoise(x, jnp.full((n,), t, dtype), x_pos, class_labels, **extra).astype(dtype)) / t

  def churn(i, x, t_cur):
    if s.S_churn <= 0:
      return x, t_cur
    gamma = jnp.where((t_cur >= s.S_min) & (t_cur <= s.S_max), gamma_max, 0.0).astype(dtype)
    t_hat = t_cur + gamma * t_cur
    eps = (step_noise[i].astype(dtype) if step_noise is not None
           else jax.random.normal(jax.random.fold_in(key, i), x.shape, dtype))
    # max(·, 0): where γ = 0, t_hat = t_cur and XLA may fuse t_hat² − t_cur² into an FMA whose result is the
    # (possibly negative) rounding error of t_cur², and sqrt of that is NaN (seen in float64 on CPU).
    return x + jnp.sqrt(jnp.maximum(t_hat**2 - t_cur**2, 0)) * s.S_noise * eps, t_hat

  def make_step(stage_first=None, stage_second=None):
    def step(i, x_cur):
      t_cur, t_next = t_steps[i], t_steps[i + 1]
      x_hat, t_hat = churn(i, x_cur, t_cur)
      d_cur = derivative(x_hat, t_hat, stage_first)
      x_next = x_hat + (t_next - t_hat) * d_cur
      if s.solver == "heun":
        d_prime = derivative(x_next, t_next, stage_second)
        x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
      return x_next
    return step

  def last_step(x_cur, stage=None):
    # The final step lands on σ = 0, where the Heun correction is undefined: plain Euler (as EDM).
    i = s.num_steps - 1
    t_cur = t_steps[i]
    x_hat, t_hat = churn(i, x_cur, t_cur)
    return x_hat + (t_steps[i + 1] - t_hat) * derivative(x_hat, t_hat, stage)

  x = latents * t_steps[0]
  if not stage_boundaries:
    x = jax.lax.fori_loop(0, s.num_steps - 1, make_step(), x)
    return last_step(x)
  segments = stage_plan(s, stage_boundaries, dtype)
  for start, stop, first, second in segments[:-1]:
    x = jax.lax.fori_loop(start, stop, make_step(first, second), x)
  return last_step(x, segments[-1][2])
