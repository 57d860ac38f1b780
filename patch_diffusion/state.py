"""Training state: a small pytree of arrays. The model's apply function and the optimizer stay outside.

The image counter ``nimg`` is *not* a device array: it advances by each step's
``StepPlan.counted_images`` (``patches.PatchSchedule.plan``: batch · average multiplier for the stochastic
schedule, a fractional number; batch · current multiplier for the progressive and multigrid ones) up to
~2·10⁸, beyond float32's exact range, so the training loop keeps it on the host in float64 and saves it in
the checkpoint metadata. The learning rate and EMA decay derived from it are passed to each step as
scalars.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
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


def make_optimizer(train_config, num_stages: int = 0) -> optax.GradientTransformation:
  """Adam moments (β1, β2, ε) only; the learning rate is applied in the step from the host schedule.

  Args:
    train_config: ``config.train`` (``adam_b1``, ``adam_b2``, ``adam_eps``).
    num_stages: K > 0 for a multi-stage network (decoders ``decs_0 .. decs_{K-1}``): Adam per decoder
      that skips the decoders the step does not train (:func:`stagewise_adam`); 0 = plain Adam.
  """
  kwargs = dict(b1=train_config.adam_b1, b2=train_config.adam_b2, eps=train_config.adam_eps)
  return stagewise_adam(num_stages, **kwargs) if num_stages else optax.scale_by_adam(**kwargs)


#: Top-level parameter name of decoder k of a ``MultistageUNet``.
DECODER_NAME = "decs_{}"


class StagewiseAdamState(NamedTuple):
  """Adam state of a multi-stage network.

  Attributes:
    shared: moments of every parameter outside the decoders, with the global step count.
    decoders: one ``ScaleByAdamState`` per decoder; its ``count`` is the number of steps that trained
      that decoder (PyTorch's per-parameter ``state['step']``), which sets its bias correction.
  """
  shared: optax.ScaleByAdamState
  decoders: tuple


def _split_decoders(tree: dict, num_stages: int) -> tuple[dict, tuple]:
  names = [DECODER_NAME.format(k) for k in range(num_stages)]
  missing = [n for n in names if n not in tree]
  if missing:
    raise ValueError(f"stagewise Adam for {num_stages} stages expects top-level parameters {names}; "
                     f"{missing} missing (is the network a MultistageUNet with {num_stages} decoders?)")
  return {k: v for k, v in tree.items() if k not in names}, tuple(tree[n] for n in names)


def stagewise_adam(num_stages: int, *, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8) -> optax.GradientTransformationExtraArgs:
  """Adam for a multi-stage network whose step trains one decoder: PyTorch's semantics for the others.

  The authors train with ``torch.optim.Adam`` under DDP with ``find_unused_parameters=True``: a decoder
  no rank used in a step keeps ``.grad = None``, and Adam skips such a parameter entirely — no update, no
  decay of its moments, no advance of its per-parameter step counter. This transformation does the same
  for the step's stage k (``update(..., stage=k)``):

  * shared parameters (mapping, encoder): ordinary Adam with the global step count;
  * decoder k: Adam with its own moments and its own count (the number of steps that trained it), so its
    bias correction is PyTorch's ``1 − β^(its steps)``, not ``1 − β^(global steps)``;
  * every other decoder: update exactly 0 and state returned unchanged (bit for bit).

  ``stage`` may be a Python int (static: only decoder k's Adam is traced) or a traced int32 scalar
  (every decoder's Adam is computed and selected with ``jnp.where``).

  Returns:
    A transformation whose ``update(grads, state, params=None, *, stage)`` requires ``stage``; its state
    is a :class:`StagewiseAdamState`.
  """
  adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

  def init(params):
    shared, decs = _split_decoders(params, num_stages)
    return StagewiseAdamState(adam.init(shared), tuple(adam.init(d) for d in decs))

  def update(grads, state, params=None, *, stage=None, **extra):
    del params, extra
    if stage is None:
      raise ValueError("stagewise Adam needs the step's stage: tx.update(grads, state, params, stage=k)")
    g_shared, g_decs = _split_decoders(grads, num_stages)
    u_shared, s_shared = adam.update(g_shared, state.shared)
    static = isinstance(stage, (int, np.integer))
    u_decs, s_decs = [], []
    for k, (g, s_old) in enumerate(zip(g_decs, state.decoders)):
      if static and k != int(stage):
        u, s = jax.tree.map(jnp.zeros_like, g), s_old
      else:
        u, s = adam.update(g, s_old)
        if not static:
          on = jnp.asarray(stage) == k
          u = jax.tree.map(lambda x, on=on: jnp.where(on, x, jnp.zeros_like(x)), u)
          s = jax.tree.map(lambda new, old, on=on: jnp.where(on, new, old), s, s_old)
      u_decs.append(u)
      s_decs.append(s)
    updates = dict(u_shared, **{DECODER_NAME.format(k): u for k, u in enumerate(u_decs)})
    return updates, StagewiseAdamState(s_shared, tuple(s_decs))

  return optax.GradientTransformationExtraArgs(init, update)


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


def stage_param_counts(params: dict, num_stages: int) -> tuple[int, tuple[int, ...]]:
  """(parameters outside the decoders, parameters of each decoder) of a multi-stage network: a step of
  stage k trains ``shared + decoders[k]`` of them."""
  shared, decs = _split_decoders(params, num_stages)
  return param_count(shared), tuple(param_count(d) for d in decs)
