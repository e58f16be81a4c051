"""to_bnb / from_bnb: the state-dict entries transformers + bitsandbytes write for a 4-bit weight."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqlora

from bnb_reference import bnb_quantize


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_to_bnb_writes_what_bitsandbytes_writes_and_round_trips(quant_type, double_quant):
    w = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
    packed, state = bnb_quantize(w, "bfloat16", quant_type, 64, double_quant)
    ref = {"weight": packed.numpy(), **{f"weight.{k}": v.numpy() for k, v in state.as_dict(packed=True).items()}}
    qt = jqlora.quantize(jnp.asarray(w, jnp.bfloat16), quant_type, 64, double_quant)
    mine = jqlora.to_bnb(qt)
    assert mine.keys() == ref.keys()
    key = f"weight.quant_state.bitsandbytes__{quant_type}"
    meta, ref_meta = json.loads(mine.pop(key).tobytes()), json.loads(ref.pop(key).tobytes())
    assert meta.keys() == ref_meta.keys() and meta["shape"] == [64, 96] and meta["dtype"] == "bfloat16"
    if double_quant:  # the offset may sit one float32 ulp from torch's mean
        assert np.isclose(meta.pop("nested_offset"), ref_meta.pop("nested_offset"), rtol=3e-7, atol=0)
        ref["weight.absmax"] = mine["weight.absmax"]  # absmax codes depend on the offset
        ref["weight.nested_absmax"] = mine["weight.nested_absmax"]
    assert meta == ref_meta
    for k in ref:
        assert mine[k].dtype == ref[k].dtype and mine[k].shape == ref[k].shape, k
        assert np.array_equal(mine[k], ref[k]), k
    back = jqlora.from_bnb(jqlora.to_bnb(qt))
    assert back.shape == qt.shape and back.dtype == qt.dtype and back.blocksize == 64
    for a, b in zip(jax.tree.leaves(qt), jax.tree.leaves(back)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_from_bnb_rejects_inconsistent_or_missing_entries():
    sd = jqlora.to_bnb(jqlora.quantize(jnp.ones((8, 64)), "nf4", 64, True), prefix="q_proj.weight")
    with pytest.raises(ValueError, match="q_proj.weight: missing .*nested_absmax"):
        jqlora.from_bnb({k: v for k, v in sd.items() if not k.endswith(".nested_absmax")}, prefix="q_proj.weight")
    with pytest.raises(ValueError, match="q_proj.weight: expected exactly one"):
        jqlora.from_bnb({k: v for k, v in sd.items() if "quant_state" not in k}, prefix="q_proj.weight")
    key = "q_proj.weight.quant_state.bitsandbytes__nf4"
    meta = json.loads(sd[key].tobytes())
    meta["shape"] = [8, 128]
    bad = dict(sd, **{key: np.frombuffer(json.dumps(meta).encode(), np.uint8)})
    with pytest.raises(ValueError, match="q_proj.weight: 256 code bytes, but shape"):
        jqlora.from_bnb(bad, prefix="q_proj.weight")
    meta["shape"], meta["blocksize"] = [8, 64], 48
    bad = dict(sd, **{key: np.frombuffer(json.dumps(meta).encode(), np.uint8)})
    with pytest.raises(ValueError, match="q_proj.weight: blocksize 48"):
        jqlora.from_bnb(bad, prefix="q_proj.weight")
