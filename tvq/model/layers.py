"""Sublayers and the per-layer block of Transformer-VQ."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tvq.model.attention import full_attention, quadratic_attention, vq_attention
from tvq.model.config import TransformerConfig
from tvq.model.decode_attention import (
    FULL_STATE_KEYS,
    VQ_STATE_KEYS,
    full_decode_state,
    full_decode_step,
    vq_decode_state,
    vq_decode_step,
)
from tvq.model.partitioning import constrain
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


def _no_codebook_aux() -> dict[str, jnp.ndarray]:
    """Return zero aux scalars, for a sublayer without codebook statistics."""
    return {
        "commit_loss": jnp.zeros((), jnp.float32),
        "codebook_perplexity": jnp.zeros((), jnp.float32),
        "codebook_usage": jnp.zeros((), jnp.float32),
    }


class AttentionLayer(nn.Module):
    """RMSNorm, projections, key quantisation, attention, gate and output projection.

    Returns the [B, T, D] sublayer output and a dict of scalars: commit_loss,
    codebook_perplexity, codebook_usage (zeros for attn_type "full").

    With `decode`, x is one token [B, 1, D] and the layer keeps its decoding state in
    the "cache" collection (see tvq.model.decode_attention); `decode_len` is the
    capacity of the key/value cache of attn_type "full". The first apply with "cache"
    mutable only creates the empty state, and every later one decodes one token.
    """

    config: TransformerConfig
    train: bool
    decode: bool = False
    decode_len: int = 0

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        c = self.config
        B, T, D = x.shape
        expected_len = 1 if self.decode else c.sequence_len
        assert (T, D) == (expected_len, c.d_model), (x.shape, expected_len, c.d_model)
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
        def position_features():
            sinusoids = sinusoid_table(np.arange(L + 1), D, c.pe_lam).astype(dtype)
            sinusoids = nn.Dropout(c.p_dropsin)(sinusoids, deterministic=not self.train)
            return _dense(c, (h, K), "r_proj")(sinusoids)

        if self.decode:
            out, aux = _decode_step(self, q, k, v, u, w, position_features)
            if c.head_type == "shga":
                out = out * gate.reshape(B, T, h, G, V)
            y = _dense(c, D, "o_proj", axis=(-3, -2, -1))(out)
            return y, aux

        r = position_features()
        aux = _no_codebook_aux()
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


def _decode_step(layer: AttentionLayer, q, k, v, u, w, position_features):
    """Attend from one token [B, 1, ...] through the state in the "cache" collection.

    Returns the [B, 1, h, G, V] output and the aux scalars. While the state is being
    created the output is zeros and no token is added.
    """
    c = layer.config
    B = q.shape[0]
    h, K, V = c.n_kv_head, c.d_k, c.d_v
    created = layer.has_variable("cache", "position")

    def empty_state():
        if c.attn_type == "full":
            return full_decode_state(
                B, h, K, V, layer.decode_len, c.activation_dtype, position_features()
            )
        return vq_decode_state(
            B, h, K, V, c.n_code, c.block_len, c.activation_dtype, position_features()
        )

    # The empty state is built only when the cache is created, so later steps do
    # not recompute the [L + 1, D] x [D, h, K] position projection.
    empty = None if created else empty_state()
    names = FULL_STATE_KEYS if c.attn_type == "full" else VQ_STATE_KEYS
    cells = {name: layer.variable("cache", name, lambda name=name: empty[name]) for name in names}
    state = {name: cell.value for name, cell in cells.items()}

    # Decoding neither trains nor reports the codebook.
    aux = _no_codebook_aux()
    if c.attn_type == "full":
        out, state = full_decode_step(state, q[:, 0], k[:, 0], v[:, 0], u, w)
    else:
        quantizer = VectorQuantizer(h, c.n_code, K, c.c_beta, c.c_gamma, name="quantizer")
        quantized = quantizer(k, train=False)
        out, state = vq_decode_step(
            state, q[:, 0], quantized.k_hat[:, 0], v[:, 0], quantized.codes[:, 0],
            quantized.codebook, u, w,
        )
    if not created:
        return jnp.zeros_like(out)[:, None], aux

    for name, cell in cells.items():
        cell.value = state[name]
    return out[:, None], aux


class MLP(nn.Module):
    """RMSNorm, then a squared-ReLU feed-forward layer."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = self.config
        hidden = _dense(c, c.d_ff, "fc_in")(rms_norm(x))
        hidden = constrain(jnp.square(nn.relu(hidden)), "data", None, "model")
        return _dense(c, c.d_model, "fc_out")(hidden)


class Block(nn.Module):
    """One layer: two attention sublayers (shga) or attention then MLP (mqa, mha).

    Each sublayer output goes through residual dropout and layer drop before it is
    added to the residual stream. Called as a scan body: (x, None) -> (x, aux).
    """

    config: TransformerConfig
    train: bool
    decode: bool = False
    decode_len: int = 0

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
                AttentionLayer(c, self.train, self.decode, self.decode_len, name="attn_0"),
                AttentionLayer(c, self.train, self.decode, self.decode_len, name="attn_1"),
            ]
        else:
            sublayers = [
                AttentionLayer(c, self.train, self.decode, self.decode_len, name="attn"),
                MLP(c, name="mlp"),
            ]

        attention_aux = []
        for sublayer in sublayers:
            if isinstance(sublayer, AttentionLayer):
                y, aux = sublayer(x)
                attention_aux.append(aux)
            else:
                y = sublayer(x)
            y = nn.Dropout(c.p_dropres)(y, deterministic=not self.train)
            x = constrain(x + self._drop_layer(y).astype(x.dtype), "data", None, None)

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


def scanned_blocks(
    config: TransformerConfig, train: bool, decode: bool = False, decode_len: int = 0
) -> nn.Module:
    """Return the stack of n_layer blocks as one scanned, optionally rematerialised module.

    Decoding keeps one state per layer, stacked like the parameters, and does not
    rematerialise because nothing is differentiated.
    """
    block = Block
    if config.remat != "none" and not decode:
        block = nn.remat(block, policy=REMAT_POLICIES[config.remat], prevent_cse=False)
    stack = nn.scan(
        block,
        variable_axes={"params": 0, "codebook": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True},
        length=config.n_layer,
    )
    return functools.partial(stack, config, train, decode, decode_len, name="layers")
