"""`jqlora merge`: the merged checkpoint, loaded by transformers alone, computes what
peft's ``merge_and_unload()`` computes on the same base and adapter (CPU, float32)."""

import json

import numpy as np
import pytest
import torch
from adapter_reference import (
    VOCAB,
    bnb_nf4_config,
    exact_nf4,
    llama64_config,
    load_torch,
    peft_config,
    tiny_configs,
    torch_logits,
)
from hf_reference import make_tiny

from jqlora.app.cli import main

IDS = np.random.default_rng(1).integers(3, VOCAB, size=(2, 6))


def _base_and_adapter(tmp_path, family, variant="plain"):
    from peft import get_peft_model

    make_tiny(tiny_configs()[family], tmp_path / "base")
    peft_model = get_peft_model(load_torch(tmp_path / "base"), peft_config(family, variant))
    peft_model.save_pretrained(tmp_path / "adapter")
    return peft_model


@pytest.mark.parametrize(
    "family,variant",
    [
        ("llama", "plain"),
        ("opt", "plain"),
        ("gpt2", "plain"),
        ("llama", "dora"),
        ("gpt2", "rslora"),
    ],
)
def test_merged_checkpoint_matches_peft_merge(tmp_path, family, variant):
    peft_model = _base_and_adapter(tmp_path, family, variant)
    unmerged = torch_logits(peft_model.eval(), IDS)
    expected = torch_logits(peft_model.merge_and_unload().eval(), IDS)
    np.testing.assert_allclose(expected, unmerged, atol=1e-4)  # peft's merge is exact here too

    argv = [
        "merge",
        "--model",
        str(tmp_path / "base"),
        "--adapter",
        str(tmp_path / "adapter"),
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(argv) == 0
    merged = load_torch(tmp_path / "out")
    assert "lora" not in " ".join(n for n, _ in merged.named_parameters())
    np.testing.assert_allclose(torch_logits(merged, IDS), expected, atol=1e-4, rtol=0)


def test_merge_bfloat16_output(tmp_path):
    _base_and_adapter(tmp_path, "llama")
    out = tmp_path / "out"
    assert (
        main(
            [
                "merge",
                "--model",
                str(tmp_path / "base"),
                "--adapter",
                str(tmp_path / "adapter"),
                "--out",
                str(out),
                "--dtype",
                "bfloat16",
            ]
        )
        == 0
    )
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def _base64_and_adapter(tmp_path):
    from peft import get_peft_model

    make_tiny(llama64_config(), tmp_path / "base")
    get_peft_model(load_torch(tmp_path / "base"), peft_config("llama", "plain")).save_pretrained(
        tmp_path / "adapter"
    )


def test_merge_quantize_nf4_equals_transformers_quantizing_the_merge(tmp_path):
    from transformers import AutoModelForCausalLM

    _base64_and_adapter(tmp_path)
    common = ["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter")]
    assert main(common + ["--out", str(tmp_path / "float")]) == 0
    assert main(common + ["--out", str(tmp_path / "nf4"), "--quantize", "nf4"]) == 0
    ref = AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", quantization_config=bnb_nf4_config(), device_map="cpu"
    )
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map="cpu")
    np.testing.assert_allclose(
        torch_logits(exact_nf4(ours), IDS), torch_logits(exact_nf4(ref), IDS), atol=1e-5
    )


def test_merge_into_4bit_base_uses_the_dequantized_weights(tmp_path):
    """A bitsandbytes 4-bit base merges like PEFT on its dequantized float weights."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _base64_and_adapter(tmp_path)
    q = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=bnb_nf4_config(), device_map="cpu"
    )
    q.save_pretrained(tmp_path / "base4")  # before any forward (bitsandbytes repacks on CPU)
    float_base = load_torch(tmp_path / "base")
    with torch.no_grad():
        for name, module in q.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                float_base.get_submodule(name).weight.copy_(w.float())
    expected = torch_logits(
        PeftModel.from_pretrained(float_base, tmp_path / "adapter").merge_and_unload().eval(), IDS
    )

    out = tmp_path / "out"
    assert (
        main(
            [
                "merge",
                "--model",
                str(tmp_path / "base4"),
                "--adapter",
                str(tmp_path / "adapter"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    np.testing.assert_allclose(torch_logits(load_torch(out), IDS), expected, atol=1e-4, rtol=0)


def test_merge_bad_input(tmp_path, capsys):
    _base_and_adapter(tmp_path, "llama")
    assert (
        main(
            [
                "merge",
                "--model",
                str(tmp_path / "nope"),
                "--adapter",
                str(tmp_path / "adapter"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "--model" in capsys.readouterr().err
    # An adapter made for another architecture names the module it cannot place.
    make_tiny(tiny_configs()["gpt2"], tmp_path / "gpt2")
    assert (
        main(
            [
                "merge",
                "--model",
                str(tmp_path / "gpt2"),
                "--adapter",
                str(tmp_path / "adapter"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "no module in params" in capsys.readouterr().err
