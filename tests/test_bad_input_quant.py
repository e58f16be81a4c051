"""Bad input to `jqlora.quantize`, `dequantize`, `to_bnb` and `from_bnb`: one ValueError that
names the tensor and says what was expected, or, for special values, what bitsandbytes does.

Where bitsandbytes answers the same input, it is run live beside jqlora: the dtypes it
refuses, jqlora refuses; NaN and inf are quantized to the same bytes. Differences are
deliberate and asserted here: an empty array is refused (bitsandbytes quantizes it to
nothing), and a 0-d array round-trips (bitsandbytes quantizes it but cannot dequantize it).
"""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from bnb_reference import bnb_dequantize, bnbf, torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import jqlora
from jqlora.kernels.qmatmul import qmatmul, resolve_backend
from jqlora.quant import QuantizedTensor
from jqlora.quant.codebooks import BLOCKSIZES

FAST = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAME = "model.layers.0.mlp.up_proj.weight"

# dtypes bitsandbytes refuses ("only supports 16/32-bit floats"); jqlora must refuse them too
REFUSED = {
    "int8": torch.int8,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "complex64": torch.complex64,
    "float64": torch.float64,
}


@FAST
@given(
    dtype=st.sampled_from(sorted(REFUSED)),
    shape=st.lists(st.integers(1, 70), min_size=1, max_size=3),
)
def test_non_float_dtypes_are_refused_as_bitsandbytes_refuses_them(dtype, shape):
    w = np.ones(shape, dtype)
    with pytest.raises(ValueError, match="16/32-bit floats"):
        bnbf.quantize_4bit(torch.ones(shape, dtype=REFUSED[dtype]))
    with pytest.raises(ValueError, match=rf"{NAME}: cannot quantize an array of dtype {dtype}; "):
        jqlora.quantize(w, name=NAME)


@pytest.mark.parametrize(
    "w", [[[1.0, 2.0]], "weights", None, 3.0], ids=["list", "str", "None", "float"]
)
def test_non_arrays_are_refused(w):
    with pytest.raises(ValueError, match=f"{NAME}: cannot quantize an array of no dtype"):
        jqlora.quantize(w, name=NAME)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"blocksize": 48}, "blocksize 48 is not one bitsandbytes allows"),
        ({"blocksize": 64.0}, "blocksize must be an integer"),
        ({"blocksize": "64"}, "blocksize must be an integer"),
        ({"blocksize": True}, "blocksize must be an integer"),
        ({"quant_type": "NF4"}, "unknown quant_type 'NF4'"),
        ({"quant_type": None}, "unknown quant_type None"),
        ({"double_quant": "no"}, "double_quant must be True or False"),
        ({"offset_threads": 0}, "offset_threads must be a positive int"),
    ],
)
def test_bad_settings_name_the_tensor(kwargs, message):
    with pytest.raises(ValueError, match=f"{NAME}: {message}"):
        jqlora.quantize(np.ones((4, 64), np.float32), name=NAME, **kwargs)


def test_blocksize_bitsandbytes_refuses_is_refused():
    with pytest.raises(ValueError, match="invalid blocksize"):
        bnbf.quantize_4bit(torch.ones(4, 64), blocksize=48)
    with pytest.raises(ValueError, match="blocksize 48"):
        jqlora.quantize(np.ones((4, 64), np.float32), blocksize=48)


@FAST
@given(shape=st.lists(st.integers(0, 5), min_size=1, max_size=3).filter(lambda s: 0 in s))
def test_empty_arrays_are_refused_unlike_bitsandbytes(shape):
    """bitsandbytes quantizes an empty tensor to nothing; jqlora refuses it: an empty weight
    is a broken checkpoint, and nothing downstream (kernels, sharding) is defined for it."""
    packed, state = bnbf.quantize_4bit(torch.ones(shape), blocksize=64)
    assert packed.numel() == 0 and state.absmax.numel() == 0
    with pytest.raises(ValueError, match=rf"{NAME}: cannot quantize an empty array of shape"):
        jqlora.quantize(np.ones(shape, np.float32), name=NAME)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_zero_dim_array_quantizes_as_bitsandbytes_and_round_trips(quant_type):
    """A 0-d array is one value in one block: the same byte and absmax as bitsandbytes.
    jqlora gives the 0-d value back: the value bitsandbytes dequantizes from the same
    value held in a 1-element array (its own dequantize of a 0-d input fails)."""
    w = torch.tensor(0.7)
    packed, state = bnbf.quantize_4bit(w, quant_type=quant_type, compress_statistics=False)
    qt = jqlora.quantize(jnp.float32(0.7), quant_type, 64, False)
    assert np.array_equal(np.asarray(qt.codes).reshape(-1), packed.numpy().reshape(-1))
    assert np.array_equal(np.asarray(qt.absmax), state.absmax.numpy())
    packed1, state1 = bnbf.quantize_4bit(
        w.reshape(1), quant_type=quant_type, compress_statistics=False
    )
    expected = bnbf.dequantize_4bit(packed1, state1).reshape(()).item()
    back = jqlora.dequantize(qt)
    assert back.shape == () and float(back) == expected


# ----------------------------------------------------------------- NaN and inf


@settings(max_examples=12, deadline=None)
@given(
    shape=st.sampled_from([(3, 64), (5, 40), (130,)]),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    double_quant=st.booleans(),
    specials=st.lists(
        st.tuples(st.integers(0, 10**6), st.sampled_from([np.nan, np.inf, -np.inf])),
        min_size=1,
        max_size=4,
    ),
    seed=st.integers(0, 2**16),
)
def test_nan_and_inf_quantize_to_the_bytes_bitsandbytes_stores(
    shape, quant_type, double_quant, specials, seed
):
    """NaN / inf are not refused: bitsandbytes quantizes them (a NaN poisons its block's
    absmax, an inf makes it inf), and jqlora stores the same bytes, so a checkpoint with a
    bad value round-trips between the two unchanged. Blocks of 64; (5, 40) and (130,) end in
    a partial block (the blocksize does not divide the size)."""
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    flat = w.reshape(-1)
    for index, value in specials:
        flat[index % flat.size] = value
    packed, state = bnbf.quantize_4bit(
        torch.from_numpy(w), blocksize=64, quant_type=quant_type, compress_statistics=double_quant
    )
    qt = jqlora.quantize(jnp.asarray(w), quant_type, 64, double_quant)
    assert np.array_equal(np.asarray(qt.codes).reshape(-1), packed.numpy().reshape(-1))
    if double_quant:
        assert np.array_equal(np.asarray(qt.absmax), state.absmax.numpy())
        same = np.array_equal(
            np.asarray(qt.nested_absmax), state.state2.absmax.numpy(), equal_nan=True
        )
        assert same and np.array_equal(np.asarray(qt.offset), state.offset.numpy(), equal_nan=True)
    else:
        assert np.array_equal(np.asarray(qt.absmax), state.absmax.numpy(), equal_nan=True)


# ------------------------------------------- where the blocksize must divide a dimension


def test_rows_without_whole_blocks_take_the_xla_path():
    """The Pallas kernels need whole blocks in each row (in_features % blocksize == 0); any
    other weight quietly takes the XLA path and gives the same product, never an error."""
    w = np.random.default_rng(0).standard_normal((8, 96)).astype(np.float32)  # 96 % 64 != 0
    qt = jqlora.quantize(jnp.asarray(w), "nf4", 64, True)
    assert resolve_backend(qt, "pallas") == "xla"
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 96)), jnp.float32)
    y = qmatmul(x, qt, backend="pallas")
    ref = np.asarray(x) @ np.asarray(jqlora.dequantize(qt)).T
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


def test_qmatmul_refuses_mismatched_features():
    qt = jqlora.quantize(jnp.ones((8, 64)), "nf4", 64, False)
    with pytest.raises(ValueError, match=r"qmatmul: x has 32 features but the weight \(8, 64\)"):
        qmatmul(jnp.ones((2, 32)), qt)


# ------------------------------------------- QuantizedTensors whose arrays do not fit


def _short(qt: QuantizedTensor, **fields) -> QuantizedTensor:
    import dataclasses

    return dataclasses.replace(qt, **fields)


@pytest.mark.parametrize(
    "field, message",
    [
        ("codes", "255 code bytes where shape"),
        ("absmax", "7 absmax values where 8 blocks"),
        ("nested_absmax", "0 nested_absmax values where 1"),
    ],
)
def test_dequantize_and_to_bnb_refuse_truncated_arrays(field, message):
    qt = jqlora.quantize(jnp.ones((8, 64)), "nf4", 64, True)
    bad = _short(qt, **{field: getattr(qt, field).reshape(-1)[:-1]})
    with pytest.raises(ValueError, match=f"dequantize: inconsistent QuantizedTensor: {message}"):
        jqlora.dequantize(bad)
    with pytest.raises(ValueError, match=f"q_proj.weight: inconsistent QuantizedTensor: {message}"):
        jqlora.to_bnb(bad, prefix="q_proj.weight")


def test_dequantize_and_to_bnb_refuse_non_quantized_tensors():
    with pytest.raises(ValueError, match="dequantize: expected a QuantizedTensor, got ndarray"):
        jqlora.dequantize(np.ones((4, 4), np.float32))
    with pytest.raises(ValueError, match="w: expected a QuantizedTensor, got ndarray"):
        jqlora.to_bnb(np.ones((4, 4), np.float32), prefix="w")


# --------------------------------------------------------- from_bnb: lying state dicts

PREFIX = "model.layers.0.self_attn.q_proj.weight"
STATE = f"{PREFIX}.quant_state.bitsandbytes__nf4"


@pytest.fixture(scope="module")
def state_dict():
    """What transformers saves for an NF4 double-quantized [8, 128] weight (via bitsandbytes)."""
    w = torch.from_numpy(np.random.default_rng(3).standard_normal((8, 128)).astype(np.float32))
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    sd = {PREFIX: packed.numpy()}
    sd.update({f"{PREFIX}.{k}": v.numpy() for k, v in state.as_dict(packed=True).items()})
    assert jqlora.from_bnb(sd, prefix=PREFIX).shape == (8, 128)
    return sd


def with_meta(sd, **changes):
    meta = json.loads(sd[STATE].tobytes())
    meta.update(changes)
    return {**sd, STATE: np.frombuffer(json.dumps(meta).encode(), np.uint8)}


@FAST
@given(
    part=st.sampled_from(["", ".absmax", ".nested_absmax"]),
    keep=st.floats(0.0, 0.99),
)
def test_truncated_arrays_are_refused_naming_the_weight(state_dict, part, keep):
    """Codes or scales shorter than the quant state's shape needs (a truncated file)."""
    key = PREFIX + part
    array = state_dict[key].reshape(-1)
    cut = {**state_dict, key: array[: int(keep * array.size)]}
    with pytest.raises(ValueError, match=rf"{PREFIX}: .*(code bytes|entries)"):
        jqlora.from_bnb(cut, prefix=PREFIX)


@FAST
@given(shape=st.lists(st.integers(1, 300), min_size=1, max_size=3))
def test_a_shape_that_lies_is_refused_or_describes_the_same_bytes(state_dict, shape):
    """A quant state whose shape disagrees with the stored arrays is refused; one with the
    same element count (a reshape) is accepted, and the loaders then compare the shape with
    config.json (see test_bad_input_checkpoints)."""
    sd = with_meta(state_dict, shape=shape)
    if math.prod(shape) != 8 * 128:
        with pytest.raises(ValueError, match=rf"{PREFIX}: \d+ code bytes, but shape"):
            jqlora.from_bnb(sd, prefix=PREFIX)
    else:
        qt = jqlora.from_bnb(sd, prefix=PREFIX)
        assert qt.shape == tuple(shape)
        flat = np.asarray(jqlora.dequantize(qt)).reshape(-1)
        right = np.asarray(jqlora.dequantize(jqlora.from_bnb(state_dict, prefix=PREFIX)))
        np.testing.assert_array_equal(flat, right.reshape(-1))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5000) | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=5,
)


@settings(max_examples=25, deadline=None)
@given(
    field=st.sampled_from(
        ["shape", "blocksize", "dtype", "quant_type", "nested_offset", "nested_blocksize"]
    ),
    value=json_values,
)
# Values that load (random JSON seldom does): a new offset, the other float dtypes, the
# blocksize it has; each must read as bitsandbytes reads it.
@example(field="nested_offset", value=0.125)
@example(field="nested_offset", value=-3)
@example(field="dtype", value="bfloat16")
@example(field="nested_blocksize", value=256)
def test_any_json_in_the_quant_state_gives_a_value_error_or_a_consistent_tensor(
    state_dict, field, value
):
    """Whatever JSON a field holds, from_bnb either refuses it with a ValueError naming the
    weight, or returns the tensor bitsandbytes reads from the same state dict: never a
    TypeError, KeyError, a tensor that reads past its data or other values."""
    sd = with_meta(state_dict, **{field: value})
    try:
        qt = jqlora.from_bnb(sd, prefix=PREFIX)
    except ValueError as e:
        assert str(e).startswith(f"{PREFIX}: "), str(e)
    else:
        jqlora.to_bnb(qt)  # checks the arrays against the shape
        state = bnbf.QuantState.from_dict(
            {
                k[len(PREFIX) + 1 :]: torch.from_numpy(v.copy())
                for k, v in sd.items()
                if k != PREFIX
            },
            device="cpu",
        )
        expected = bnb_dequantize(torch.from_numpy(sd[PREFIX].copy()), state, "nf4")
        got = np.asarray(jqlora.dequantize(qt), np.float32)
        assert got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: {**sd, STATE: np.frombuffer(b"[1, 2]", np.uint8)}, "holds JSON list"),
        (lambda sd: {**sd, STATE: np.frombuffer(b"\xff\xfe", np.uint8)}, "UTF-8 JSON"),
        (lambda sd: {k: v for k, v in sd.items() if k != STATE}, "expected exactly one"),
        (lambda sd: {k: v for k, v in sd.items() if not k.endswith("absmax")}, "missing"),
        (lambda sd: with_meta(sd, shape=[-8, 128]), "shape must be a list of integers >= 0"),
        (lambda sd: with_meta(sd, shape=[8.5, 128]), "shape must be a list of integers >= 0"),
        (lambda sd: with_meta(sd, blocksize=48), "blocksize 48 is not one bitsandbytes allows"),
        (lambda sd: with_meta(sd, dtype="int8"), "unsupported dtype 'int8'"),
        (lambda sd: with_meta(sd, quant_type="fp4"), "says quant_type 'fp4'"),
        (lambda sd: {**sd, f"{PREFIX}.quant_map": np.zeros(16, np.float32)}, "quant_map is not"),
        (
            lambda sd: {**sd, f"{PREFIX}.absmax": sd[f"{PREFIX}.absmax"].astype(np.float32)},
            "double-quantized absmax must be uint8",
        ),
    ],
)
def test_inconsistent_state_dicts_are_refused(state_dict, edit, message):
    with pytest.raises(ValueError, match=f"{PREFIX}: .*{message}"):
        jqlora.from_bnb(edit(state_dict), prefix=PREFIX)


def test_a_state_dict_must_be_a_mapping():
    with pytest.raises(ValueError, match="w: expected a state dict"):
        jqlora.from_bnb([("w", np.zeros(4, np.uint8))], prefix="w")


@pytest.mark.parametrize("blocksize", [b for b in BLOCKSIZES if b <= 256])
def test_valid_state_dicts_still_load(blocksize):
    """The checks refuse nothing bitsandbytes writes: every blocksize, a partial last block."""
    w = torch.from_numpy(np.random.default_rng(blocksize).standard_normal((5, 72)).astype("f4"))
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=True)
    sd = {"w": packed.numpy(), **{f"w.{k}": v.numpy() for k, v in state.as_dict(True).items()}}
    qt = jqlora.from_bnb(sd, prefix="w")
    assert qt.shape == (5, 72) and qt.blocksize == blocksize
