"""The QLoRA train step: next-token loss, gradients of the ``lora`` tree only, optax update.

The pieces, smallest first::

    loss, aux = next_token_loss(logits, batch)               # masked mean cross-entropy
    loss, aux = loss_fn(lora, params, batch, model=model)    # forward + loss
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(lora, params, batch, model=model)
    optimizer = make_optimizer(learning_rate=2e-4)           # clip + AdamW (any optax works)
    state = init_train_state(lora, optimizer)                # TrainState(step, lora, opt_state)
    step = make_train_step(model, optimizer, remat="nothing_saveable")
    state, metrics = step(state, params, batch)              # jitted, ``state`` donated

A training loop is::

    state = init_train_state(lora, optimizer)
    step = make_train_step(model, optimizer)
    for i, batch in enumerate(batches):
        state, metrics = step(state, params, batch, rng=jax.random.fold_in(key, i))

**Batch.** A dict of ``[batch, seq]`` integer arrays:

* ``input_ids``: token ids;
* ``attention_mask``: 1 for real tokens, 0 for padding (optional: all ones);
* ``loss_mask``: 1 where the token is a *target* to predict, 0 for prompt tokens and
  padding (optional: every real token after the first). Position ``t`` is predicted from
  positions ``< t``, so ``loss_mask[:, 0]`` is never used.

  Instead of ``loss_mask`` a batch may carry Hugging Face style ``labels`` (``-100`` =
  ignored, otherwise equal to ``input_ids``); ``loss_mask = labels != -100``.

**Why only the adapters get gradients.** ``value_and_grad`` differentiates argument 0,
the ``lora`` tree; ``params`` enter as non-differentiated inputs, so XLA never builds a
cotangent for a base weight, and optax's state is sized by the adapters alone.

**Model contract.** ``model`` is a flax linen module called as
``model.apply({"params": params, "lora": lora}, input_ids, attention_mask=mask,
rngs={"dropout": rng})`` and returning logits ``[batch, seq, vocab]``. These optional
module fields are set through ``Module.clone`` when the model declares them:

* ``dtype``: the compute dtype (activations and matmuls);
* ``remat``: ``None`` (keep all activations) or the name of a ``jax.checkpoint_policies``
  policy (``"nothing_saveable"``: recompute each decoder layer in the backward pass;
  ``"dots_with_no_batch_dims_saveable"``: keep the matmul outputs). The model wraps its
  decoder-layer class in ``nn.remat(..., policy=getattr(jax.checkpoint_policies, remat))``;
* ``scan_layers``: run the decoder layers as one loop (one compiled layer body) instead of
  unrolled. jqlora's models take the same per-layer params tree either way and stack it
  inside the step (``jqlora.models.layer_list.LayerList``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jqlora.lora.check import check_lora
from jqlora.quant import QuantizedTensor
from jqlora.train.head_loss import fused_next_token_loss

IGNORE_INDEX = -100


class TrainState(NamedTuple):
    """What changes from step to step. ``params`` (the frozen base) is passed separately."""

    step: jax.Array  # int32 scalar: number of updates applied
    lora: Any  # the adapter tree (float32 master weights)
    opt_state: optax.OptState


def default_compute_dtype() -> jnp.dtype:
    """QLoRA's bfloat16 where bfloat16 matmuls are fast, else float32.

    bfloat16 on GPU and TPU, and on CPUs with AMX tiles for bfloat16 (``amx_bf16`` in
    ``/proc/cpuinfo``: Intel Xeon since Sapphire Rapids), where XLA's bfloat16 matmul runs
    about 5x its float32 rate. Other CPUs emulate bfloat16 matmuls slowly: float32 there.
    The environment variable ``JQLORA_COMPUTE_DTYPE`` (``float32`` or ``bfloat16``)
    overrides the choice.
    """
    override = os.environ.get("JQLORA_COMPUTE_DTYPE")
    if override:
        if override not in ("float32", "bfloat16"):
            raise ValueError(f"JQLORA_COMPUTE_DTYPE={override!r}: expected float32 or bfloat16")
        return jnp.dtype(override)
    if jax.default_backend() != "cpu":
        return jnp.dtype(jnp.bfloat16)
    return jnp.dtype(jnp.bfloat16 if cpu_has_amx_bf16() else jnp.float32)


@functools.cache
def cpu_has_amx_bf16() -> bool:
    """Whether this (Linux) CPU reports AMX bfloat16 tiles."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:
        return False


def target_mask(batch: dict) -> jax.Array:
    """``[batch, seq - 1]`` float32 weights of the targets ``input_ids[:, 1:]``.

    A target counts when it is a real token (``attention_mask``) and is marked for the loss
    (``loss_mask``, or ``labels != -100``).
    """
    ids = batch["input_ids"]
    if "loss_mask" in batch and "labels" in batch:
        raise ValueError("batch: give either 'loss_mask' or 'labels', not both")
    mask = jnp.ones(ids.shape, jnp.bool_)
    if "attention_mask" in batch:
        mask &= batch["attention_mask"].astype(jnp.bool_)
    if "loss_mask" in batch:
        mask &= batch["loss_mask"].astype(jnp.bool_)
    elif "labels" in batch:
        mask &= batch["labels"] != IGNORE_INDEX
    return mask[:, 1:].astype(jnp.float32)


def next_token_loss(logits: jax.Array, batch: dict) -> tuple[jax.Array, dict]:
    """Mean next-token cross-entropy over the counted targets, computed in float32.

    ``loss = sum_{b,t} w[b,t] * (logsumexp(z[b,t]) - z[b,t,y[b,t+1]]) / max(1, sum w)``
    with ``z = logits`` and ``w = target_mask(batch)``. Equals
    ``torch.nn.functional.cross_entropy(z[:, :-1], labels[:, 1:], ignore_index=-100)``.
    Returns ``(loss, {"tokens": sum w})``.
    """
    ids = batch["input_ids"]
    if logits.shape[:2] != ids.shape:
        raise ValueError(f"logits shape {logits.shape} does not match input_ids shape {ids.shape}")
    z = logits.astype(jnp.float32)
    targets, w = _shifted_targets(batch)
    target_logit = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    nll = jnp.where(w > 0, jax.nn.logsumexp(z, axis=-1) - target_logit, 0.0)
    tokens = jnp.sum(w)
    return jnp.sum(nll * w) / jnp.maximum(tokens, 1.0), {"tokens": tokens}


def _shifted_targets(batch: dict) -> tuple[jax.Array, jax.Array]:
    """``(targets, weights)``, both ``[batch, seq]``: position ``t`` is scored against token
    ``t + 1`` with weight ``target_mask``; the last position against a dummy 0 with weight 0.

    Every position is scored rather than slicing off the last one: the slice would copy the
    whole ``[batch, seq, vocab]`` logits, forward and backward.
    """
    ids = batch["input_ids"]
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
    weights = jnp.pad(target_mask(batch), ((0, 0), (0, 1)))
    return targets.astype(jnp.int32), weights


def _cast_base(params, dtype):
    """Float leaves of the base in the compute dtype; quantized and integer leaves unchanged."""

    def cast(x):
        if isinstance(x, QuantizedTensor) or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return x.astype(dtype)

    return jax.tree.map(cast, params, is_leaf=lambda x: isinstance(x, QuantizedTensor))


def loss_fn(
    lora, params, batch: dict, *, model, compute_dtype=None, rng=None
) -> tuple[jax.Array, dict]:
    """Forward pass of ``model`` with adapters ``lora`` and the next-token loss.

    Differentiate with respect to ``lora`` (argument 0) only. ``compute_dtype`` casts the
    float leaves of the base (embeddings, norms, unquantized weights); the adapters stay
    float32 and are cast where they meet the activations, so their gradients are float32.
    ``rng`` turns LoRA dropout on.

    A model that names its output head (``head_weight_path``, see
    ``models.head.CausalLM``) whose head is a plain frozen weight returns its hidden
    states and the head runs inside the loss (``head_loss.fused_next_token_loss``), a chunk
    of tokens at a time; otherwise the loss reads the model's full logits.
    """
    if compute_dtype is not None:
        params = _cast_base(params, compute_dtype)
    variables = {"params": params, "lora": lora}
    rngs = {"dropout": rng} if rng is not None else {}
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    head = _plain_head_weight(model, params, lora)
    if head is None:
        logits = model.apply(variables, ids, attention_mask=mask, rngs=rngs)
        return next_token_loss(logits, batch)
    hidden = model.apply(variables, ids, attention_mask=mask, rngs=rngs, hidden_only=True)
    targets, weights = _shifted_targets(batch)
    tokens = jnp.sum(weights)
    return fused_next_token_loss(hidden, head, targets, weights), {"tokens": tokens}


def _plain_head_weight(model, params, lora) -> jax.Array | None:
    """The model's output-head weight when the fused head loss can apply it: the model says
    where it lies (``head_weight_path``), it is a plain array (not quantized) and it carries
    no adapter. None otherwise: the loss then goes through the model's full logits."""
    path_of = getattr(model, "head_weight_path", None)
    if path_of is None:
        return None
    path = path_of()
    if path is None:  # a head that is more than a matmul (soft-capped logits)
        return None
    weight, adapter = params, lora
    for key in path:
        weight = weight.get(key) if isinstance(weight, Mapping) else None
    for key in path[:-1]:  # adapters sit at the module's path, beside its "weight"
        adapter = adapter.get(key) if isinstance(adapter, Mapping) else None
    if isinstance(weight, QuantizedTensor) or weight is None or adapter is not None:
        return None
    return weight


def make_optimizer(
    learning_rate: float | optax.Schedule = 2e-4,
    *,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 0.3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """Gradient clipping to ``max_grad_norm`` (global L2 norm; QLoRA uses 0.3) then AdamW.

    Any optax ``GradientTransformation`` may be used instead; wrap it in
    ``jqlora.offload`` to keep its state in host memory, or in ``optax.MultiSteps`` to
    accumulate gradients over several batches.
    """
    adamw = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if max_grad_norm is None:
        return adamw
    if max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}")
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)


def init_train_state(lora, optimizer: optax.GradientTransformation) -> TrainState:
    """Step 0: the adapters and a fresh optimizer state for them."""
    return TrainState(step=jnp.zeros((), jnp.int32), lora=lora, opt_state=optimizer.init(lora))


def configure_model(
    model, *, compute_dtype=None, remat: str | None = None, scan_layers: bool | None = None
):
    """``model`` with the train-time fields it declares set (see the module doc).

    Asking for ``remat`` or ``scan_layers`` on a model without that field is an error,
    since silently ignoring it would change the memory a run needs.
    """
    fields = {}
    if compute_dtype is not None and hasattr(model, "dtype"):
        fields["dtype"] = jnp.dtype(compute_dtype)
    for name, value in (("remat", remat), ("scan_layers", scan_layers)):
        if value is None:
            continue
        if not hasattr(model, name):
            if not value:  # asking for the default of a model without the option
                continue
            raise ValueError(
                f"{type(model).__name__} has no '{name}' field; cannot set {name}={value!r}"
            )
        fields[name] = value
    if (
        remat is not None
        and remat is not False
        and not hasattr(jax.checkpoint_policies, str(remat))
    ):
        names = sorted(n for n in dir(jax.checkpoint_policies) if not n.startswith("_"))
        raise ValueError(f"unknown remat policy {remat!r}; expected one of {names}")
    return model.clone(**fields) if fields else model


def all_finite(tree) -> jax.Array:
    """A boolean scalar: every floating-point leaf of ``tree`` is free of NaN and inf.

    ``x * 0`` is 0 where ``x`` is finite and NaN where it is inf or NaN, and a sum holding a
    NaN is NaN: so the check is ``isfinite(sum_i sum(x_i * 0))``, exact (zeros cannot
    overflow). Leaves of one shape and dtype are added elementwise first, one fused loop,
    then reduced once (leaves in host memory, ``jqlora.offload``, form their own groups: an
    operation's inputs must share a memory space). Why not one reduction per leaf: an
    adapter tree with its Adam state has ~1300 leaves (SmolLM2), and as many reductions
    took XLA's CPU compiler 11-22 s; grouped by shape, ~3 s, with the same run time.
    """
    groups: dict[tuple, list[jax.Array]] = {}
    for x in jax.tree.leaves(tree):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            key = (x.shape, jnp.dtype(x.dtype), jax.typeof(x).memory_space)
            groups.setdefault(key, []).append(x)
    total = jnp.zeros((), jnp.float32)
    for xs in groups.values():
        nan_or_zero = functools.reduce(jnp.add, [x * 0 for x in xs])
        total = total + jnp.sum(nan_or_zero).real.astype(jnp.float32)
    return jnp.isfinite(total)


def select_tree(pick_first: jax.Array, first, second):
    """``first`` where the boolean scalar ``pick_first`` holds, else ``second``, leaf by leaf.

    Each chosen leaf stays in the memory space of ``first``'s leaf, so optimizer state kept
    in host memory (``jqlora.offload``) stays there.
    """

    def pick(a, b):
        out = jnp.where(pick_first, a, b)
        space = jax.typeof(a).memory_space
        return out if space == jax.memory.Space.Device else jax.device_put(out, space)

    return jax.tree.map(pick, first, second)


def make_train_step(
    model,
    optimizer: optax.GradientTransformation,
    *,
    compute_dtype=None,
    remat: str | None = None,
    scan_layers: bool | None = None,
    donate: bool = True,
    jit: bool = True,
    skip_nonfinite: bool = False,
) -> Callable:
    """A jitted ``step(state, params, batch, rng=None) -> (state, metrics)``.

    One step: ``(loss, aux), g = value_and_grad(loss_fn)(state.lora, params, batch)``;
    ``u, opt_state = optimizer.update(g, state.opt_state, state.lora)``;
    ``lora = optax.apply_updates(state.lora, u)``. ``metrics`` holds ``loss`` (before the
    update), ``grad_norm`` (global L2 norm before clipping) and ``tokens`` (targets
    counted). ``state`` is donated (its buffers are reused for the new state: do not use
    the old one afterwards); ``params`` and ``batch`` are not. ``compute_dtype`` defaults
    to ``default_compute_dtype()``; ``remat`` / ``scan_layers`` are passed to the model.

    ``skip_nonfinite=True`` guards the state against NaN and inf: when the loss, the
    gradients or the new adapters / optimizer state are not all finite, the step returns
    ``state`` unchanged (the update is discarded) and ``metrics["skipped"]`` is true. The
    step then also takes ``skip`` (a boolean scalar array): true discards the update
    whatever it holds, which lets a caller that accumulates gradients over several calls
    drop the rest of an accumulated update once one part of it was non-finite (pass the
    previous call's ``metrics["skipped"]``). Where everything is finite the result is
    bit-identical to the unguarded step. The guard is a second small jitted program (no
    host synchronisation): it reads the old and new state once, and the old state stays
    alive until the update has run. The guarded step is a plain function calling both.
    """
    compute_dtype = jnp.dtype(compute_dtype or default_compute_dtype())
    model = configure_model(
        model, compute_dtype=compute_dtype, remat=remat, scan_layers=scan_layers
    )
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, params, batch: dict, rng=None):
        # Shapes are static: this runs once per compilation, so a mismatched adapter fails
        # here with the module's name rather than deep inside a matmul.
        check_lora(params, state.lora)
        (loss, aux), grads = grad_fn(
            state.lora, params, batch, model=model, compute_dtype=compute_dtype, rng=rng
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.lora)
        lora = optax.apply_updates(state.lora, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "tokens": aux["tokens"]}
        return TrainState(state.step + 1, lora, opt_state), metrics

    if not skip_nonfinite:
        return jax.jit(step, donate_argnums=(0,) if donate else ()) if jit else step
    # The update runs as its own program, the very one compiled without the guard: inside
    # one program the guard would change how XLA fuses the update's arithmetic (and where it
    # contracts it into FMAs), hence its last bits. The old state is kept for the guard.
    update = jax.jit(step) if jit else step
    guard = jax.jit(_keep_finite, donate_argnums=(1,) if donate else ()) if jit else _keep_finite

    def guarded_step(state: TrainState, params, batch: dict, rng=None, skip=None):
        new_state, metrics = update(state, params, batch, rng)
        skip = jnp.zeros((), jnp.bool_) if skip is None else skip
        state, skipped = guard(state, new_state, metrics["loss"], metrics["grad_norm"], skip)
        return state, {**metrics, "skipped": skipped}

    return guarded_step


def _keep_finite(state: TrainState, new_state: TrainState, loss, grad_norm, skip):
    """``(new_state, False)`` when the step's numbers are all finite and ``skip`` is false,
    else ``(state, True)``."""
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(new_state[1:])
    keep_old = ~finite | skip
    return select_tree(keep_old, state, new_state), keep_old
