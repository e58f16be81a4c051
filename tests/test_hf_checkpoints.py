"""Checkpoints in and out against live transformers + bitsandbytes (CPU, float32): quantized
loading, pre-quantized loading, save_hf (float, 4-bit, sharded), ``jqlora quantize``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as tf
from hf_reference import left_padding_mask, make_tiny, random_ids, torch_logits

import jqlora
from jqlora.hf.names import flatten
from jqlora.quant import QuantizedTensor

# Every linear dimension a multiple of the blocksize: bitsandbytes' CPU dequantize reads
# absmax wrongly for rows that are a multiple of 16 but not of 64 (e.g. 96).
LLAMA = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.1,
)
GPT2 = dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=32, initializer_range=0.1)


def bnb_config(quant_type="nf4", double_quant=True):
    return tf.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )


def exact_cpu_4bit(model):
    """Keep bitsandbytes on its exact NF4/FP4 path: its AVX512-BF16 fast path repacks the
    weights to bf16 at the first eval forward."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def load_4bit_reference(path, **kw):
    return tf.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=bnb_config(**kw), device_map="cpu"
    )


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    return path, make_tiny(tf.LlamaConfig(**LLAMA), path)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    return path, make_tiny(tf.GPT2Config(**GPT2), path)


IDS = random_ids(128, 2, 12, seed=3)
MASK = left_padding_mask(2, 12, [0, 4])


def jq_logits(model, params, mask=MASK):
    return np.asarray(model.apply({"params": params}, IDS, attention_mask=mask))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_quantized_load_matches_transformers_bnb(family, quant_type, double_quant, request):
    path, _ = request.getfixturevalue(f"{family}_dir")
    reference = exact_cpu_4bit(
        load_4bit_reference(path, quant_type=quant_type, double_quant=double_quant)
    )
    model, params = jqlora.load_hf(path, jqlora.QuantConfig(quant_type, 64, double_quant))
    flat = flatten(params)
    quantized = [n for n, v in flat.items() if isinstance(v, QuantizedTensor)]
    assert len(quantized) == (14 if family == "llama" else 8)  # every linear weight but lm_head
    assert not any("lm_head" in n or "embed" in n or "wte" in n for n in quantized)
    want, got = torch_logits(reference, IDS, MASK), jq_logits(model, params)
    real = MASK.astype(bool)
    # the same 4-bit weights, float32 sums in another order: measured worst error 2e-6
    np.testing.assert_allclose(got[real], want[real], atol=2e-5, rtol=0)


def test_transformers_saved_4bit_checkpoint_loads_with_identical_bytes(llama_dir, tmp_path):
    path, _ = llama_dir
    reference = load_4bit_reference(path)
    reference.save_pretrained(tmp_path / "bnb")  # before any forward (see exact_cpu_4bit)
    exact_cpu_4bit(reference)
    model, params = jqlora.load_hf(tmp_path / "bnb")
    np.testing.assert_allclose(
        jq_logits(model, params)[MASK == 1],
        torch_logits(reference, IDS, MASK)[MASK == 1],
        atol=1e-4,
        rtol=0,
    )
    # and jqlora quantizing the float checkpoint produces the very same bytes, as it reads
    # it and on float params in memory (QuantConfig.quantize_params)
    _, ours = jqlora.load_hf(path, jqlora.QuantConfig())
    _, float_params = jqlora.load_hf(path)
    in_memory = jqlora.QuantConfig().quantize_params(float_params)
    for mine_tree in (ours, in_memory):
        assert flatten(mine_tree).keys() == flatten(params).keys()
        for name, leaf in flatten(params).items():
            mine = flatten(mine_tree)[name]
            assert isinstance(mine, QuantizedTensor) == isinstance(leaf, QuantizedTensor), name
            if isinstance(leaf, QuantizedTensor):
                for part in ("codes", "absmax", "nested_absmax", "offset"):
                    np.testing.assert_array_equal(
                        np.asarray(getattr(mine, part)),
                        np.asarray(getattr(leaf, part)),
                        err_msg=f"{name}.{part}",
                    )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_float_loads_in_transformers(family, request, tmp_path):
    path, _ = request.getfixturevalue(f"{family}_dir")
    model, params = jqlora.load_hf(path)
    jqlora.save_hf(tmp_path / "out", model, params)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    np.testing.assert_allclose(
        torch_logits(reloaded, IDS), jq_logits(model, params, None), atol=1e-4, rtol=0
    )


def test_save_4bit_loads_in_transformers_and_back(gpt2_dir, tmp_path):
    """GPT-2 covers the Conv1D orientation: bitsandbytes quantizes the transposed weight."""
    path, _ = gpt2_dir
    q = jqlora.QuantConfig("nf4", 64, True)
    model, params = jqlora.load_hf(path, q)
    jqlora.save_hf(tmp_path / "out", model, params, quantization=q)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    reloaded = exact_cpu_4bit(
        tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu")
    )
    assert type(reloaded.transformer.h[0].attn.c_attn).__name__ == "Linear4bit"
    np.testing.assert_allclose(
        torch_logits(reloaded, IDS), jq_logits(model, params, None), atol=1e-4, rtol=0
    )
    again, params2 = jqlora.load_hf(tmp_path / "out")
    np.testing.assert_array_equal(jq_logits(again, params2), jq_logits(model, params))


def test_sharded_save_and_load(llama_dir, tmp_path):
    path, reference = llama_dir
    model, params = jqlora.load_hf(path)
    jqlora.save_hf(tmp_path / "out", model, params, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    np.testing.assert_allclose(
        torch_logits(reloaded, IDS), torch_logits(reference, IDS), atol=0, rtol=0
    )
    again, params2 = jqlora.load_hf(tmp_path / "out")
    np.testing.assert_array_equal(jq_logits(again, params2), jq_logits(model, params))


def test_save_is_atomic(llama_dir, tmp_path, monkeypatch):
    path, _ = llama_dir
    model, params = jqlora.load_hf(path)
    out = tmp_path / "out"
    jqlora.save_hf(out, model, params)
    before = sorted(p.name for p in out.iterdir())
    from jqlora.hf import safetensors_io

    def fail(self):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_io.ShardWriter, "close", fail)
    with pytest.raises(OSError, match="disk full"):
        jqlora.save_hf(out, model, params)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left


def test_quantize_cli_matches_transformers_quantizing_itself(llama_dir, tmp_path):
    from jqlora.app.cli import main

    path, _ = llama_dir
    assert (
        main(
            ["quantize", str(path), str(tmp_path / "q"), "--quant-type", "fp4", "--no-double-quant"]
        )
        == 0
    )
    ours = exact_cpu_4bit(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu"))
    theirs = exact_cpu_4bit(load_4bit_reference(path, quant_type="fp4", double_quant=False))
    np.testing.assert_array_equal(torch_logits(ours, IDS), torch_logits(theirs, IDS))


def test_quantize_cli_reports_bad_input(tmp_path, capsys):
    from jqlora.app.cli import main

    assert main(["quantize", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "missing: no such file or directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
