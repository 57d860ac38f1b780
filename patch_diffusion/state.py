"""Training state: a small pytree of arrays. The model's apply function and the optimizer stay outside.

The image counter ``nimg`` is *not* a device array: it advances by each step's
``StepPlan.counted_images`` (``patches.PatchSchedule.plan``: batch · average multiplier for the stochastic
schedule, a fractional number; batch · current multiplier for the progressive and multigrid ones) up to
~2·10⁸, beyond float32's exact range, so the training loop keeps it on the host in float64 and saves it in
the checkpoint metadata. The learning rate and EMA decay derived from it are passed to each step as
scalars.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
  """Everything the compiled step updates.

  Attributes:
    step: int32 scalar, number of optimizer steps taken (the step key is ``fold_in(base_key, step)``).
    params: trainable network parameters (float32).
    ema_params: exponential moving average of ``params`` (what sampling and evaluation use).
    opt_state: Adam moments.
    buffers: non-trainable network variables (e.g. fixed Fourier frequencies); not optimised.
  """
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  buffers: Any

  def variables(self, ema: bool = True) -> dict:
    """The ``model.apply`` variables dict, with EMA (default) or raw parameters."""
    return {"params": self.ema_params if ema else self.params, **self.buffers}


def make_optimizer(train_config) -> optax.GradientTransformation:
  """Adam moments (β1, β2, ε) only; the learning rate is applied in the step from the host schedule."""
  return optax.scale_by_adam(b1=train_config.adam_b1, b2=train_config.adam_b2, eps=train_config.adam_eps)


def create_train_state(variables: dict, tx: optax.GradientTransformation) -> TrainState:
  """Builds the state from freshly initialised (or converted) network variables."""
  variables = dict(variables)
  params = variables.pop("params")
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=jax.tree.map(jnp.copy, params),
      opt_state=tx.init(params),
      buffers=variables,
  )


def learning_rate(nimg: float, train_config, lr_scale: float = 1.0) -> float:
  """Base LR ramped linearly over the first ``lr_rampup_kimg`` counted kimg, then constant (EDM), times
  ``lr_scale`` (``StepPlan.lr_scale``: the multigrid schedule's batch-factor scaling; 1 otherwise).

  Args:
    nimg: counted images before this step.
  """
  rampup = max(train_config.lr_rampup_kimg * 1000, 1e-8)
  return float(train_config.lr * min(nimg / rampup, 1.0) * lr_scale)


def ema_beta(nimg: float, images_per_step: float, train_config) -> float:
  """EMA decay for one step: β = 0.5^(images_per_step / h), h = min(half-life, ratio · nimg).

  Args:
    nimg: counted images before this step.
    images_per_step: what the counter advances by after this step (``StepPlan.counted_images``), as the
      official loop's ``batch_size * batch_mul_avg`` (the current multiplier in its progressive mode).
  """
  halflife = train_config.ema_halflife_kimg * 1000
  if train_config.ema_rampup_ratio:
    halflife = min(halflife, nimg * train_config.ema_rampup_ratio)
  return float(0.5**(images_per_step / max(halflife, 1e-8)))


def param_count(tree: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))
