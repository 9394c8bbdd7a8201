"""The optimiser chain: clipping, AdamW, Lion or Adafactor, schedule, weight decay.

Order of the chain: global-norm clipping of the gradients, the optimiser's update
direction, the learning-rate schedule, then decoupled weight decay. Weight decay comes
after the learning rate, so each step multiplies a decayed parameter by exactly
(1 - weight_decay) whatever the learning rate is at that step. The codebook statistics
are not parameters and never pass through this chain.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "inv_sqrt", "linear")
OPTIMIZERS = ("adamw", "lion", "adafactor")
# Every schedule decays to this fraction of the peak learning rate.
FINAL_FRACTION = 0.1
# Parameters with these names are matrices (projections, embeddings) and are decayed;
# biases, the per-head vectors u and w, and scales are not.
DECAYED_NAMES = ("kernel", "embedding")


def learning_rate_schedule(
    kind: str, peak: float, warmup_steps: int, total_steps: int
) -> optax.Schedule:
    """Return step -> learning rate: linear warm-up to `peak`, then decay to 10% of it.

    cosine and linear reach 10% of the peak at total_steps; inv_sqrt decays as
    sqrt(warmup_steps / step) and stays at 10% once it gets there.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    warmup = max(warmup_steps, 1)
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warming = peak * jnp.minimum((step + 1.0) / warmup, 1.0)
        progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        if kind == "cosine":
            fraction = FINAL_FRACTION + (1 - FINAL_FRACTION) * 0.5 * (
                1 + jnp.cos(math.pi * progress)
            )
        elif kind == "linear":
            fraction = 1.0 - (1 - FINAL_FRACTION) * progress
        else:
            fraction = jnp.maximum(
                jnp.sqrt(warmup / jnp.maximum(step, warmup)), FINAL_FRACTION
            )
        return jnp.where(step < warmup_steps, warming, peak * fraction)

    return schedule


def decay_mask(params) -> object:
    """Return a tree of booleans, true for the parameters that weight decay applies to."""

    def is_decayed(path, _) -> bool:
        name = getattr(path[-1], "key", getattr(path[-1], "name", None))
        return name in DECAYED_NAMES

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(
    name: str,
    schedule: optax.Schedule,
    *,
    weight_decay: float = 0.0,
    grad_clip: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.98,
    eps: float = 1e-9,
) -> optax.GradientTransformation:
    """Build the chain; grad_clip 0 disables clipping and weight_decay 0 disables decay.

    b1, b2 and eps are AdamW's; Lion uses b1 and b2; Adafactor uses its own defaults
    without scaling updates by parameter size.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if weight_decay < 0 or grad_clip < 0:
        raise ValueError(
            f"weight_decay and grad_clip must be non-negative, got {weight_decay}, {grad_clip}"
        )

    # Disabled steps are identities rather than absent, so the optimiser state has the
    # same structure whatever grad_clip and weight_decay are, and a run can resume
    # with either changed.
    chain = [optax.clip_by_global_norm(grad_clip) if grad_clip > 0 else optax.identity()]
    if name == "adamw":
        chain.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
    elif name == "lion":
        chain.append(optax.scale_by_lion(b1=b1, b2=b2))
    else:
        chain.append(optax.adafactor(learning_rate=None, multiply_by_parameter_scale=False))
    # optax 0.2.8's adafactor without a learning rate already returns the descent
    # direction (negated), unlike scale_by_adam and scale_by_lion.
    chain.append(optax.scale_by_learning_rate(schedule, flip_sign=name != "adafactor"))
    # Applied after the learning rate: updates -= weight_decay * params.
    chain.append(
        optax.add_decayed_weights(-weight_decay, mask=decay_mask)
        if weight_decay > 0
        else optax.identity()
    )
    return optax.chain(*chain)
