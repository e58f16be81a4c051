"""to_bnb / from_bnb: the state-dict entries transformers + bitsandbytes write for a 4-bit weight."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bnb_reference import bnb_dequantize, bnb_quantize, torch

import jqlora


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_to_bnb_writes_what_bitsandbytes_writes_and_round_trips(quant_type, double_quant):
    w = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32)
    packed, state = bnb_quantize(w, "bfloat16", quant_type, 64, double_quant)
    ref = {
        "weight": packed.numpy(),
        **{f"weight.{k}": v.numpy() for k, v in state.as_dict(packed=True).items()},
    }
    qt = jqlora.quantize(jnp.asarray(w, jnp.bfloat16), quant_type, 64, double_quant)
    mine = jqlora.to_bnb(qt)
    assert mine.keys() == ref.keys()
    key = f"weight.quant_state.bitsandbytes__{quant_type}"
    meta, ref_meta = json.loads(mine.pop(key).tobytes()), json.loads(ref.pop(key).tobytes())
    assert (
        meta.keys() == ref_meta.keys() and meta["shape"] == [64, 96] and meta["dtype"] == "bfloat16"
    )
    assert meta == ref_meta  # the offset too: the same float32 mean
    for k in ref:
        assert mine[k].dtype == ref[k].dtype and mine[k].shape == ref[k].shape, k
        assert np.array_equal(mine[k], ref[k]), k
    back = jqlora.from_bnb(jqlora.to_bnb(qt))
    assert back.shape == qt.shape and back.dtype == qt.dtype and back.blocksize == 64
    for a, b in zip(jax.tree.leaves(qt), jax.tree.leaves(back), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_from_bnb_rejects_inconsistent_or_missing_entries():
    sd = jqlora.to_bnb(jqlora.quantize(jnp.ones((8, 64)), "nf4", 64, True), prefix="q_proj.weight")
    with pytest.raises(ValueError, match="q_proj.weight: missing .*nested_absmax"):
        jqlora.from_bnb(
            {k: v for k, v in sd.items() if not k.endswith(".nested_absmax")},
            prefix="q_proj.weight",
        )
    with pytest.raises(ValueError, match="q_proj.weight: expected exactly one"):
        jqlora.from_bnb(
            {k: v for k, v in sd.items() if "quant_state" not in k}, prefix="q_proj.weight"
        )
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


@pytest.mark.parametrize(
    "quant_type, double_quant, dtype", [("nf4", True, "bfloat16"), ("fp4", False, "float32")]
)
def test_to_bnb_equals_the_file_transformers_saves(tmp_path, quant_type, double_quant, dtype):
    """A tiny Llama quantized by transformers + bitsandbytes and saved with save_pretrained:
    for every 4-bit layer, to_bnb(quantize(float weight)) gives the same keys, dtypes, shapes
    and bytes (JSON included) as model.safetensors, and from_bnb of the saved entries
    dequantizes to what bitsandbytes dequantizes."""
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import load_file

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=64,
    )
    float_model = transformers.LlamaForCausalLM(config)
    float_model.save_pretrained(tmp_path / "float")
    bnb_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "float",
        quantization_config=bnb_config,
        dtype=getattr(torch, dtype),
        device_map="cpu",
    )
    model.save_pretrained(tmp_path / "nf4")  # before any forward, which may repack the weights
    saved = load_file(tmp_path / "nf4" / "model.safetensors")
    floats = {
        k: v.to(getattr(torch, dtype)).float().numpy() for k, v in float_model.state_dict().items()
    }
    modules = dict(model.named_modules())

    layers = sorted(k[: -len(".absmax")] for k in saved if k.endswith(".absmax"))
    assert len(layers) == 7, layers  # q, k, v, o, gate, up, down
    for prefix in layers:
        qt = jqlora.quantize(
            jnp.asarray(floats[prefix], getattr(jnp, dtype)), quant_type, 64, double_quant
        )
        mine = jqlora.to_bnb(qt, prefix=prefix)
        theirs = {k: v for k, v in saved.items() if k == prefix or k.startswith(prefix + ".")}
        assert mine.keys() == theirs.keys(), prefix
        for k in theirs:
            assert mine[k].dtype == theirs[k].dtype and mine[k].shape == theirs[k].shape, k
            assert np.array_equal(mine[k], theirs[k]), k  # the JSON entry byte for byte too
        weight = modules[prefix[: -len(".weight")]].weight
        ref = bnb_dequantize(weight.data, weight.quant_state, quant_type)
        got = jqlora.dequantize(jqlora.from_bnb(theirs, prefix=prefix))
        assert got.dtype == getattr(jnp, dtype)
        assert np.array_equal(np.asarray(got.astype(jnp.float32)), ref), prefix
