"""Sublayers and the per-layer block of Transformer-VQ."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tvq.model.attention import full_attention, quadratic_attention, vq_attention
from tvq.model.config import TransformerConfig
from tvq.model.positions import sinusoid_table
from tvq.model.quantizer import VectorQuantizer

RMS_EPS = 1e-6


def rms_norm(x: jnp.ndarray) -> jnp.ndarray:
    """RMS-normalise the last axis without a learned scale, computing in float32."""
    x32 = x.astype(jnp.float32)
    scale = jax.lax.rsqrt(jnp.mean(x32**2, axis=-1, keepdims=True) + RMS_EPS)
    return (x32 * scale).astype(x.dtype)


def _dense(config: TransformerConfig, features, name: str, axis=-1) -> nn.DenseGeneral:
    return nn.DenseGeneral(
        features,
        axis=axis,
        use_bias=False,
        dtype=config.activation_dtype,
        param_dtype=config.parameter_dtype,
        name=name,
    )


class AttentionLayer(nn.Module):
    """RMSNorm, projections, key quantisation, attention, gate and output projection.

    Returns the [B, T, D] sublayer output and a dict of scalars: commit_loss,
    codebook_perplexity, codebook_usage (zeros for attn_type "full").
    """

    config: TransformerConfig
    train: bool

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        c = self.config
        B, T, D = x.shape
        assert (T, D) == (c.sequence_len, c.d_model), (x.shape, c.sequence_len, c.d_model)
        h, G, K, V, L = c.n_kv_head, c.n_head // c.n_kv_head, c.d_k, c.d_v, c.block_len
        dtype = c.activation_dtype

        x_norm = rms_norm(x)
        q = _dense(c, (h, G, K), "q_proj")(x_norm)
        k = _dense(c, (h, K), "k_proj")(x_norm)
        v = _dense(c, (h, V), "v_proj")(x_norm)

        # A dot product of two RMS-normalised vectors scaled by K**-0.25 each carries
        # the usual K**-0.5.
        q = rms_norm(q) * jnp.asarray(K**-0.25, dtype)
        k = rms_norm(k) * jnp.asarray(K**-0.25, dtype)
        if c.head_type == "shga":
            v = nn.silu(v)
            gate = nn.silu(_dense(c, V, "g_proj")(x_norm))

        u = self.param("u", nn.initializers.zeros, (h, G, K), c.parameter_dtype)
        w = self.param("w", nn.initializers.zeros, (h, G, K), c.parameter_dtype)

        # Relative position features for distances 0 .. L, the window the bias covers.
        sinusoids = sinusoid_table(np.arange(L + 1), D, c.pe_lam).astype(dtype)
        sinusoids = nn.Dropout(c.p_dropsin)(sinusoids, deterministic=not self.train)
        r = _dense(c, (h, K), "r_proj")(sinusoids)

        aux = {
            "commit_loss": jnp.zeros((), jnp.float32),
            "codebook_perplexity": jnp.zeros((), jnp.float32),
            "codebook_usage": jnp.zeros((), jnp.float32),
        }
        if c.attn_type == "full":
            out = full_attention(q, k, v, u, w, r, block_len=L)
        else:
            quantizer = VectorQuantizer(h, c.n_code, K, c.c_beta, c.c_gamma, name="quantizer")
            quantized = quantizer(k, train=self.train)
            aux = {
                "commit_loss": quantized.commit_loss,
                "codebook_perplexity": quantized.perplexity,
                "codebook_usage": quantized.usage,
            }
            if c.attn_type == "vq":
                out = vq_attention(
                    q, quantized.k_hat, v, quantized.codes, quantized.codebook, u, w, r,
                    block_len=L, reduction=c.reduction_type,
                )
            else:
                out = quadratic_attention(q, quantized.k_hat, v, u, w, r, block_len=L)

        if c.head_type == "shga":
            out = out * gate.reshape(B, T, h, G, V)
        y = _dense(c, D, "o_proj", axis=(-3, -2, -1))(out)
        return y, aux


class MLP(nn.Module):
    """RMSNorm, then a squared-ReLU feed-forward layer."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = self.config
        hidden = _dense(c, c.d_ff, "fc_in")(rms_norm(x))
        hidden = jnp.square(nn.relu(hidden))
        return _dense(c, c.d_model, "fc_out")(hidden)


class Block(nn.Module):
    """One layer: two attention sublayers (shga) or attention then MLP (mqa, mha).

    Each sublayer output goes through residual dropout and layer drop before it is
    added to the residual stream. Called as a scan body: (x, None) -> (x, aux).
    """

    config: TransformerConfig
    train: bool

    def _drop_layer(self, y: jnp.ndarray) -> jnp.ndarray:
        """Zero the sublayer output of whole sequences with probability p_droplyr."""
        p = self.config.p_droplyr
        if not self.train or p == 0.0:
            return y
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - p, (y.shape[0], 1, 1))
        return jnp.where(keep, y / (1.0 - p), jnp.zeros_like(y))

    @nn.compact
    def __call__(self, x: jnp.ndarray, _) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        c = self.config
        if c.head_type == "shga":
            sublayers = [
                AttentionLayer(c, self.train, name="attn_0"),
                AttentionLayer(c, self.train, name="attn_1"),
            ]
        else:
            sublayers = [AttentionLayer(c, self.train, name="attn"), MLP(c, name="mlp")]

        attention_aux = []
        for sublayer in sublayers:
            if isinstance(sublayer, AttentionLayer):
                y, aux = sublayer(x)
                attention_aux.append(aux)
            else:
                y = sublayer(x)
            y = nn.Dropout(c.p_dropres)(y, deterministic=not self.train)
            x = x + self._drop_layer(y).astype(x.dtype)

        aux = {
            "commit_loss": sum(a["commit_loss"] for a in attention_aux),
            "codebook_perplexity": jnp.stack([a["codebook_perplexity"] for a in attention_aux]),
            "codebook_usage": jnp.stack([a["codebook_usage"] for a in attention_aux]),
        }
        return x, aux


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def scanned_blocks(config: TransformerConfig, train: bool) -> nn.Module:
    """Return the stack of n_layer blocks as one scanned, optionally rematerialised module."""
    block = Block
    if config.remat != "none":
        block = nn.remat(block, policy=REMAT_POLICIES[config.remat], prevent_cse=False)
    stack = nn.scan(
        block,
        variable_axes={"params": 0, "codebook": 0},
        split_rngs={"params": True, "dropout": True},
        length=config.n_layer,
    )
    return functools.partial(stack, config, train, name="layers")
