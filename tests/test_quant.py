"""jqlora.quantize / dequantize against live bitsandbytes 0.50 (CPU), byte for byte."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bnb_reference import TORCH_DTYPES, bnb_dequantize, bnb_quantize, bnbf, torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jqlora
from jqlora.quant import blockwise
from jqlora.quant.codebooks import BLOCKSIZES, DYNAMIC_SIGNED, bucket_bounds
from jqlora.quant.torch_mean import torch_mean

JNP = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}


def ulps(a, b) -> int:
    return abs(int(np.float32(a).view(np.int32)) - int(np.float32(b).view(np.int32)))


def same_bits(a, b) -> bool:
    """Equal float32 values, NaN where the other has NaN."""
    return np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), equal_nan=True)


def check_against_bnb(
    w: np.ndarray, dtype: str, quant_type: str, blocksize: int, double_quant: bool
):
    """Quantize ``w`` with both and assert every stored byte agrees, the offset included."""
    w = np.asarray(torch.from_numpy(w).to(TORCH_DTYPES[dtype]).float())
    packed, state = bnb_quantize(w, dtype, quant_type, blocksize, double_quant)
    qt = jqlora.quantize(jnp.asarray(w).astype(JNP[dtype]), quant_type, blocksize, double_quant)
    assert np.array_equal(np.asarray(qt.codes).reshape(-1), packed.numpy().reshape(-1)), (
        "packed codes"
    )
    if not double_quant:
        assert same_bits(qt.absmax, state.absmax.numpy()), "absmax"
    else:
        # offset = torch's float32 mean(absmax), reproduced in torch's summation order.
        assert same_bits(qt.offset, state.offset.numpy()), (float(qt.offset), state.offset.item())
        assert np.array_equal(np.asarray(qt.absmax), state.absmax.numpy()), "8-bit absmax codes"
        assert same_bits(qt.nested_absmax, state.state2.absmax.numpy()), "nested_absmax"
    # jqlora.dequantize of bitsandbytes' own state == bitsandbytes' dequantization.
    sd = {
        "weight": packed.numpy(),
        **{f"weight.{k}": v.numpy() for k, v in state.as_dict(packed=True).items()},
    }
    mine = jqlora.dequantize(jqlora.from_bnb(sd))
    assert mine.dtype == JNP[dtype] and mine.shape == w.shape
    assert same_bits(
        np.asarray(mine.astype(jnp.float32)), bnb_dequantize(packed, state, quant_type)
    )
    return qt, packed, state


shapes = st.lists(st.integers(1, 48), min_size=1, max_size=3).filter(
    lambda s: math.prod(s) <= 30000
)


@settings(max_examples=12, deadline=None)
@given(
    shape=shapes,
    dtype=st.sampled_from(sorted(JNP)),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    blocksize=st.sampled_from(BLOCKSIZES),
    double_quant=st.booleans(),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31),
)
def test_random_shapes_match_bitsandbytes(
    shape, dtype, quant_type, blocksize, double_quant, scale, seed
):
    w = (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)
    check_against_bnb(w, dtype, quant_type, blocksize, double_quant)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_every_blocksize_with_a_partial_last_block(blocksize):
    """Odd element count: the tail block divides instead of multiplying, pad code 0.0."""
    n = 2 * blocksize + 37
    w = np.random.default_rng(blocksize).standard_normal(n).astype(np.float32)
    quant_type = "fp4" if BLOCKSIZES.index(blocksize) % 2 else "nf4"
    check_against_bnb(w, "float32", quant_type, blocksize, double_quant=True)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_special_values_follow_bitsandbytes_cpu(quant_type):
    """All-zero full block (absmax 0, code of 0.0), all-zero tail (absmax 1e-38), NaN (absmax
    NaN, every code of the block the top bucket), inf, -0.0, and FP4's two zero codes."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal(64 * 8 + 10).astype(np.float32)
    w[0:64] = 0.0  # all-zero full block
    w[64:128] = -0.0
    w[130] = np.nan
    w[200] = np.inf
    w[260] = -np.inf
    w[320:384] = np.linspace(-1e-4, 1e-4, 64) * (np.arange(64) != 0)  # tiny +/- around zero
    w[320] = 1.0
    w[512:] = 0.0  # all-zero partial last block
    _, packed, state = check_against_bnb(w, "float32", quant_type, 64, double_quant=False)
    absmax = state.absmax.numpy()
    assert absmax[0] == 0.0 and np.isnan(absmax[2]) and np.isinf(absmax[3])
    assert absmax[-1] == np.float32(1e-38)  # the clamp bitsandbytes stores for the tail
    if quant_type == "fp4":  # tiny positives take code 8, tiny negatives code 0
        codes = np.stack(
            [packed.numpy().reshape(-1) >> 4, packed.numpy().reshape(-1) & 15], -1
        ).reshape(-1)
        assert {0, 8} <= set(codes[321:384].tolist())
    check_against_bnb(w, "float32", quant_type, 64, double_quant=True)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_values_on_midpoints_take_the_lower_code(quant_type):
    bounds, _ = bucket_bounds(quant_type)
    block = np.concatenate([[1.0], bounds, -bounds, np.zeros(64 - 1 - 30)]).astype(np.float32)
    check_against_bnb(block, "float32", quant_type, 64, double_quant=False)


def test_nested_absmax_uses_bitsandbytes_lookup_table_not_nearest_code():
    """bitsandbytes' CPU 8-bit quantizer maps through a 65,536-entry table: near midpoints
    (and at 0.0, code 131) it is not the nearest code; jqlora reproduces the table."""
    rng = np.random.default_rng(1)
    mids = (DYNAMIC_SIGNED[:-1] + DYNAMIC_SIGNED[1:]) / 2
    x = np.concatenate(
        [[1.0, 0.0, np.nan, -0.5], mids, mids * (1 + 1e-6), rng.uniform(-1, 1, 1500)]
    ).astype(np.float32)
    x = np.concatenate([x, np.zeros(256, np.float32)])  # an all-zero block: code 0
    ref_codes, ref_state = bnbf.quantize_blockwise(
        torch.from_numpy(x), code=bnbf.create_dynamic_map(signed=True), blocksize=256
    )
    codes, absmax = jax.jit(blockwise.quantize_8bit)(jnp.asarray(x))
    assert np.array_equal(np.asarray(codes), ref_codes.numpy())
    assert same_bits(absmax, ref_state.absmax.numpy())
    nearest = np.abs(x[:1000, None] / np.asarray(absmax)[0] - DYNAMIC_SIGNED[None]).argmin(1)
    assert (nearest != ref_codes.numpy()[:1000]).sum() > 10  # the table matters


def test_decoded_absmax_under_jit_has_no_fused_multiply_add():
    """DYN[q] * nested + offset is two roundings in bitsandbytes; a fused FMA under jit would
    move many of these 16k absmax values by one ulp."""
    w = np.random.default_rng(2).standard_normal((256, 4096)).astype(np.float32)
    packed, state = bnb_quantize(w, "float32", "nf4", 64, True)
    sd = {
        "weight": packed.numpy(),
        **{f"weight.{k}": v.numpy() for k, v in state.as_dict(packed=True).items()},
    }
    qt = jqlora.from_bnb(sd)
    from bnb_reference import bnb_absmax

    assert np.array_equal(np.asarray(jax.jit(blockwise.decode_absmax)(qt)), bnb_absmax(state))
    assert np.array_equal(
        np.asarray(jax.jit(jqlora.dequantize)(qt)), bnbf.dequantize_4bit(packed, state).numpy()
    )


# Sizes that reach every branch of torch's summation order: fewer floats than one vector,
# a scalar tail, cascade chunks with level 1 / 2 carries, level 3 (>= 256 chunks of 16 rows),
# and per-thread slices above torch's 32768-element grain.
ORDER_CASES = [(1, 1), (5, 1), (8, 1), (13, 1), (100, 1), (517, 1), (8191, 1), (140001, 1)]
ORDER_CASES += [(40000, 2), (100003, 3), (704512, 2)]


@pytest.mark.parametrize("n, threads", ORDER_CASES)
def test_offset_mean_is_torch_mean_bit_for_bit(n, threads):
    """bitsandbytes' offset is torch's CPU float32 mean; every branch of its summation order."""
    absmax = np.abs(np.random.default_rng(n).standard_normal(n) * 0.02 + 0.05).astype(np.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref = torch.from_numpy(absmax).mean().numpy()
    finally:
        torch.set_num_threads(before)
    mine = jax.jit(torch_mean, static_argnums=1)(jnp.asarray(absmax), threads)
    assert same_bits(mine, ref), (float(mine), float(ref), ulps(mine, ref))


def test_quantize_is_jittable_and_equals_eager():
    w = jnp.asarray(np.random.default_rng(4).standard_normal((33, 70)), jnp.bfloat16)
    eager = jqlora.quantize(w)
    jitted = jax.jit(lambda x: jqlora.quantize(x))(w)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert (
        jitted.shape == (33, 70) and jitted.dtype == jnp.bfloat16 and jitted.codes.shape == (33, 35)
    )


def test_bits_per_param():
    w = jnp.asarray(np.random.default_rng(5).standard_normal((256, 4096)), jnp.bfloat16)
    dq = jqlora.quantize(w, "nf4", 64, double_quant=True)
    # 4 + 8/64 + 32/(64*256) bits, plus the 32-bit offset over 1M params.
    assert round(dq.bits_per_param, 3) == 4.127
    assert dq.nbytes == w.size // 2 + w.size // 64 + 4 * (w.size // 64 // 256) + 4
    assert jqlora.quantize(w, "nf4", 64, double_quant=False).bits_per_param == 4.5


@pytest.mark.parametrize(
    "w, kwargs, message",
    [
        (np.ones((4, 4), np.int32), {}, "dtype int32"),
        (np.ones((4, 4), np.float64), {}, "dtype float64"),
        (np.ones((4, 4), np.float32), {"blocksize": 48}, "blocksize 48"),
        (np.ones((4, 4), np.float32), {"quant_type": "int4"}, "quant_type"),
        (np.ones((4, 4), np.float32), {"offset_threads": 0}, "offset_threads"),
        (np.ones((0, 4), np.float32), {}, "empty"),
    ],
)
def test_bad_input_is_a_value_error_naming_the_tensor(w, kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        jqlora.quantize(w, name="layers.0.q_proj", **kwargs)
    assert "layers.0.q_proj" in str(err.value)
