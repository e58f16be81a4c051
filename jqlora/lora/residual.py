"""PiSSA and LoftQ: adapters that take over part of the base weight, and the residual base.

Both start from the float weight ``W`` [out, in] (dequantized if it is stored in 4 bits)
and split it as ``W ~ base + s B A`` (``s`` the adapter's scale), so the adapted model
starts where the float model is, and the new ``base`` is what gets quantized:

* PiSSA (Meng et al. 2024), as PEFT's ``pissa_init``: ``W = U S V^T``; with the top ``r``
  triplets, ``A = sqrt(S_r / s) V_r^T``, ``B = U_r sqrt(S_r / s)``, ``base = W - s B A``
  (the minor components). ``"pissa_niter_N"`` takes the top triplets from a randomized SVD
  with ``N`` subspace iterations (Halko et al. 2009, alg. 5.1, as ``torch.svd_lowrank``).
  The residual is quantized afterwards, when a quantization is given.
* LoftQ (Li et al. 2023), as PEFT's ``loftq_init``: alternate ``Q = quant(W - B A)`` and
  ``B A = rank-r SVD of (W - deq(Q))``, ``loftq_iter`` times; ``base = Q``. PEFT leaves
  the scale out (its ``B A`` is the SVD product, right only when ``s = 1``); here the
  singular values are divided by ``s`` as in PiSSA, so that ``deq(Q) + s B A`` is the
  LoftQ approximation of ``W`` for any ``alpha`` (identical to PEFT when ``alpha = r``).

``quantization`` is a ``jqlora.QuantConfig`` or anything like it (see ``storage.py``).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jqlora.lora.config import LoraConfig
from jqlora.lora.dora import float_weight
from jqlora.lora.init import init_lora, layer_key, make_adapter, target_layers
from jqlora.lora.storage import covers, quantize_as, quantize_linear, settings_of
from jqlora.lora.targets import dotted, set_in
from jqlora.quant import QuantizedTensor, dequantize


def svd_lowrank(w: jax.Array, q: int, niter: int, key: jax.Array | None = None, *, omega=None):
    """Randomized rank-``q`` SVD ``w ~ U diag(S) V^T`` as ``torch.svd_lowrank(w, q, niter)``.

    ``omega`` is the Gaussian test matrix ``[min(m, n), q]`` (torch draws it with
    ``randn``); it is drawn from ``key`` when not given. Returns ``(U, S, V)``.
    """
    m, n = w.shape[-2:]
    a = w if m >= n else jnp.swapaxes(w, -1, -2)  # the algorithm assumes a tall matrix
    if omega is None:
        if key is None:
            raise ValueError("svd_lowrank: pass a key to draw the test matrix, or omega")
        omega = jax.random.normal(key, (*a.shape[:-2], a.shape[-1], q), a.dtype)
    qb = jnp.linalg.qr(a @ omega)[0]
    for _ in range(niter):
        qb = jnp.linalg.qr(jnp.swapaxes(a, -1, -2) @ qb)[0]
        qb = jnp.linalg.qr(a @ qb)[0]
    u, s, vh = jnp.linalg.svd(jnp.swapaxes(qb, -1, -2) @ a, full_matrices=False)
    u, v = qb @ u, jnp.swapaxes(vh, -1, -2)
    return (u, s, v) if m >= n else (v, s, u)


def top_singular(
    w: jax.Array, r: int, niter: int | None, key: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(U_r [out, r], S_r [r], V_r^T [r, in])``: exact SVD, or randomized with ``niter``."""
    if niter is None:
        u, s, vh = jnp.linalg.svd(w, full_matrices=False)
        return u[..., :r], s[..., :r], vh[..., :r, :]
    u, s, v = svd_lowrank(w, r, niter, key)
    return u, s, jnp.swapaxes(v, -1, -2)


def split_factors(
    u: jax.Array, s: jax.Array, vh: jax.Array, scale: float
) -> tuple[jax.Array, jax.Array]:
    """``(A, B)`` with ``scale * B @ A = U diag(S) V^T``, the root of ``S / scale`` on each side."""
    root = jnp.sqrt(s / scale)
    return root[..., :, None] * vh, u * root[..., None, :]


def pissa(w: jax.Array, r: int, scale: float, niter: int | None = None, key=None):
    """PiSSA of a float32 ``w``: ``(A, B, residual)`` with ``residual = w - scale * B @ A``."""
    a, b = split_factors(*top_singular(w, r, niter, key), scale)
    return a, b, w - scale * (b @ a)


def loftq(
    w: jax.Array,
    r: int,
    scale: float,
    quant,
    num_iter: int = 1,
    *,
    name: str = "weight",
    dtype=None,
):
    """LoftQ of a float32 ``w``: ``(A, B, Q)`` with ``deq(Q) + scale * B @ A ~ w``, ``Q`` quantized.

    ``dtype``: the dtype ``Q`` stands for (the model's; the residual is rounded to it first).
    """
    res = w
    for i in range(num_iter):
        qt = quantize_as(res.astype(dtype or w.dtype), quant, name)
        a, b = split_factors(*top_singular(w - dequantize(qt, jnp.float32), r, None, None), scale)
        if i + 1 < num_iter:
            res = w - scale * (b @ a)
    return a, b, qt


def init_lora_from_base(
    key: jax.Array, params: Mapping, config: LoraConfig, *, quantization=None, dtype=jnp.float32
) -> tuple[Mapping, dict]:
    """``(params, lora)`` for a PiSSA or LoftQ ``config``: adapters initialised from the base
    weights, and the base less what they took (the residual).

    Targeted layers get ``base = W - s B A`` (see module doc); with ``quantization`` every
    linear layer it covers is stored in 4 bits: the targeted ones as their residual (for
    LoftQ: the quantized weight its iterations chose), the others as they are. A
    targeted weight already in 4 bits is dequantized first and, without
    ``quantization``, its residual is re-quantized with the same settings. LoftQ needs
    the float weights and a ``quantization``. With DoRA the magnitude is that of the new
    ``base + s B A``. Other inits give ``(params, init_lora(...))`` with params unchanged
    except for the quantization.
    """
    if not config.changes_base:
        adapters = init_lora(key, params, config, dtype=dtype)
        return quantize_linear(params, quantization), adapters
    if config.init == "loftq" and quantization is None:
        raise ValueError(
            "LoftQ chooses the quantized base itself: pass quantization=QuantConfig(...) "
            "(e.g. QuantConfig(quant_type='nf4', double_quant=False) as PEFT's LoftQ uses)"
        )
    lora: dict = {}
    new_params = params
    targets = target_layers(params, config)
    for path, weight, r, spec in targets:
        name = dotted(path)
        w = float_weight(weight)
        quant = quantization if quantization is not None else settings_of(weight)
        if quant is not None and not covers(quant, name):
            quant = None
        if config.init == "loftq":
            if isinstance(weight, QuantizedTensor):
                raise ValueError(
                    f"LoftQ of {name!r}: the weight is already quantized; LoftQ needs the float weight "
                    "(load the model without quantization and pass quantization=... here)"
                )
            if quant is None:
                raise ValueError(
                    f"LoftQ of {name!r}: the quantization config leaves this module in float"
                )
            a, b, base = loftq(
                w, r, spec.scale, quant, config.loftq_iter, name=name, dtype=weight.dtype
            )
        else:
            a, b, res = pissa(w, r, spec.scale, config.pissa_niter, layer_key(key, path))
            res = res.astype(weight.dtype)
            base = quantize_as(res, quant, name) if quant is not None else res
        adapter = make_adapter(a.astype(dtype), b.astype(dtype), spec, base, config.use_dora)
        lora = set_in(lora, path, adapter)
        new_params = set_in(new_params, path + ("weight",), base)
    return quantize_linear(new_params, quantization, skip=[p for p, *_ in targets]), lora
