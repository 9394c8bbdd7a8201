"""The analytic FLOP count of tvq.model.flops set against XLA's cost analysis.

XLA counts every operation of the compiled program, elementwise ones included, but
counts a loop body once whatever its trip count. The comparison therefore compiles a
one-layer copy of the model (the layer stack is a scan) without rematerialisation,
traces both attention types with their block scans unrolled, and uses the "matmul"
cache reduction (the "serial" one is a scan too). What remains different:
- XLA adds the elementwise work (norms, softmax, masks) that the analytic count leaves
  out, a few percent at small widths;
- both attention types rematerialise each block's scores in the backward pass, about
  one more forward pass of the score matmuls in a training step;
- the training step here is loss and gradients only: the optimiser's elementwise update
  is left out of both counts.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from tvq.bench.attention import make_train_step
from tvq.model.attention import unrolled_block_scan
from tvq.model.config import TransformerConfig
from tvq.model.flops import forward_flops_per_token, train_flops_per_token
from tvq.model.transformer import Transformer


@dataclasses.dataclass
class FlopCheck:
    """Analytic and XLA-counted FLOPs per token of one configuration."""

    attn_type: str
    head_type: str
    sequence_len: int
    analytic_forward: float
    xla_forward: float
    analytic_train: float
    xla_train: float

    @property
    def forward_ratio(self) -> float:
        return self.xla_forward / self.analytic_forward

    @property
    def train_ratio(self) -> float:
        return self.xla_train / self.analytic_train


def checkable_config(config: TransformerConfig) -> TransformerConfig:
    """Return the one-layer, loop-free variant of config that XLA's counts cover fully."""
    return dataclasses.replace(config, n_layer=1, remat="none", reduction_type="matmul")


def _cost_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    # Older JAX releases return one dict per device program.
    if isinstance(cost, list):
        cost = cost[0]
    if not cost or "flops" not in cost:
        return math.nan
    return float(cost["flops"])


def check(config: TransformerConfig, batch_size: int = 2) -> FlopCheck:
    """Compile the forward pass and a training step of config's checkable variant and
    return both FLOP counts per token. A count is nan when the backend gives no cost
    analysis."""
    c = checkable_config(config)
    model = Transformer(c)
    tokens = jnp.zeros((batch_size, c.sequence_len + 1), jnp.int32)
    n_tokens = batch_size * c.sequence_len

    with unrolled_block_scan():
        variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens[:, :-1])
        forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
        forward_flops = _cost_flops(forward.lower(variables, tokens[:, :-1]).compile())
        step = make_train_step(model)
        train_flops = _cost_flops(
            step.lower(variables["params"], variables.get("codebook", {}), tokens).compile()
        )

    return FlopCheck(
        attn_type=c.attn_type,
        head_type=c.head_type,
        sequence_len=c.sequence_len,
        analytic_forward=forward_flops_per_token(c),
        xla_forward=forward_flops / n_tokens,
        analytic_train=train_flops_per_token(c),
        xla_train=train_flops / n_tokens,
    )


def format_checks(checks: list[FlopCheck]) -> str:
    lines = [
        f"{'attn':<5} {'head':<5} {'T':>6} {'fwd analytic':>13} {'fwd XLA':>11} {'ratio':>6} "
        f"{'train analytic':>15} {'train XLA':>11} {'ratio':>6}   (MFLOP per token)"
    ]
    for k in checks:
        lines.append(
            f"{k.attn_type:<5} {k.head_type:<5} {k.sequence_len:>6} "
            f"{k.analytic_forward / 1e6:>13.3f} {k.xla_forward / 1e6:>11.3f} "
            f"{k.forward_ratio:>6.3f} {k.analytic_train / 1e6:>15.3f} "
            f"{k.xla_train / 1e6:>11.3f} {k.train_ratio:>6.3f}"
        )
    return "\n".join(lines)
