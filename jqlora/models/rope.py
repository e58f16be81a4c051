"""RoPE inverse frequencies for the ``rope_scaling`` variants, as transformers computes them.

Every variant starts from ``inv_freq_i = base^(-2i/d)``, ``i < d/2``:

* ``default``: as is.
* ``linear``: ``inv_freq / factor`` (positions interpolated by ``factor``).
* ``dynamic`` (NTK): ``base' = base * (factor * L / max_pos - (factor - 1))^(d / (d - 2))``
  with ``L = max(max position seen + 1, max_pos)``; it depends on the input, so it is
  computed inside the forward pass.
* ``llama3``: long wavelengths (``> orig / low_freq_factor``) divided by ``factor``, short
  ones (``< orig / high_freq_factor``) kept, a linear blend in between.
* ``longrope`` (Phi-3): ``inv_freq / ext`` with ``ext`` the config's ``long_factor`` when
  the longest sequence seen (``max position + 1``) passes ``original_max_position_embeddings``,
  else its ``short_factor`` (so chosen inside the forward pass); cos and sin scaled by
  ``attention_factor`` (default ``sqrt(1 + ln(f) / ln(orig))``, ``f = max_pos / orig``).
* ``yarn``: blend of extrapolated (``inv_freq``) and interpolated (``inv_freq / factor``)
  frequencies with a linear ramp over the correction range given by ``beta_fast``,
  ``beta_slow``; cos and sin are scaled by ``attention_factor`` (default
  ``0.1 ln(factor) + 1``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


def rope_parameters(hf_config: dict, params: dict | None = None, theta: float = 10000.0) -> dict:
    """The RoPE settings of a config.json, in transformers 5's ``rope_parameters`` form.

    Accepts both the new form (``rope_parameters`` with ``rope_theta`` inside) and the old one
    (``rope_theta`` at top level, ``rope_scaling`` with ``type`` or ``rope_type``). ``params``:
    one layer type's dict of a per-layer-type config instead (Gemma 3); ``theta``: the base
    when the config names none.
    """
    if params is None:
        params = hf_config.get("rope_parameters") or hf_config.get("rope_scaling")
    params = dict(params or {})
    params.setdefault("rope_theta", hf_config.get("rope_theta") or theta)
    params["rope_type"] = params.get("rope_type", params.pop("type", "default"))
    if params["rope_type"] not in ROPE_TYPES:
        raise ValueError(
            f"config.json: unsupported rope type {params['rope_type']!r}; supported: {ROPE_TYPES}"
        )
    return params


def _base_inv_freq(base: float, dim: int) -> np.ndarray:
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (1.0 / (np.float32(base) ** exponent)).astype(np.float32)


def static_inv_freq(
    params: dict, head_dim: int, max_position_embeddings: int
) -> tuple[np.ndarray, float]:
    """``(inv_freq [head_dim/2] float32, attention_scale)`` for every type but ``dynamic``."""
    kind, base, dim = params["rope_type"], float(params["rope_theta"]), head_dim
    inv_freq = _base_inv_freq(base, dim)
    if kind in ("default", "dynamic"):
        return inv_freq, 1.0
    if kind == "linear":
        return (inv_freq / np.float32(params["factor"])).astype(np.float32), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, params), 1.0
    if kind == "yarn":
        return _yarn(params, dim, base, max_position_embeddings)
    raise ValueError(f"unsupported rope type {kind!r}")


def _llama3(inv_freq: np.ndarray, p: dict) -> np.ndarray:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(p: dict, dim: int, base: float, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_position_embeddings / original

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(
        np.float32
    )
    extrapolation_weight = 1 - ramp
    pos_freqs = (
        np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    ).astype(np.float32)
    inv_extra = 1.0 / pos_freqs
    inv_inter = 1.0 / (np.float32(factor) * pos_freqs)
    inv_freq = inv_inter * (1 - extrapolation_weight) + inv_extra * extrapolation_weight
    return inv_freq.astype(np.float32), float(attention_factor)


def dynamic_inv_freq(
    params: dict, head_dim: int, max_position_embeddings: int, positions
) -> jnp.ndarray:
    """Dynamic-NTK ``inv_freq`` for the longest sequence in ``positions`` (traced)."""
    dim, factor = head_dim, params["factor"]
    seq_len = jnp.maximum(jnp.max(positions) + 1, max_position_embeddings).astype(jnp.float32)
    base = params["rope_theta"] * (factor * seq_len / max_position_embeddings - (factor - 1)) ** (
        dim / (dim - 2)
    )
    exponent = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    return 1.0 / (base**exponent)


def longrope_inv_freq(
    params: dict, dim: int, max_position_embeddings: int, positions
) -> tuple[jnp.ndarray, float]:
    """LongRoPE ``(inv_freq, attention_scale)`` for the longest sequence in ``positions``."""
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_position_embeddings / original
    scale = params.get("attention_factor")
    if scale is None:
        scale = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    base = _base_inv_freq(float(params["rope_theta"]), dim)
    short = base / np.asarray(params["short_factor"], np.float32)
    long = base / np.asarray(params["long_factor"], np.float32)
    use_long = jnp.max(positions) + 1 > original
    return jnp.where(use_long, jnp.asarray(long), jnp.asarray(short)), float(scale)


def rope_for(
    params: dict, dim: int, max_position_embeddings: int, positions: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """`rope_tables` of ``positions`` for RoPE settings ``params`` over ``dim`` rotated
    dimensions of each head (``head_dim`` times a partial rotary factor)."""
    kind = params["rope_type"]
    if kind == "dynamic":
        inv_freq = dynamic_inv_freq(params, dim, max_position_embeddings, positions)
        scale = 1.0
    elif kind == "longrope":
        inv_freq, scale = longrope_inv_freq(params, dim, max_position_embeddings, positions)
    else:
        static, scale = static_inv_freq(params, dim, max_position_embeddings)
        inv_freq = jnp.asarray(static)
    return rope_tables(positions, inv_freq, scale)


def rope_tables(
    positions: jax.Array, inv_freq: jax.Array, attention_scale: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """``(cos, signed_sin)`` of the rotary angles, ``[b, s, 1, d]`` float32, for `apply_rope`.

    ``positions: [b, s]``, ``inv_freq: [d/2]`` (float32). With ``a = pos * inv_freq``:
    ``cos = [cos a, cos a]`` and ``signed_sin = [-sin a, sin a]``, both times
    ``attention_scale`` (YaRN). A model computes them once per call and hands them to every
    layer: computed inside each layer's rotation, XLA evaluated cos and sin once per element
    of every head, in a loop its CPU back end does not vectorize (an eighth of a SmolLM2
    layer's forward and backward time on a CPU).
    """
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    cos = jnp.cos(angles) * attention_scale
    sin = jnp.sin(angles) * attention_scale
    return (
        jnp.concatenate([cos, cos], axis=-1)[:, :, None, :],
        jnp.concatenate([-sin, sin], axis=-1)[:, :, None, :],
    )


def apply_rope(x: jax.Array, cos: jax.Array, signed_sin: jax.Array) -> jax.Array:
    """Rotary embedding, transformers' "rotate half" convention: ``x * cos +
    rotate_half(x) * sin`` with ``rotate_half([x1, x2]) = [-x2, x1]``.

    ``x: [b, s, h, d]``; ``cos, signed_sin: [b, s, 1, d]`` from `rope_tables`. Computed as
    ``x * cos + [x2, x1] * signed_sin`` (the same products): the halves swapped without a
    negation fuse into the head-major transpose that follows ~3x faster on a CPU. Tables
    narrower than ``d`` (a partial rotary factor, Phi-3) rotate the first ``r`` dimensions
    of each head and pass the rest through.
    """
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        rotated = apply_rope(x[..., :rotary], cos, signed_sin)
        return jnp.concatenate([rotated, x[..., rotary:]], axis=-1)
    # In float32 and rounded once: bfloat16 arithmetic on a CPU rounds after every operation.
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    swapped = jnp.concatenate([x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + swapped * signed_sin).astype(x.dtype)
