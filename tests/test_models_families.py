"""Gemma 2, Gemma 3 (text), Qwen3 and Phi-3 against live transformers (eager, float32) on
tiny random checkpoints (`families_reference`): logits with and without left padding over
sequences past the sliding window, KV-cache decoding past the window, greedy generation,
"all-linear" choosing peft's modules, PEFT adapters both ways, save_hf."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from families_reference import FAMILIES, TARGETS, VOCAB, WINDOW, family_configs, load_eager
from hf_reference import left_padding_mask, make_tiny, random_ids, torch_logits

import jqlora
from jqlora.hf.peft import load_peft_adapter, save_peft_adapter
from jqlora.lora.check import adapters

# Measured: at most 2.3e-6 (float32 logits of O(1)); ten times the measured error and more.
TOL = 1e-4
SEQ = 3 * WINDOW  # every sequence runs past the window


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    make_tiny(family_configs()[request.param], path)
    model, params = jqlora.load_hf(path)
    return request.param, path, load_eager(path), model, params


@pytest.mark.parametrize("padded", [False, True])
def test_logits_equal_transformers(tiny, padded):
    name, _, reference, model, params = tiny
    ids = random_ids(VOCAB, 3, SEQ)
    mask = left_padding_mask(3, SEQ, [0, 2, 5]) if padded else None
    want = torch_logits(reference, ids, mask)
    real = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    assert np.abs(want).max() > 0.3, "logits should be O(1) for the tolerance to mean something"
    for scan in (False, True):  # scan_layers: one loop where the layers are alike
        got = np.asarray(model.clone(scan_layers=scan).apply({"params": params}, ids, mask))
        np.testing.assert_allclose(got[real], want[real], atol=TOL, rtol=0, err_msg=name)


def test_kv_cache_decoding_past_the_window_equals_full_forward(tiny):
    """Prefill 3 tokens, then decode one at a time to 2 windows (LongRoPE stays on its short
    factors: 8 positions)."""
    name, _, reference, model, params = tiny
    n = 2 * WINDOW
    ids = random_ids(VOCAB, 2, n, seed=1)
    want = torch_logits(reference, ids)
    logits, cache = model.apply({"params": params}, ids[:, :3], cache=model.init_cache(2, 16))
    steps = [logits]
    for t in range(3, n):
        logits, cache = model.apply({"params": params}, ids[:, t : t + 1], cache=cache)
        steps.append(logits)
    got = np.concatenate([np.asarray(s) for s in steps], axis=1)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0, err_msg=name)


def test_greedy_generation_equals_transformers(tiny):
    name, _, reference, model, params = tiny
    prompts = random_ids(VOCAB, 3, 9, seed=2)
    mask = left_padding_mask(3, 9, [4, 0, 1])
    ids = np.where(mask == 1, prompts, 0)
    with torch.no_grad():
        want = reference.generate(
            torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
            max_new_tokens=10, do_sample=False, eos_token_id=2, pad_token_id=0,
        ).numpy()  # fmt: skip
    got = jqlora.generate(
        model, params, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=2, pad_token_id=0
    )
    np.testing.assert_array_equal(got, want, err_msg=name)


def test_all_linear_chooses_the_modules_peft_chooses(tiny):
    from peft import LoraConfig, get_peft_model

    name, path, _, _, params = tiny
    peft_model = get_peft_model(load_eager(path), LoraConfig(r=2, target_modules="all-linear"))
    theirs = {
        n.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight")
        for n, _ in peft_model.named_parameters()
        if n.endswith("lora_A.default.weight")
    }
    lora = jqlora.init_lora(jax.random.PRNGKey(0), params, jqlora.LoraConfig(r=2))
    ours = {".".join(p) for p, _ in adapters(lora)}
    assert ours == theirs
    assert {n.rsplit(".", 1)[-1] for n in ours} == set(TARGETS[name])


@pytest.mark.parametrize("variant", ["plain", "rslora", "dora"])
def test_peft_adapter_both_ways(tiny, tmp_path, variant):
    """An adapter peft built (non-zero B) gives jqlora peft's logits; written back by jqlora,
    it loads in peft with the same logits."""
    from peft import LoraConfig, PeftModel, get_peft_model

    name, path, _, model, params = tiny
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
        use_rslora=variant == "rslora", use_dora=variant == "dora", task_type="CAUSAL_LM",
    )  # fmt: skip
    peft_model = get_peft_model(load_eager(path), config).eval()
    ids = random_ids(VOCAB, 2, SEQ, seed=3)
    want = torch_logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")

    lora, lora_config = load_peft_adapter(tmp_path / "peft", params)
    got = np.asarray(model.apply({"params": params, "lora": lora}, ids))
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0, err_msg=name)
    base = np.asarray(model.apply({"params": params}, ids))
    assert np.abs(got - base).max() > 1e-2  # the adapter matters

    save_peft_adapter(tmp_path / "back", lora, lora_config, base_model_name_or_path=str(path))
    again = PeftModel.from_pretrained(load_eager(path), tmp_path / "back").eval()
    np.testing.assert_allclose(torch_logits(again, ids), got, atol=TOL, rtol=0, err_msg=name)


def test_save_hf_loads_in_transformers(tiny, tmp_path):
    name, _, reference, model, params = tiny
    jqlora.save_hf(tmp_path, model, params)
    reloaded = load_eager(tmp_path)
    assert type(reloaded) is type(reference)
    ids = random_ids(VOCAB, 2, SEQ, seed=4)
    np.testing.assert_allclose(
        torch_logits(reloaded, ids), torch_logits(reference, ids), atol=0, rtol=0, err_msg=name
    )


def test_estimate_memory_counts_the_parameters_transformers_has(tiny):
    name, path, reference, _, _ = tiny
    estimate = jqlora.estimate_memory(reference.config.to_dict(), jqlora.LoraConfig(r=4))
    assert estimate.base_params == sum(p.numel() for p in reference.parameters()), name


def test_merge_cli_equals_peft_merge_and_unload(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    from jqlora.app.cli import main

    name, path, _, _, _ = tiny
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(load_eager(path), config).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = random_ids(VOCAB, 2, SEQ, seed=7)
    want = torch_logits(peft_model.merge_and_unload().eval(), ids)
    argv = ["merge", "--model", str(path), "--adapter", str(tmp_path / "adapter")]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    np.testing.assert_allclose(
        torch_logits(load_eager(tmp_path / "out"), ids), want, atol=TOL, rtol=0, err_msg=name
    )


def test_gemma3_image_text_checkpoint_loads_its_text_tower(tmp_path):
    """A Gemma 3 image-text checkpoint (a tiny SigLIP tower beside the text model): jqlora
    loads the text tower, equal to transformers on text, and saves it as a Gemma 3 text model."""
    import transformers as tf

    vision = tf.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=28, patch_size=14,
    )  # fmt: skip
    config = tf.Gemma3Config(
        text_config=family_configs()["gemma3_text"].to_dict(), vision_config=vision.to_dict(),
        mm_tokens_per_image=4, boi_token_index=90, eoi_token_index=91, image_token_index=92,
    )  # fmt: skip
    torch.manual_seed(0)
    image_text = tf.Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        for n, p in image_text.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    image_text.save_pretrained(tmp_path / "image-text")
    reference = load_eager(tmp_path / "image-text")
    model, params = jqlora.load_hf(tmp_path / "image-text")
    ids = random_ids(90, 2, SEQ, seed=8)  # below the image tokens
    mask = left_padding_mask(2, SEQ, [0, 3])
    want, real = torch_logits(reference, ids, mask), mask.astype(bool)
    got = np.asarray(model.apply({"params": params}, ids, mask))
    np.testing.assert_allclose(got[real], want[real], atol=TOL, rtol=0)

    jqlora.save_hf(tmp_path / "text", model, params)
    text = load_eager(tmp_path / "text")
    assert type(text).__name__ == "Gemma3ForCausalLM"
    np.testing.assert_allclose(torch_logits(text, ids, mask)[real], want[real], atol=TOL, rtol=0)


def test_pissa_residual_base_equals_peft(tiny):
    """PiSSA on "all-linear" (fused Phi-3 modules included): the residual base weights peft
    leaves, and the model's logits unchanged by the initialization."""
    from peft import LoraConfig, get_peft_model

    from jqlora.hf.names import flatten
    from jqlora.lora import init_lora_from_base

    name, path, reference, model, params = tiny
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="pissa")
    peft_model = get_peft_model(load_eager(path), config).eval()
    residual, lora = init_lora_from_base(
        jax.random.key(0), params, jqlora.LoraConfig(r=4, alpha=8, init="pissa")
    )
    ours = flatten(residual)
    for module in TARGETS[name]:
        block = (
            "mlp"
            if module in ("gate_proj", "up_proj", "down_proj", "gate_up_proj")
            else "self_attn"
        )
        torch_name = f"model.layers.1.{block}.{module}"
        theirs = peft_model.base_model.model.get_submodule(torch_name).base_layer.weight
        # Measured: ~1e-6 (float32 SVDs of 64-128 wide matrices).
        np.testing.assert_allclose(
            ours[torch_name + ".weight"], theirs.detach().numpy(), atol=2e-5, err_msg=name
        )
    ids = random_ids(VOCAB, 2, SEQ, seed=9)
    got = np.asarray(model.apply({"params": residual, "lora": lora}, ids))
    np.testing.assert_allclose(got, torch_logits(reference, ids), atol=TOL, rtol=0, err_msg=name)
