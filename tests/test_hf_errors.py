"""Bad checkpoints and settings fail with an error that names the file and the tensor."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jqlora
from jqlora.models import model_for_config

CONFIG = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    model = model_for_config(CONFIG)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]
    jqlora.save_hf(path, model, params)
    return path


def variant(good, tmp_path, *, config=None, edit=None):
    path = tmp_path / "ckpt"
    shutil.copytree(good, path)
    if config is not None:
        (path / "config.json").write_text(
            json.dumps({**json.loads((good / "config.json").read_text()), **config})
        )
    if edit is not None:
        tensors = load_file(path / "model.safetensors")
        edit(tensors)
        save_file(tensors, path / "model.safetensors")
    return path


def test_the_good_checkpoint_loads(good):
    model, params = jqlora.load_hf(good)
    assert model.apply({"params": params}, np.ones((1, 3), np.int32)).shape == (1, 3, 64)


def test_unsupported_model_type_lists_supported(good, tmp_path):
    with pytest.raises(
        ValueError,
        match=r"config.json: unsupported model_type 'bert'; supported: gemma2, gemma3, gemma3_text, gpt2, llama, mistral, opt, phi3, qwen2, qwen3",
    ):
        jqlora.load_hf(variant(good, tmp_path, config={"model_type": "bert"}))


def test_missing_tensor(good, tmp_path):
    path = variant(good, tmp_path, edit=lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(
        ValueError, match=r"missing tensor\(s\) 'model.layers.0.mlp.up_proj.weight'"
    ):
        jqlora.load_hf(path)


def test_unexpected_tensor(good, tmp_path):
    path = variant(
        good,
        tmp_path,
        edit=lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}),
    )
    with pytest.raises(
        ValueError, match=r"model.safetensors: unexpected tensor 'model.layers.0.mlp.extra.weight'"
    ):
        jqlora.load_hf(path)


def test_shape_disagrees_with_config(good, tmp_path):
    path = variant(good, tmp_path, config={"intermediate_size": 48})
    with pytest.raises(
        ValueError,
        match=r"model.safetensors: tensor 'model.layers.0.mlp.\w+_proj.weight' has shape .* config.json implies",
    ):
        jqlora.load_hf(path)


def test_truncated_safetensors(good, tmp_path):
    path = variant(good, tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"model.safetensors: truncated: .* first 'model\.[\w.]+'"):
        jqlora.load_hf(path)


@pytest.mark.parametrize(
    "qc,message",
    [
        ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq' is not supported"),
        ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "only 4-bit bitsandbytes"),
        (
            {
                "quant_method": "bitsandbytes",
                "load_in_4bit": True,
                "bnb_4bit_quant_storage": "bfloat16",
            },
            "quant_storage 'bfloat16'",
        ),
    ],
)
def test_unsupported_quantization_config(good, tmp_path, qc, message):
    with pytest.raises(ValueError, match=f"config.json: .*{message}"):
        jqlora.load_hf(variant(good, tmp_path, config={"quantization_config": qc}))


def test_bad_quant_settings():
    with pytest.raises(ValueError, match="quant_type 'int4'"):
        jqlora.QuantConfig("int4")
    with pytest.raises(ValueError, match="blocksize 48"):
        jqlora.QuantConfig(blocksize=48)


def test_skip_modules_follow_transformers():
    q = jqlora.QuantConfig(skip_modules=("lm_head", "model.layers.1", "mlp.gate"))
    assert not q.quantizes("lm_head")
    assert not q.quantizes("model.layers.1.self_attn.q_proj")
    assert q.quantizes("model.layers.11.self_attn.q_proj")
    assert q.quantizes("model.layers.0.mlp.gate_proj")
