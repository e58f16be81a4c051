"""jqlora's Flax models against live transformers (CPU, float32) on tiny random checkpoints:
every family, GQA, tied/untied embeddings, biases, every rope_scaling variant, padding."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import transformers as tf
from hf_reference import left_padding_mask, make_tiny, random_ids, torch_logits

import jqlora

TOL = 1e-4
SMALL = dict(
    vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, initializer_range=0.1
)

CONFIGS = {
    "llama-gqa-untied": lambda: tf.LlamaConfig(
        **SMALL, num_attention_heads=4, num_key_value_heads=2
    ),
    "llama-tied-bias-linear": lambda: tf.LlamaConfig(
        **SMALL,
        num_attention_heads=4,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
    "llama-dynamic": lambda: tf.LlamaConfig(
        **SMALL,
        num_attention_heads=4,
        max_position_embeddings=8,
        rope_scaling={"rope_type": "dynamic", "factor": 2.0},
    ),
    "llama3-rope": lambda: tf.LlamaConfig(
        **SMALL,
        num_attention_heads=2,
        head_dim=32,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "llama-yarn": lambda: tf.LlamaConfig(
        **SMALL,
        num_attention_heads=4,
        max_position_embeddings=64,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    ),
    "qwen2-bias-tied": lambda: tf.Qwen2Config(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
    ),
    "mistral-window": lambda: tf.MistralConfig(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4
    ),
    "opt-project-in-out": lambda: tf.OPTConfig(
        vocab_size=96,
        hidden_size=64,
        word_embed_proj_dim=32,
        ffn_dim=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        init_std=0.1,
    ),
    "opt-post-ln-untied": lambda: tf.OPTConfig(
        vocab_size=96,
        hidden_size=64,
        ffn_dim=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        do_layer_norm_before=False,
        tie_word_embeddings=False,
        init_std=0.1,
    ),
    "gpt2": lambda: tf.GPT2Config(
        vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=32, initializer_range=0.1
    ),
    "gpt2-untied-layer-scaled": lambda: tf.GPT2Config(
        vocab_size=96,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=32,
        initializer_range=0.1,
        tie_word_embeddings=False,
        scale_attn_by_inverse_layer_idx=True,
        activation_function="gelu",
    ),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    reference = make_tiny(CONFIGS[request.param](), path)
    model, params = jqlora.load_hf(path)
    return request.param, reference, model, params


def test_logits_equal_transformers_with_left_padding(tiny):
    name, reference, model, params = tiny
    ids = random_ids(96, 3, 12)
    mask = left_padding_mask(3, 12, [0, 2, 5])
    want = torch_logits(reference, ids, mask)
    got = np.asarray(model.apply({"params": params}, ids, attention_mask=mask))
    real = mask.astype(bool)
    assert np.abs(want).max() > 0.3, "logits should be O(1) for the tolerance to mean something"
    np.testing.assert_allclose(got[real], want[real], atol=TOL, rtol=0, err_msg=name)

    # scan_layers: the same per-layer params, the layers run as one loop (but GPT-2's layer-
    # scaled attention differs per layer, so it stays unrolled).
    scanned = model.clone(scan_layers=True)

    def forward(p):
        return scanned.apply({"params": p}, ids, attention_mask=mask)

    assert ("scan" in str(jax.make_jaxpr(forward)(params))) == (name != "gpt2-untied-layer-scaled")
    got = np.asarray(forward(params))
    np.testing.assert_allclose(got[real], want[real], atol=TOL, rtol=0, err_msg=name)


def test_kv_cache_prefill_and_decode_equal_full_forward(tiny):
    """Prefill 4 tokens, then decode 3 one at a time: the same logits as one full pass."""
    name, reference, model, params = tiny
    ids = random_ids(
        96, 2, 7, seed=1
    )  # within every max_position_embeddings (dynamic NTK rebases past it)
    want = torch_logits(reference, ids)
    cache = model.init_cache(2, 16)
    logits, cache = model.apply({"params": params}, ids[:, :4], cache=cache)
    steps = [logits]
    for t in range(4, 7):
        logits, cache = model.apply({"params": params}, ids[:, t : t + 1], cache=cache)
        steps.append(logits)
    got = np.concatenate([np.asarray(s) for s in steps], axis=1)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0, err_msg=name)
    assert int(cache.index) == 7


def test_lora_entry_equals_merged_weight_in_transformers(tiny):
    """An adapter {"a", "b", "spec"} in the "lora" collection adds scale * B @ A to the
    module's weight: compare with transformers running the merged weight."""
    import copy

    import torch

    from jqlora.hf.names import expected_params, unflatten
    from jqlora.lora import LoraSpec

    name, reference, model, params = tiny
    modules = sorted(expected_params(model).linear_modules)
    rng = np.random.default_rng(7)
    merged = copy.deepcopy(reference)
    lora = {}
    for module in (modules[0], modules[-1]):
        torch_weight = merged.get_parameter(module + ".weight")
        conv1d = type(merged.get_submodule(module)).__name__ == "Conv1D"
        out_f, in_f = torch_weight.shape[::-1] if conv1d else torch_weight.shape
        a = rng.standard_normal((4, in_f)).astype(np.float32) * 0.1
        b = rng.standard_normal((out_f, 4)).astype(np.float32) * 0.1
        delta = 2.0 * b @ a
        with torch.no_grad():
            torch_weight.add_(torch.from_numpy(delta.T if conv1d else delta))
        lora[module] = {"a": a, "b": b, "spec": LoraSpec(scale=2.0)}
    ids = random_ids(96, 2, 8, seed=2)
    got = np.asarray(model.apply({"params": params, "lora": unflatten(lora)}, ids))
    np.testing.assert_allclose(got, torch_logits(merged, ids), atol=TOL, rtol=0, err_msg=name)
    assert np.abs(got - torch_logits(reference, ids)).max() > 1e-2  # the adapter did something


@pytest.mark.slow  # second tier: jqlora against itself, no outside reference (tests/README.md)
def test_remat_keeps_lora_gradients():
    """``remat`` (a jax.checkpoint_policies name) recomputes layers in the backward pass
    without changing the adapter gradients; the params tree keeps its HF paths."""
    import jax.numpy as jnp

    from jqlora.lora import LoraSpec
    from jqlora.models import model_for_config

    config = {
        "model_type": "llama",
        "vocab_size": 32,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    }
    model = model_for_config(config)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    assert set(params["model"]["layers"]) == {"0", "1"}
    lora = {
        "model": {
            "layers": {
                "1": {
                    "mlp": {
                        "up_proj": {
                            "a": jnp.full((2, 16), 0.1),
                            "b": jnp.full((32, 2), 0.1),
                            "spec": LoraSpec(0.5),
                        }
                    }
                }
            }
        }
    }
    ids = jnp.asarray(random_ids(32, 2, 6))

    def loss(lora, m):
        return jnp.mean(m.apply({"params": params, "lora": lora}, ids) ** 2)

    plain = jax.grad(loss)(lora, model)
    remat = jax.grad(loss)(lora, model.clone(remat="nothing_saveable"))
    for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(remat), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)
