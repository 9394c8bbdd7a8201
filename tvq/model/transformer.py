"""The Transformer-VQ language model."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from tvq.model.config import TransformerConfig
from tvq.model.layers import rms_norm, scanned_blocks
from tvq.model.partitioning import constrain
from tvq.model.positions import sinusoid_row, sinusoid_table


class Transformer(nn.Module):
    """Decoder-only language model over token ids.

    `apply(variables, inputs, train=...)` maps [B, T] int inputs to
    (logits [B, T, N] float32, aux), where aux holds:
      commit_loss: scalar, summed over layers, to be added to the training loss;
      codebook_perplexity, codebook_usage: [n_layer, attention sublayers per layer].
    Variables are {"params": ..., "codebook": ...}. To update the codebook from a
    training batch, apply with train=True and mutable=["codebook"]; the new
    "codebook" collection is returned beside the outputs.

    With `decode`, inputs are one token per sequence [B, 1] and each attention layer
    keeps a decoding state in the "cache" collection (tvq.model.decode_attention).
    The first apply with "cache" mutable creates the empty state, and its logits are
    meaningless. Each later apply consumes one token and returns the logits for the
    next. `decode_len` is the key/value cache capacity of attn_type "full".
    """

    config: TransformerConfig
    decode: bool = False
    decode_len: int = 0

    @nn.compact
    def __call__(self, inputs: jnp.ndarray, *, train: bool = False):
        c = self.config
        B, T = inputs.shape
        expected_len = 1 if self.decode else c.sequence_len
        assert T == expected_len, (inputs.shape, expected_len)

        embed = nn.Embed(
            c.n_vocab,
            c.d_model,
            embedding_init=nn.initializers.normal(stddev=1.0),
            dtype=c.activation_dtype,
            param_dtype=c.parameter_dtype,
            name="embed",
        )
        x = embed(inputs)

        if c.pe_abs:
            scale = self.param("pe_abs_scale", nn.initializers.zeros, (), c.parameter_dtype)
            if self.decode:
                created = self.has_variable("cache", "position")
                position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
                positions = sinusoid_row(position.value, c.d_model, c.pe_lam)[None]
                if created:
                    position.value = position.value + 1
            else:
                positions = sinusoid_table(np.arange(T), c.d_model, c.pe_lam)
            positions = nn.Dropout(c.p_dropsin)(positions, deterministic=not train)
            x = x + (scale * positions).astype(x.dtype)

        x = constrain(x, "data", None, None)
        x, aux = scanned_blocks(c, train, self.decode, self.decode_len)()(x, None)

        if c.e_preln:
            x = rms_norm(x)
        if c.e_tie:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(
                c.n_vocab,
                use_bias=False,
                dtype=c.activation_dtype,
                param_dtype=c.parameter_dtype,
                name="unembed",
            )(x)
        logits = constrain(logits.astype(jnp.float32) * c.e_scale, "data", None, "model")

        aux = {
            "commit_loss": jnp.sum(aux["commit_loss"]),
            "codebook_perplexity": aux["codebook_perplexity"],
            "codebook_usage": aux["codebook_usage"],
        }
        return logits, aux
