"""Text generation with a preallocated KV cache and a jitted decode loop.

One call runs, inside one ``jax.jit``:

1. prefill: the (left-padded) prompt through the model once, writing its keys/values into
   a cache of ``max_len`` slots; padding slots stay invalid, and the positions the model
   sees are ``cumsum(attention_mask) - 1``, as transformers computes ``position_ids``;
2. decode: a ``lax.while_loop`` that picks a token from the last logits, writes it, and
   runs the model on that one token at position ``n_real_tokens + step``, until every row
   has produced ``eos_token_id`` or ``max_new_tokens`` tokens.

Prompt length and cache size are rounded up to shape buckets (powers of two), so prompts
of different lengths reuse one compiled program; ``max_new_tokens`` is a traced loop
bound. Token choice: greedy (``temperature == 0``) is ``argmax``; otherwise the logits are
divided by the temperature, cut to the ``top_k`` largest, then to the smallest set whose
probability reaches ``top_p`` (transformers' order of warpers), and sampled.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jqlora.lora.multi import apply_per_row_adapters

__all__ = ["SamplingConfig", "generate", "stream_generate"]


class SamplingConfig(NamedTuple):
    """How the next token is chosen. Traced values, so changing them never recompiles.

    temperature: 0 for greedy; top_k: 0 for no cut; top_p: 1.0 for no cut.
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array

    @classmethod
    def of(
        cls, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None
    ) -> SamplingConfig:
        return cls(
            jnp.float32(temperature),
            jnp.int32(top_k or 0),
            jnp.float32(1.0 if top_p is None else top_p),
        )


def bucket(n: int, minimum: int = 16) -> int:
    """The shape bucket of a length: the next power of two, at least ``minimum``."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def filter_logits(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """``logits / temperature`` with every token outside the top-k and the top-p set at -inf.

    A token survives top-k when its logit is at least the k-th largest, and top-p when
    the probability mass of the tokens strictly above it is < ``top_p`` (so the first
    always survives); transformers' ``TopKLogitsWarper`` / ``TopPLogitsWarper`` rules,
    applied in that order after the temperature.
    """
    vocab = logits.shape[-1]
    logits = logits.astype(jnp.float32) / sampling.temperature
    descending = -jnp.sort(-logits, axis=-1)
    k = jnp.where(sampling.top_k > 0, jnp.minimum(sampling.top_k, vocab), vocab)
    in_top_k = jnp.arange(vocab) < k
    descending = jnp.where(in_top_k, descending, -jnp.inf)
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_kept = jnp.sum(in_top_k & (mass_before < sampling.top_p), axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(descending, jnp.maximum(n_kept, 1) - 1, axis=-1)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def sample_logits(logits: jax.Array, sampling: SamplingConfig, key: jax.Array) -> jax.Array:
    """The next token ``[b]`` from ``logits [b, vocab]``: argmax when ``temperature == 0``,
    else a draw from ``softmax(filter_logits(logits))``."""
    return jax.lax.cond(
        sampling.temperature > 0,
        lambda: jax.random.categorical(key, filter_logits(logits, sampling), axis=-1).astype(
            jnp.int32
        ),
        lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32),
    )


def _forward(model, params, lora, adapter_ids, ids, mask, positions, cache):
    """``(logits, cache)`` of the model on ``ids``; rows pick their adapter when ``adapter_ids`` is set."""

    def run(lora_tree, ids, mask, positions, cache):
        variables = (
            {"params": params} if lora_tree is None else {"params": params, "lora": lora_tree}
        )
        return model.apply(variables, ids, attention_mask=mask, positions=positions, cache=cache)

    if adapter_ids is None:
        return run(lora, ids, mask, positions, cache)
    return apply_per_row_adapters(run, lora, adapter_ids, ids, mask, positions, cache)


class _State(NamedTuple):
    step: jax.Array  # tokens produced so far
    logits: jax.Array  # [b, vocab] logits for the next token
    cache: object
    position: jax.Array  # [b] position of the next token
    tokens: jax.Array  # [b, n_max] produced tokens (pad after eos)
    done: jax.Array  # [b] row has produced eos
    key: jax.Array


def _prefill(model, params, lora, adapter_ids, input_ids, mask, max_len, key):
    b, _ = input_ids.shape
    cache = model.init_cache(b, max_len)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
    logits, cache = _forward(model, params, lora, adapter_ids, input_ids, mask, positions, cache)
    n_max = max_len - input_ids.shape[1]
    return _State(
        step=jnp.zeros((), jnp.int32),
        logits=logits[:, -1].astype(jnp.float32),
        cache=cache,
        position=jnp.sum(mask, axis=-1).astype(jnp.int32),
        tokens=jnp.zeros((b, n_max), jnp.int32),
        done=jnp.zeros((b,), bool),
        key=key,
    )


def _decode_step(
    model, params, lora, adapter_ids, state: _State, sampling, eos_ids, pad_id
) -> _State:
    """Chooses and records one token per row, then runs the model on it."""
    key, sub = jax.random.split(state.key)
    token = sample_logits(state.logits, sampling, sub)
    token = jnp.where(state.done, pad_id, token)
    done = state.done | jnp.isin(token, eos_ids)
    tokens = jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.step))
    ones = jnp.ones((token.shape[0], 1), jnp.int32)
    logits, cache = _forward(
        model, params, lora, adapter_ids, token[:, None], ones, state.position[:, None], state.cache
    )
    return _State(
        state.step + 1,
        logits[:, -1].astype(jnp.float32),
        cache,
        state.position + 1,
        tokens,
        done,
        key,
    )


@functools.partial(jax.jit, static_argnames=("model", "max_len"))
def _generate_jit(
    model,
    params,
    lora,
    adapter_ids,
    input_ids,
    mask,
    max_new,
    key,
    eos_ids,
    pad_id,
    sampling,
    *,
    max_len,
):
    state = _prefill(model, params, lora, adapter_ids, input_ids, mask, max_len, key)

    def cond(s: _State):
        return (s.step < max_new) & ~jnp.all(s.done)

    def body(s: _State):
        return _decode_step(model, params, lora, adapter_ids, s, sampling, eos_ids, pad_id)

    state = jax.lax.while_loop(cond, body, state)
    return state.tokens, state.step


_prefill_jit = jax.jit(_prefill, static_argnames=("model", "max_len"))
_decode_step_jit = jax.jit(_decode_step, static_argnames=("model",))


def _prepare(
    input_ids,
    attention_mask,
    max_new_tokens,
    eos_token_id,
    pad_token_id,
    key,
    temperature,
    top_k,
    top_p,
):
    """Checks the arguments and left-pads the prompt to its shape bucket."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"generate: input_ids must be integer [batch, seq] with seq >= 1, got {ids.dtype} {ids.shape}"
        )
    mask = (
        np.ones_like(ids)
        if attention_mask is None
        else np.asarray(attention_mask).reshape(ids.shape)
    )
    if np.any(mask.sum(axis=-1) == 0):
        raise ValueError("generate: a row of attention_mask has no real token")
    if np.any(np.diff(mask.astype(np.int32), axis=-1) < 0):
        raise ValueError(
            "generate: attention_mask must be left padding (0s before the 1s of each row)"
        )
    if int(max_new_tokens) < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if (
        temperature < 0
        or (top_k is not None and top_k < 1)
        or (top_p is not None and not 0 < top_p <= 1)
    ):
        raise ValueError(
            f"generate: need temperature >= 0, top_k >= 1, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}"
        )
    if temperature > 0 and key is None:
        raise ValueError("generate: sampling (temperature > 0) needs a PRNG key")
    eos = (
        []
        if eos_token_id is None
        else [eos_token_id]
        if np.isscalar(eos_token_id)
        else list(eos_token_id)
    )
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    width = bucket(ids.shape[1])
    pad_cols = width - ids.shape[1]
    ids = np.pad(ids, ((0, 0), (pad_cols, 0)), constant_values=pad)
    mask = np.pad(mask, ((0, 0), (pad_cols, 0)))
    max_len = bucket(width + int(max_new_tokens))
    eos_arr = jnp.asarray(eos or [-1], jnp.int32)
    key = jax.random.PRNGKey(0) if key is None else key
    sampling = SamplingConfig.of(temperature, top_k, top_p)
    return (
        jnp.asarray(ids, jnp.int32),
        jnp.asarray(mask, jnp.int32),
        max_len,
        eos_arr,
        jnp.int32(pad),
        key,
        sampling,
    )


def generate(
    model,
    params: Mapping,
    input_ids,
    *,
    lora: Mapping | None = None,
    adapter_ids=None,
    attention_mask=None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    key: jax.Array | None = None,
) -> np.ndarray:
    """Continues ``input_ids [batch, seq]`` by up to ``max_new_tokens`` tokens.

    Returns ``[batch, seq + n]`` like transformers' ``generate``: the prompt followed by the
    new tokens, where ``n <= max_new_tokens`` stops early once every row has produced an
    ``eos_token_id`` and tokens after a row's eos are ``pad_token_id`` (default: the eos).
    ``attention_mask`` marks real tokens for left-padded batches. ``lora`` is an adapter
    tree; with ``adapter_ids [batch]`` it is a stack from ``jqlora.lora.multi.stack_adapters``
    and row ``i`` uses adapter ``adapter_ids[i]``. ``key`` drives sampling
    (``temperature > 0``).
    """
    prompt = np.asarray(input_ids)
    prompt = prompt[None] if prompt.ndim == 1 else prompt
    ids, mask, max_len, eos, pad, key, sampling = _prepare(
        prompt,
        attention_mask,
        max_new_tokens,
        eos_token_id,
        pad_token_id,
        key,
        temperature,
        top_k,
        top_p,
    )
    ids_adapter = None if adapter_ids is None else jnp.asarray(adapter_ids, jnp.int32)
    tokens, n = _generate_jit(
        model, params, lora, ids_adapter, ids, mask, jnp.int32(max_new_tokens), key, eos, pad, sampling,
        max_len=max_len,
    )  # fmt: skip
    return np.concatenate([prompt, np.asarray(tokens)[:, : int(n)]], axis=1)


def stream_generate(
    model,
    params: Mapping,
    input_ids,
    *,
    lora: Mapping | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    key: jax.Array | None = None,
) -> Iterator[int]:
    """Yields the new tokens of one prompt ``[seq]`` as they are produced (for chat).

    The same prefill and decode step as ``generate``, each jitted once per shape bucket,
    with the loop in Python so every token reaches the caller at once; stops after an
    eos (which is not yielded) or ``max_new_tokens`` tokens.
    """
    ids, mask, max_len, eos, pad, key, sampling = _prepare(
        input_ids, None, max_new_tokens, eos_token_id, None, key, temperature, top_k, top_p
    )
    state = _prefill_jit(model, params, lora, None, ids, mask, max_len, key)
    eos_set = set(np.asarray(eos).tolist())
    for step in range(int(max_new_tokens)):
        state = _decode_step_jit(model, params, lora, None, state, sampling, eos, pad)
        token = int(state.tokens[0, step])
        if token in eos_set:
            return
        yield token
