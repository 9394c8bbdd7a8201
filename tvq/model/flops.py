"""Analytic FLOP counts of the model per token.

Counts multiply-adds of matrix products as 2 FLOPs and ignores elementwise work
(norms, softmax, masking), the usual convention for model-FLOPs utilisation. Dense
attention is counted over all T keys of a query, masked ones included, because that is
what `full_attention` computes. VQ attention likewise counts both window blocks in
full. A training step is counted as 3x the forward pass (backward costs twice the
forward), without the recomputation that rematerialisation adds.
"""

from __future__ import annotations

from tvq.model.config import TransformerConfig


def attention_macs_per_token(config: TransformerConfig) -> float:
    """Multiply-adds per token of one attention sublayer, projections included."""
    c = config
    D, K, V, S, L, T = c.d_model, c.d_k, c.d_v, c.n_code, c.block_len, c.sequence_len
    H, h, R = c.n_head, c.n_kv_head, c.n_block

    projections = D * H * K + D * h * K + D * h * V + H * V * D
    if c.head_type == "shga":
        projections += D * V
    # The position features r are projected once per sequence, for L + 1 distances.
    projections += (L + 1) * D * h * K / T

    position = H * (L + 1) * K
    if c.attn_type == "vq":
        window = H * 2 * L * (K + V)
        cache = H * S * (K + V)
        quantizer = 2 * h * S * K  # nearest-code distances and the codebook's key sums
        cache_sums = h * S * V  # one-hot matmul of each block's values per code
        reduction = h * S * (V + 1) * R * R / T if c.reduction_type == "matmul" else 0.0
        return projections + position + window + cache + quantizer + cache_sums + reduction

    dense = H * T * (K + V)
    quantizer = 2 * h * S * K if c.attn_type == "vq_quadratic" else 0.0
    return projections + position + dense + quantizer


def forward_flops_per_token(config: TransformerConfig) -> float:
    """Forward-pass FLOPs per token of the whole model."""
    c = config
    attention = attention_macs_per_token(c)
    if c.head_type == "shga":
        layer = 2 * attention
    else:
        layer = attention + 2 * c.d_model * c.d_ff
    unembed = c.d_model * c.n_vocab
    return 2.0 * (c.n_layer * layer + unembed)


def train_flops_per_token(config: TransformerConfig) -> float:
    """Training-step FLOPs per token (forward and backward)."""
    return 3.0 * forward_flops_per_token(config)
