"""RoPE inverse frequencies for the ``rope_scaling`` variants, as transformers computes them.

Every variant starts from ``inv_freq_i = base^(-2i/d)``, ``i < d/2``:

* ``default``: as is.
* ``linear``: ``inv_freq / factor`` (positions interpolated by ``factor``).
* ``dynamic`` (NTK): ``base' = base * (factor * L / max_pos - (factor - 1))^(d / (d - 2))``
  with ``L = max(max position seen + 1, max_pos)``; it depends on the input, so it is
  computed inside the forward pass.
* ``llama3``: long wavelengths (``> orig / low_freq_factor``) divided by ``factor``, short
  ones (``< orig / high_freq_factor``) kept, a linear blend in between.
* ``yarn``: blend of extrapolated (``inv_freq``) and interpolated (``inv_freq / factor``)
  frequencies with a linear ramp over the correction range given by ``beta_fast``,
  ``beta_slow``; cos and sin are scaled by ``attention_factor`` (default
  ``0.1 ln(factor) + 1``).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def rope_parameters(hf_config: dict) -> dict:
    """The RoPE settings of a config.json, in transformers 5's ``rope_parameters`` form.

    Accepts both the new form (``rope_parameters`` with ``rope_theta`` inside) and the old one
    (``rope_theta`` at top level, ``rope_scaling`` with ``type`` or ``rope_type``).
    """
    params = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf_config.get("rope_theta") or 10000.0)
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
