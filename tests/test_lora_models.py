"""LoRA on whole tiny models (Llama, GPT-2) against transformers + peft: targets, merge, PiSSA, QLoRA inits.

(The adapter forward of every family and variant against peft is in ``test_peft.py``.)
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
from adapter_reference import VOCAB, jqlora_logits, load_torch, tiny_configs, torch_logits
from hf_reference import make_tiny
from test_lora_peft import lora_from_peft

import jqlora
from jqlora.lora import LoraConfig, init_lora, init_lora_from_base, merge_lora

IDS = np.random.default_rng(0).integers(3, VOCAB, size=(2, 7))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            d = tmp_path_factory.mktemp(family)
            make_tiny(tiny_configs()[family], d)
            cache[family] = (d, *jqlora.load_hf(d))
        return cache[family]

    return get


def _peft(model_dir, **kw):
    kw.setdefault("init_lora_weights", False)
    return peft.get_peft_model(
        load_torch(model_dir), peft.LoraConfig(r=4, lora_alpha=8, **kw)
    ).eval()


@pytest.mark.parametrize(
    "family, use_dora", [("llama", False), ("llama", True), ("gpt2", False), ("gpt2", True)]
)
def test_all_linear_adapter_and_merge_match_peft(tiny, family, use_dora):
    """all-linear selects peft's modules; adapted and merged logits equal peft's (GPT-2: Conv1D, transposed)."""
    d, model, params = tiny(family)
    ref = _peft(d, target_modules="all-linear", use_dora=use_dora)
    lora = lora_from_peft(ref, None, dora=use_dora)
    ours = init_lora(jax.random.key(0), params, LoraConfig(r=4, alpha=8, use_dora=use_dora))
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, lora)
    adapted = torch_logits(ref, IDS)
    np.testing.assert_allclose(
        jqlora_logits(model, params, IDS, lora), adapted, atol=1e-4, rtol=1e-4
    )
    merged = merge_lora(params, lora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: fan_in_fan_out for Conv1D
        merged_ref = ref.merge_and_unload()
    np.testing.assert_allclose(
        jqlora_logits(model, merged, IDS), torch_logits(merged_ref, IDS), atol=1e-4, rtol=1e-4
    )
    np.testing.assert_allclose(jqlora_logits(model, merged, IDS), adapted, atol=1e-4, rtol=1e-4)


def test_attention_only_on_llama(tiny):
    d, model, params = tiny("llama")
    ref = _peft(d, target_modules=["q_proj", "v_proj"])
    lora = init_lora(jax.random.key(0), params, LoraConfig.attention_only(r=4, alpha=8))
    assert jax.tree.map(jnp.shape, lora) == jax.tree.map(jnp.shape, lora_from_peft(ref, None))


def test_pissa_llama_matches_peft_and_starts_at_the_float_model(tiny):
    d, model, params = tiny("llama")
    ref = _peft(d, target_modules="all-linear", init_lora_weights="pissa")
    new_params, lora = init_lora_from_base(
        jax.random.key(0), params, LoraConfig(r=4, alpha=8, init="pissa")
    )
    float_logits = jqlora_logits(model, params, IDS)
    np.testing.assert_allclose(
        jqlora_logits(model, new_params, IDS, lora), float_logits, atol=1e-4, rtol=1e-4
    )
    np.testing.assert_allclose(torch_logits(ref, IDS), float_logits, atol=1e-4, rtol=1e-4)
    q_ref = ref.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().numpy()
    np.testing.assert_allclose(
        new_params["model"]["layers"]["0"]["self_attn"]["q_proj"]["weight"], q_ref, atol=1e-5
    )


@pytest.mark.parametrize("init", ["pissa", "loftq"])
def test_qlora_residual_base_is_closer_to_the_float_model(tiny, init):
    """An NF4 base from PiSSA / LoftQ plus its adapter gives logits nearer the float model than plain NF4."""
    d, model, params = tiny("llama")
    quant = jqlora.QuantConfig()
    float_logits = jqlora_logits(model, params, IDS)
    _, nf4 = jqlora.load_hf(d, quantization=quant)
    plain = np.abs(jqlora_logits(model, nf4, IDS) - float_logits).mean()
    new_params, lora = init_lora_from_base(
        jax.random.key(0), params, LoraConfig(r=8, alpha=16, init=init), quantization=quant
    )
    leaves = jax.tree.leaves(new_params, is_leaf=lambda v: isinstance(v, jqlora.QuantizedTensor))
    assert (
        sum(isinstance(v, jqlora.QuantizedTensor) for v in leaves) == 14
    )  # 7 linear layers x 2, not lm_head
    ours = np.abs(jqlora_logits(model, new_params, IDS, lora) - float_logits).mean()
    assert ours < 0.8 * plain, (ours, plain)
