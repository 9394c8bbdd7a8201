"""Compiled incremental decoding: consume a prompt, then generate, one token per step.

Each step applies the model in decode mode to one token per sequence and updates the
per-layer states in the "cache" collection (tvq.model.decode_attention). A run of
steps is one `jax.lax.scan`, compiled once per run length, so callers feed prompts and
generate in chunks of a fixed length and show progress between chunks.

Shapes: B batch, n steps in a chunk, N vocabulary size.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tvq.data.vocab import EOS_ID
from tvq.model.config import TransformerConfig
from tvq.model.transformer import Transformer
from tvq.sampling.filters import sample_tokens

Cache = Any


class Decoder:
    """Incremental decoding of one model for a batch of B sequences.

    `variables` contains "params" and, for VQ attention, "codebook". `capacity` bounds the
    number of tokens a sequence can consume, the end-of-sequence id that starts it
    included; only attn_type "full" allocates memory for it. `vocab_size` limits the
    generated ids to those below it.
    """

    def __init__(
        self,
        config: TransformerConfig,
        variables: dict,
        batch_size: int,
        capacity: int,
        vocab_size: int | None = None,
    ):
        self.config = config
        self.batch_size = batch_size
        self.capacity = capacity
        # Generation draws only ids below this (default: all n_vocab outputs).
        self.vocab_size = vocab_size
        self.model = Transformer(config, decode=True, decode_len=capacity)
        self.variables = {"params": variables["params"], "codebook": variables.get("codebook", {})}
        self._start = jax.jit(self._start_fn)
        self._consume = jax.jit(self._consume_fn, static_argnames="keep_logits")
        self._generate = jax.jit(self._generate_fn, static_argnames="length")

    def _start_fn(self, variables) -> Cache:
        tokens = jnp.full((self.batch_size, 1), EOS_ID, jnp.int32)
        _, mutated = self.model.apply(variables, tokens, mutable=["cache"])
        return mutated["cache"]

    def _step(self, variables, cache: Cache, tokens: jnp.ndarray) -> tuple[Cache, jnp.ndarray]:
        """Consume tokens [B]; return the new cache and the next-token logits [B, N]."""
        (logits, _), mutated = self.model.apply(
            {**variables, "cache": cache}, tokens[:, None], mutable=["cache"]
        )
        return mutated["cache"], logits[:, 0]

    def _consume_fn(self, variables, cache, tokens, *, keep_logits: bool):
        def step(carry, column):
            cache, _ = carry
            cache, logits = self._step(variables, cache, column)
            return (cache, logits), logits if keep_logits else None

        no_logits = jnp.zeros((self.batch_size, self.config.n_vocab), jnp.float32)
        (cache, last), every = jax.lax.scan(step, (cache, no_logits), tokens.T)
        return cache, jnp.swapaxes(every, 0, 1) if keep_logits else last

    def _generate_fn(self, variables, cache, logits, key, first_index, settings, *, length: int):
        temperature, top_k, top_p = settings

        def step(carry, index):
            cache, logits = carry
            # Keyed on the token's index in the sample, so the draws do not depend on
            # how the generation was split into chunks.
            token = sample_tokens(
                jax.random.fold_in(key, index), logits, temperature, top_k, top_p,
                self.vocab_size,
            )
            cache, logits = self._step(variables, cache, token)
            return (cache, logits), token

        indices = first_index + jnp.arange(length)
        (cache, logits), tokens = jax.lax.scan(step, (cache, logits), indices)
        return cache, logits, tokens.T

    def start(self) -> Cache:
        """Return the state of B empty sequences, the end-of-sequence id not yet consumed."""
        return self._start(self.variables)

    def consume(self, cache: Cache, tokens) -> tuple[Cache, jnp.ndarray]:
        """Feed tokens [B, n] (teacher forcing); return the cache and the logits [B, N]
        that predict the token after them."""
        tokens = jnp.asarray(tokens, jnp.int32)
        return self._consume(self.variables, cache, tokens, keep_logits=False)

    def consume_logits(self, cache: Cache, tokens) -> tuple[Cache, jnp.ndarray]:
        """Feed tokens [B, n]; return the cache and the logits [B, n, N] after each token."""
        tokens = jnp.asarray(tokens, jnp.int32)
        return self._consume(self.variables, cache, tokens, keep_logits=True)

    def generate(
        self,
        cache: Cache,
        logits: jnp.ndarray,
        key: jax.Array,
        first_index: int,
        length: int,
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
    ) -> tuple[Cache, jnp.ndarray, jnp.ndarray]:
        """Draw `length` tokens, feeding each back in.

        `logits` [B, N] predict the first of them and `first_index` is its index among
        all generated tokens, which seeds its draw. Returns the cache, the logits after
        the last token and the tokens [B, length].
        """
        settings = (
            jnp.asarray(temperature, jnp.float32),
            # A top-k past the vocabulary keeps everything, and would overflow int32.
            jnp.asarray(min(top_k, self.config.n_vocab), jnp.int32),
            jnp.asarray(top_p, jnp.float32),
        )
        return self._generate(
            self.variables, cache, logits, key, jnp.asarray(first_index, jnp.int32), settings,
            length=length,
        )
