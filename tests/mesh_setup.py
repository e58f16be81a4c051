"""The tiny QLoRA run that the sharded and multi-process tests repeat on different meshes.

A one-layer Llama with NF4 double-quantized linear weights (blocksize 64; in = 128 or 256,
so they split on whole blocks over 2 or 4 devices), rank-4 adapters on every linear layer
with a non-zero ``b`` (a zero ``b`` would leave ``a`` without gradient), AdamW, and a fixed
batch of 8 sequences. ``build()`` makes it; ``save``/``load`` hand it to a subprocess as
host arrays so every process starts from identical bytes.
"""

from __future__ import annotations

import pickle

import jax
import jax.numpy as jnp
import numpy as np

CONFIG = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
}
BATCH, SEQ, STEPS, LR = 8, 8, 3, 1e-3


def model():
    from jqlora.models import model_for_config

    return model_for_config(CONFIG, jnp.float32)


def optimizer():
    from jqlora.train.step import make_optimizer

    return make_optimizer(LR)


def build() -> dict:
    """``{"params", "lora", "batch"}`` as host (numpy) trees."""
    from jqlora.lora import LoraConfig, init_lora
    from jqlora.quant import quantize

    m = model()
    params = jax.jit(m.init)(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]

    def quantize_linear(path, x):
        names = [getattr(k, "key", None) for k in path]
        if names[-1] == "weight" and x.ndim == 2 and "layers" in names:
            return quantize(x, "nf4", 64, double_quant=True, name=".".join(names))
        return x

    params = jax.tree_util.tree_map_with_path(quantize_linear, params)
    lora = init_lora(jax.random.PRNGKey(1), params, LoraConfig(r=4, alpha=8))
    lora = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            x + 0.02 * jax.random.normal(jax.random.PRNGKey(2), x.shape) if p[-1].key == "b" else x
        ),
        lora,
    )
    ids = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], (BATCH, SEQ)).astype(np.int32)
    return jax.tree.map(np.asarray, {"params": params, "lora": lora, "batch": {"input_ids": ids}})


def save(setup: dict, path) -> None:
    with open(path, "wb") as f:
        pickle.dump(setup, f)


def load(path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f)


def train(
    setup: dict,
    mesh=None,
    steps: int = STEPS,
    batch=None,
    whole_state: bool = False,
    offload: bool = False,
    start=None,
):
    """``(losses, state)`` after ``steps`` steps; on ``mesh`` when given (via ``jqlora.sharding.shard``,
    or ``jqlora.sharding.shard_train_state`` with ``whole_state``).

    ``batch`` overrides the setup's batch (a process's rows in a multi-process run);
    ``offload`` keeps the optimizer state in host memory (``jqlora.offload``);
    ``start`` is a train state to continue from (placed as this function places its own).
    """
    from jqlora.sharding import shard, shard_batch, shard_train_state
    from jqlora.train.offload import offload as offloaded
    from jqlora.train.step import init_train_state, make_train_step

    opt = offloaded(optimizer()) if offload else optimizer()
    lora = jax.tree.map(jnp.asarray, setup["lora"])
    state = init_train_state(lora, opt)
    params, batch = setup["params"], setup["batch"] if batch is None else batch
    if mesh is None:
        params = jax.tree.map(jnp.asarray, params)
    elif whole_state:
        state, params = shard_train_state(state, params, mesh)
        batch = shard_batch(batch, mesh)
    else:
        params, lora, opt_state = shard(params, state.lora, state.opt_state, mesh)
        state = state._replace(lora=lora, opt_state=opt_state)
        batch = shard_batch(batch, mesh)
    state = state if start is None else start
    step = make_train_step(model(), opt, compute_dtype=jnp.float32)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, params, batch)
        losses.append(float(metrics["loss"]))
    return losses, state, params


def rel_diff(a, b) -> float:
    """``||a - b|| / ||b||`` over all leaves of two trees."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    num = sum(
        float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
        for x, y in zip(la, lb, strict=True)
    )
    den = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in lb)
    return (num / den) ** 0.5
