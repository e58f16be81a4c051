"""Gemma 2, Gemma 3 (text), Qwen3 and Phi-3 in 4 bits against transformers + bitsandbytes
(eager attention, exact CPU NF4/FP4): quantized loading, and the ``*-bnb-4bit`` checkpoint
transformers writes loaded as it is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf
from families_reference import FAMILIES, VOCAB, WINDOW, family_configs, load_eager
from hf_reference import left_padding_mask, make_tiny, random_ids, torch_logits

import jqlora
from jqlora.hf.names import flatten
from jqlora.quant import QuantizedTensor

pytest.importorskip("bitsandbytes")

# Measured: ~1.5e-6 (the same 4-bit weights, float32 sums in another order); the issue
# asks for 1e-3.
TOL = 1e-5
IDS = random_ids(VOCAB, 2, 3 * WINDOW, seed=5)
MASK = left_padding_mask(2, 3 * WINDOW, [0, 3])


def bnb_reference(path, quant_type="nf4", double_quant=True, prequantized=False):
    quantization = tf.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )
    kw = {} if prequantized else {"quantization_config": quantization}
    model = load_eager(path, device_map="cpu", **kw)
    for m in model.modules():  # bitsandbytes' exact CPU path (see REFERENCES.md)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    make_tiny(family_configs()[request.param], path)
    return request.param, path


def _check(name, model, params, reference):
    quantized = [n for n, v in flatten(params).items() if isinstance(v, QuantizedTensor)]
    assert quantized and not any("lm_head" in n or "embed" in n for n in quantized)
    want = torch_logits(reference, IDS, MASK)
    got = np.asarray(model.apply({"params": params}, IDS, attention_mask=MASK))
    real = MASK.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=TOL, rtol=0, err_msg=name)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_quantized_load_equals_transformers_bnb(tiny, quant_type, double_quant):
    name, path = tiny
    reference = bnb_reference(path, quant_type, double_quant)
    model, params = jqlora.load_hf(path, jqlora.QuantConfig(quant_type, 64, double_quant))
    _check(name, model, params, reference)


def test_bnb_4bit_checkpoint_saved_by_transformers_loads(tiny, tmp_path):
    name, path = tiny
    bnb_reference(path).save_pretrained(tmp_path)  # before any forward (REFERENCES.md)
    model, params = jqlora.load_hf(tmp_path)
    _check(name, model, params, bnb_reference(path))


def test_quantize_cli_equals_transformers_quantizing_itself(tiny, tmp_path):
    from jqlora.cli import main

    name, path = tiny
    assert main(["quantize", str(path), str(tmp_path)]) == 0
    ours = torch_logits(bnb_reference(tmp_path, prequantized=True), IDS, MASK)
    np.testing.assert_array_equal(ours, torch_logits(bnb_reference(path), IDS, MASK), err_msg=name)
