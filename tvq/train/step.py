"""The training state, and the training and evaluation steps compiled over a device mesh.

The state is a dict {step, params, codebook, opt_state}. The codebook statistics are
updated by the model's forward pass in the same step, beside the optimiser rather than
through it. Every step is a pure function of (state, batch): dropout randomness is
derived from the seed and the step number, so a resumed run repeats an uninterrupted one
exactly.

Shapes: B batch, T sequence length, N vocabulary size.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from tvq.data.batches import eval_batch_count, eval_batches
from tvq.distributed import any_process
from tvq.model.losses import cross_entropy
from tvq.model.transformer import Transformer
from tvq.train.config import RunConfig
from tvq.train.optimizer import learning_rate_schedule, make_optimizer
from tvq.train.sharding import batch_sharding, local_rows, make_mesh, state_shardings

__all__ = ["State", "Trainer", "make_mesh", "param_count", "replicated"]

State = dict[str, Any]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


class Trainer:
    """The model, optimiser and compiled steps of one run on one mesh."""

    def __init__(self, config: RunConfig, mesh: Mesh):
        self.config = config
        self.mesh = mesh
        self.model = Transformer(config.model)
        t = config.train
        self.schedule = learning_rate_schedule(
            t.lr_schedule, t.lr_max, t.n_warmup_step, t.n_max_step
        )
        self.optimizer = make_optimizer(
            t.optimizer, self.schedule, weight_decay=t.wd_lam, grad_clip=t.grad_clip
        )
        init_key, self.dropout_key = jax.random.split(jax.random.PRNGKey(t.seed))
        self._init_key = init_key

        # Each array of the state is placed by tvq.train.sharding's rules, the
        # optimiser moments like their parameters; batches are split over `data`.
        state_sharding = state_shardings(jax.eval_shape(self._init_state), mesh)
        data_sharding = batch_sharding(mesh)
        self.state_sharding = state_sharding
        self.data_sharding = data_sharding
        self._init = jax.jit(self._init_state, out_shardings=state_sharding)
        self._train_step = jax.jit(
            self._step,
            in_shardings=(state_sharding, data_sharding),
            out_shardings=(state_sharding, replicated(mesh)),
            donate_argnums=0,
        )
        self._eval_step = jax.jit(
            self._score,
            in_shardings=(state_sharding["params"], state_sharding["codebook"], data_sharding),
            out_shardings=replicated(mesh),
        )

    def _init_state(self) -> State:
        c = self.config.model
        inputs = jnp.zeros((1, c.sequence_len), jnp.int32)
        variables = self.model.init({"params": self._init_key}, inputs, train=False)
        params = variables["params"]
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            # attn_type "full" has no codebook.
            "codebook": variables.get("codebook", {}),
            "opt_state": self.optimizer.init(params),
        }

    def init_state(self) -> State:
        with jax.set_mesh(self.mesh):
            return self._init()

    def abstract_state(self) -> State:
        """Shapes, dtypes and shardings of the state, without computing it."""
        shapes = jax.eval_shape(self._init_state)
        return jax.tree_util.tree_map(
            lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
            shapes, self.state_sharding,
        )

    def _step(self, state: State, batch: dict[str, jnp.ndarray]) -> tuple[State, dict]:
        dropout_key = jax.random.fold_in(self.dropout_key, state["step"])

        def loss_fn(params):
            (logits, aux), updates = self.model.apply(
                {"params": params, "codebook": state["codebook"]},
                batch["inputs"],
                train=True,
                mutable=["codebook"],
                rngs={"dropout": dropout_key},
            )
            ce = cross_entropy(logits, batch["targets"], batch["loss_mask"])
            return ce + aux["commit_loss"], (ce, aux, updates.get("codebook", {}))

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (ce, aux, codebook)), grads = grad_fn(state["params"])
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)

        metrics = {
            "loss": loss,
            "ce_loss": ce,
            "commit_loss": aux["commit_loss"],
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": self.schedule(state["step"]),
            "codebook_usage": aux["codebook_usage"],
            "codebook_perplexity": aux["codebook_perplexity"],
        }
        new_state = {
            "step": state["step"] + 1,
            "params": params,
            "codebook": codebook,
            "opt_state": opt_state,
        }
        return new_state, metrics

    def _score(self, params, codebook, batch) -> dict[str, jnp.ndarray]:
        logits, _ = self.model.apply(
            {"params": params, "codebook": codebook}, batch["inputs"], train=False
        )
        B, T, N = logits.shape
        assert batch["targets"].shape == (B, T), (batch["targets"].shape, logits.shape)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        mask = batch["loss_mask"]
        return {
            "nats": jnp.sum(jnp.where(mask, losses, 0.0)),
            "targets": jnp.sum(mask.astype(jnp.int32)),
        }

    def score_split(
        self,
        state: State,
        tokens: np.ndarray,
        *,
        max_batches: int | None = None,
        name: str = "the split",
        progress: bool = False,
        stop: list[int] | None = None,
    ) -> tuple[float, int]:
        """Return the summed cross-entropy in nats over a split's tokens, and their count.

        The sum is taken in float64 on the host, batch by batch, so it stays exact to
        float32 rounding per batch whatever the split's size. max_batches stops early, and
        so does a non-empty `stop` list (a signal received), leaving the sums partial.
        """
        c, t = self.config.model, self.config.train
        n_batches = eval_batch_count(
            len(tokens), batch_size=t.eval_batch_size, sequence_len=c.sequence_len
        )
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        batches = eval_batches(
            tokens, batch_size=t.eval_batch_size, sequence_len=c.sequence_len, name=name,
            rows=self.local_rows(t.eval_batch_size),
        )
        nats, targets = 0.0, 0
        bar = tqdm(total=n_batches, unit="batch", disable=not progress, desc=name)
        with bar:
            for batch in itertools.islice(batches, n_batches):
                # Every process stops at the same batch, or the others would wait for it.
                if stop is not None and any_process(bool(stop)):
                    break
                scored = self.score(state, batch)
                nats += float(scored["nats"])
                targets += int(scored["targets"])
                bar.update(1)
        return nats, targets

    def local_rows(self, batch_size: int) -> slice:
        """Return the rows of a [batch_size, T] batch that this process loads."""
        shape = (batch_size, self.config.model.sequence_len)
        return local_rows(self.data_sharding, shape)

    def put_batch(self, batch: dict[str, np.ndarray], batch_size: int) -> dict[str, jax.Array]:
        """Assemble the global batch from this process's rows (all rows with one process)."""
        shape = (batch_size, self.config.model.sequence_len)
        return {
            key: jax.make_array_from_process_local_data(self.data_sharding, value, shape)
            for key, value in batch.items()
        }

    def train_step(self, state: State, batch: dict[str, np.ndarray]) -> tuple[State, dict]:
        """Run one step on this process's rows of a global training batch."""
        batch = self.put_batch(batch, self.config.train.global_batch_size)
        with jax.set_mesh(self.mesh):
            return self._train_step(state, batch)

    def score(self, state: State, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Summed cross-entropy in nats over the batch's real targets, and their count.

        `batch` contains this process's rows of a global evaluation batch.
        """
        batch = self.put_batch(batch, self.config.train.eval_batch_size)
        with jax.set_mesh(self.mesh):
            return self._eval_step(state["params"], state["codebook"], batch)
