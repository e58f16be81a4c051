"""Bad checkpoints and adapters: `load_hf` and `load_peft_adapter` answer each with one
ValueError that names the file (and the tensor or field) and what was expected.

A tiny Llama (one layer, width 32) is written by `save_hf` / `save_peft_adapter` once per
module; each case copies it and breaks one thing. Cases that fail before any tensor is read
take milliseconds; the property tests check that *any* truncation or header corruption is
such an error, never an exception from deeper down.
"""

from __future__ import annotations

import json
import re
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

import jqlora
from jqlora.hf.load import check_checkpoint_path
from jqlora.hf.quantize_cli import quantize_checkpoint
from jqlora.lora import LoraConfig
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
UP = "model.layers.0.mlp.up_proj.weight"
FAST = settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(checkpoint dir, float params)`` of a tiny Llama saved by save_hf."""
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    model = model_for_config(CONFIG)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]
    jqlora.save_hf(path, model, params)
    return path, params


@pytest.fixture
def copy(tiny, tmp_path):
    """A fresh copy of the tiny checkpoint to break."""
    path = tmp_path / "ckpt"
    shutil.copytree(tiny[0], path)
    return path


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v != ...}))
    return path


def edit_tensors(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")
    return path


def raw_header(entries: dict) -> bytes:
    """A safetensors file whose header is ``entries`` (and 64 zero bytes of data)."""
    header = json.dumps(entries).encode()
    return struct.pack("<Q", len(header)) + header + bytes(64)


# ------------------------------------------------------------------ paths and config.json


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match=r"/nope: no such file or directory"):
        jqlora.load_hf(tmp_path / "nope")


def test_a_file_that_is_not_a_checkpoint(copy):
    with pytest.raises(ValueError, match=r"config.json: not a checkpoint: expected a Hugging Face"):
        jqlora.load_hf(copy / "config.json")


def test_a_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match=r": no config.json \(expected a Hugging Face"):
        jqlora.load_hf(tmp_path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{oops", "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got a list"),
        ('"llama"', "expected a JSON object, got a str"),
    ],
)
def test_config_that_is_not_a_json_object(copy, text, message):
    (copy / "config.json").write_text(text)
    with pytest.raises(ValueError, match=f"ckpt/config.json: {message}"):
        jqlora.load_hf(copy)


@pytest.mark.parametrize("model_type", ["bert", None, 3, ["llama"], ...])
def test_unknown_model_type_lists_the_supported_ones(copy, model_type):
    with pytest.raises(
        ValueError,
        match=r"config.json: unsupported model_type .*; supported: gemma2, gemma3, gemma3_text, gpt2, llama, mistral, opt, phi3, qwen2, qwen3",
    ):
        jqlora.load_hf(edit_config(copy, model_type=model_type))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hidden_size": ...}, "model_type 'llama' needs the key 'hidden_size'"),
        ({"hidden_size": "32"}, "hidden_size must be a positive integer, got '32'"),
        ({"hidden_size": -32}, "hidden_size must be a positive integer, got -32"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer, got 0"),
        ({"vocab_size": 0}, "vocab_size must be a positive integer, got 0"),
        ({"intermediate_size": 6.5}, "intermediate_size must be a positive integer"),
        ({"num_attention_heads": 5}, "hidden size 32 is not divisible by the 5 attention heads"),
        ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of"),
    ],
)
def test_config_sizes_are_checked_before_any_tensor(copy, changes, message):
    with pytest.raises(ValueError, match=f"config.json: {message}"):
        jqlora.load_hf(edit_config(copy, **changes))
    with pytest.raises(ValueError, match=message):  # the commands' check before loading
        check_checkpoint_path(copy)


# ------------------------------------------------------------------ tensors


def test_missing_tensor(copy):
    edit_tensors(copy, lambda t: t.pop(UP))
    with pytest.raises(ValueError, match=rf"ckpt: missing tensor\(s\) '{UP}'"):
        jqlora.load_hf(copy)


def test_extra_tensor(copy):
    edit_tensors(copy, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(3, "f4")}))
    with pytest.raises(
        ValueError, match=r"model.safetensors: unexpected tensor 'model.layers.0.mlp.extra.weight'"
    ):
        jqlora.load_hf(copy)


@pytest.mark.parametrize("shape", [(64, 31), (32, 64), (64,), ()])
def test_misshapen_tensor(copy, shape):
    edit_tensors(copy, lambda t: t.update({UP: np.zeros(shape, np.float32)}))
    message = (
        f"model.safetensors: tensor '{UP}' has shape {shape}, but config.json implies (64, 32)"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        jqlora.load_hf(copy)


@pytest.mark.parametrize("dtype", ["int32", "uint8", "bool"])
def test_non_float_weight(copy, dtype):
    """transformers would cast it silently; a weight stored as integers is a broken file."""
    edit_tensors(copy, lambda t: t.update({UP: np.zeros((64, 32), dtype)}))
    with pytest.raises(ValueError, match=rf"tensor '{UP}' has dtype {dtype}; a weight must be"):
        jqlora.load_hf(copy, quantization=jqlora.QuantConfig())


def test_nan_and_inf_weights_load_and_quantize_as_bitsandbytes_does(copy):
    """A NaN or inf in a weight is not an input error: transformers loads it, and
    bitsandbytes quantizes it (its block's absmax becomes NaN / inf). jqlora does the same,
    byte for byte, so the value is visible to whoever inspects the model."""
    from bnb_reference import bnbf, torch

    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    w[3, 5], w[40, 0], w[63, 31] = np.nan, np.inf, -np.inf
    edit_tensors(copy, lambda t: t.update({UP: w}))
    _, params = jqlora.load_hf(copy, quantization=jqlora.QuantConfig("nf4", double_quant=False))
    qt = params["model"]["layers"]["0"]["mlp"]["up_proj"]["weight"]
    packed, state = bnbf.quantize_4bit(torch.from_numpy(w), quant_type="nf4")
    assert np.array_equal(np.asarray(qt.codes).reshape(-1), packed.numpy().reshape(-1))
    assert np.array_equal(np.asarray(qt.absmax), state.absmax.numpy(), equal_nan=True)


# ------------------------------------------------------------------ the safetensors file


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", r"not a safetensors file \(only 0 bytes\)"),
        (b"\x10\x00", r"not a safetensors file \(only 2 bytes\)"),
        (struct.pack("<Q", 2**62) + b"{}", "truncated or not a safetensors file"),
        (struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc", "corrupt safetensors header"),
        (raw_header([1, 2]), r"corrupt safetensors header \(a JSON list, not an object\)"),
        (raw_header({UP: 3}), f"tensor '{UP}': expected an object"),
        (raw_header({UP: {"dtype": "F32", "shape": [64, 32]}}), "data_offsets None is not"),
        (
            raw_header({UP: {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}),
            r"shape \[-1\] is not a list of integers >= 0",
        ),
        (
            raw_header({UP: {"dtype": "F32", "shape": [4], "data_offsets": [8, 4]}}),
            r"data_offsets \[8, 4\] is not \[start, end\]",
        ),
        (
            raw_header({UP: {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}),
            r"60 bytes for shape \[4, 4\] F32 \(64 needed\)",
        ),
        (
            raw_header({UP: {"dtype": 7, "shape": [4], "data_offsets": [0, 16]}}),
            "dtype 7 is not a string",
        ),
    ],
)
def test_garbage_or_corrupt_header(copy, data, message):
    (copy / "model.safetensors").write_bytes(data)
    with pytest.raises(ValueError, match=f"model.safetensors: .*{message}"):
        jqlora.load_hf(copy)


@FAST
@given(keep=st.floats(0.0, 0.9999))
def test_any_truncation_is_reported_with_the_file(tiny, tmp_path_factory, keep):
    path = tmp_path_factory.mktemp("cut") / "ckpt"
    shutil.copytree(tiny[0], path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: int(keep * len(data))])
    with pytest.raises(ValueError, match=r"ckpt/model.safetensors: (truncated|not a safetensors)"):
        jqlora.load_hf(path)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(position=st.integers(8, 10**6), byte=st.integers(0, 255))
def test_any_corrupt_header_byte_is_a_value_error_naming_the_checkpoint(
    tiny, tmp_path_factory, position, byte
):
    """One byte of the JSON header replaced by anything: the load either fails with a
    ValueError naming the checkpoint or the file, or (a digit of a number changed into an
    equivalent) succeeds. Never a KeyError, TypeError or an XLA error."""
    path = tmp_path_factory.mktemp("flip") / "ckpt"
    shutil.copytree(tiny[0], path)
    data = bytearray((path / "model.safetensors").read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 + position % n] = byte
    (path / "model.safetensors").write_bytes(bytes(data))
    try:
        jqlora.load_hf(path)
    except ValueError as e:
        assert str(path) in str(e), str(e)


@pytest.mark.parametrize(
    "index, message",
    [
        ("{nope", "not a JSON object"),
        ("[]", "not a JSON object"),
        ("{}", 'expected a "weight_map" object'),
        (json.dumps({"weight_map": {UP: 3}}), 'expected a "weight_map" object'),
        (json.dumps({"weight_map": {UP: "other.safetensors"}}), "lists shard other.safetensors"),
    ],
)
def test_bad_shard_index(copy, index, message):
    (copy / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match=f"model.safetensors.index.json: {message}"):
        jqlora.load_hf(copy)


def test_no_safetensors_file(copy):
    (copy / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"ckpt: no model.safetensors, .* file"):
        jqlora.load_hf(copy)


# ------------------------------------------------------------------ pre-quantized checkpoints


@pytest.fixture(scope="module")
def nf4_dir(tiny, tmp_path_factory):
    return quantize_checkpoint(tiny[0], tmp_path_factory.mktemp("nf4") / "ckpt")


def test_prequantized_weight_with_truncated_absmax(nf4_dir, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(nf4_dir, path)
    edit_tensors(path, lambda t: t.update({f"{UP}.absmax": t[f"{UP}.absmax"][:-1]}))
    with pytest.raises(
        ValueError, match=rf"tensor '{UP}': not a valid bitsandbytes 4-bit weight .*absmax has"
    ):
        jqlora.load_hf(path)


def test_prequantized_quant_state_that_lies_about_the_shape(nf4_dir, tmp_path):
    """The same number of weights under another shape: only config.json can tell."""
    path = tmp_path / "ckpt"
    shutil.copytree(nf4_dir, path)
    key = f"{UP}.quant_state.bitsandbytes__nf4"

    def lie(t):
        meta = json.loads(t[key].tobytes())
        meta["shape"] = [32, 64]
        t[key] = np.frombuffer(json.dumps(meta).encode(), np.uint8).copy()

    edit_tensors(path, lie)
    with pytest.raises(
        ValueError,
        match=rf"tensor '{UP}' has shape \(32, 64\), but config.json implies \(64, 32\)",
    ):
        jqlora.load_hf(path)


# ------------------------------------------------------------------ GGUF paths


@pytest.mark.parametrize(
    "content, message",
    [
        (b"hello, not gguf", r"not a GGUF file \(no b'GGUF' magic: it starts with b'hell'\)"),
        (b"", r"not a GGUF file \(no b'GGUF' magic: the file is empty\)"),
        (None, "no such GGUF file"),
        ("dir", "a directory, not a GGUF file"),
    ],
)
def test_gguf_path_that_is_not_gguf(tmp_path, content, message):
    path = tmp_path / "model.gguf"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=f"model.gguf: {message}"):
        jqlora.load_hf(path)


def test_load_hf_settings(tiny):
    with pytest.raises(ValueError, match="quantization must be a QuantConfig or None, got 'nf4'"):
        jqlora.load_hf(tiny[0], quantization="nf4")
    with pytest.raises(ValueError, match="dtype must be a floating-point dtype, got int32"):
        jqlora.load_hf(tiny[0], dtype=jnp.int32)
    with pytest.raises(ValueError, match="dtype 'floaty' is not a dtype"):
        jqlora.load_hf(tiny[0], dtype="floaty")
    with pytest.raises(ValueError, match="skip_modules must be module names"):
        jqlora.QuantConfig(skip_modules=("lm_head", ""))
    with pytest.raises(ValueError, match="double_quant must be True or False"):
        jqlora.QuantConfig(double_quant="yes")


# ================================================================== PEFT adapters

TARGETS = ["q_proj", "v_proj"]
Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    config = LoraConfig(r=4, alpha=8, target_modules=TARGETS)
    lora = jqlora.init_lora(jax.random.key(0), tiny[1], config)
    jqlora.save_peft_adapter(path, lora, config)
    return path


@pytest.fixture
def adapter_copy(adapter, tmp_path):
    path = tmp_path / "adapter"
    shutil.copytree(adapter, path)
    return path


def edit_adapter(path, config=None, tensors=None):
    if config is not None:
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg.update(config)
        cfg = {k: v for k, v in cfg.items() if v is not ...}
        (path / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        t = load_file(path / "adapter_model.safetensors")
        tensors(t)
        save_file(t, path / "adapter_model.safetensors")
    return path


def rename(old: str, new: str):
    return lambda t: t.update({new: t.pop(old)})


def test_the_adapter_loads(tiny, adapter):
    lora, config = jqlora.load_peft_adapter(adapter, tiny[1])
    assert config.r == 4 and sorted(lora["model"]["layers"]["0"]["self_attn"]) == TARGETS


@pytest.mark.parametrize(
    "new_prefix, suffix, message",
    [
        ("model.model.layers.0.self_attn.q_proj", "", "does not start with 'base_model.model.'"),
        (
            "base_model.model.layers.0.self_attn.q_proj",
            "",
            "has no module in params: no 'layers' under the top level",
        ),
        (Q, ".default", "unsupported key"),  # PEFT strips the adapter name when it saves
    ],
)
def test_wrong_key_prefixes(tiny, adapter_copy, new_prefix, suffix, message):
    def move(t):
        for x in "AB":
            t[f"{new_prefix}.lora_{x}{suffix}.weight"] = t.pop(f"{Q}.lora_{x}.weight")

    edit_adapter(adapter_copy, tensors=move)
    with pytest.raises(ValueError, match=f"adapter.*{message}"):
        jqlora.load_peft_adapter(adapter_copy, tiny[1])


@FAST
@given(r=st.integers(1, 12), pattern=st.booleans())
def test_rank_must_agree_with_adapter_config(tiny, adapter, tmp_path_factory, r, pattern):
    """The tensors have rank 4; a config (r, or a rank_pattern entry for q_proj) that says
    otherwise is refused, as PEFT's load_state_dict refuses the size mismatch."""
    path = tmp_path_factory.mktemp("rank") / "adapter"
    shutil.copytree(adapter, path)
    edit_adapter(path, config={"rank_pattern": {"q_proj": r}} if pattern else {"r": r})
    if r == 4:
        jqlora.load_peft_adapter(path, tiny[1])
    else:
        with pytest.raises(
            ValueError,
            match=rf"adapter_config.json gives rank {r} \(r or rank_pattern\), but lora_A and "
            r"lora_B have rank 4",
        ):
            jqlora.load_peft_adapter(path, tiny[1])


def test_missing_files(adapter_copy, tmp_path):
    with pytest.raises(ValueError, match="nope: no such adapter directory"):
        jqlora.load_peft_adapter(tmp_path / "nope")
    with pytest.raises(ValueError, match="adapter_config.json: not a directory"):
        jqlora.load_peft_adapter(adapter_copy / "adapter_config.json")
    (adapter_copy / "adapter_model.safetensors").rename(adapter_copy / "adapter_model.bin")
    with pytest.raises(
        ValueError, match=r"adapter: no adapter_model.safetensors \(found adapter_model.bin"
    ):
        jqlora.load_peft_adapter(adapter_copy)
    (adapter_copy / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match="adapter: no adapter_config.json; not a PEFT adapter"):
        jqlora.load_peft_adapter(adapter_copy)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"r": ...}, "r is missing"),
        ({"r": "four"}, "r must be a positive integer, got 'four'"),
        ({"r": 0}, "r must be a positive integer, got 0"),
        ({"r": 2.5}, "r must be a positive integer, got 2.5"),
        ({"lora_alpha": ...}, "lora_alpha is missing"),
        ({"lora_alpha": -8}, "lora_alpha must be a positive number, got -8"),
        ({"lora_alpha": "x"}, "lora_alpha must be a positive number"),
        ({"lora_dropout": 1.5}, r"lora_dropout must be a number in \[0, 1\)"),
        ({"target_modules": ...}, "target_modules is missing"),
        ({"target_modules": 3}, "target_modules must be a regex string or a non-empty list"),
        ({"target_modules": []}, "target_modules must be a regex string or a non-empty list"),
        ({"target_modules": "("}, "target_modules is not a valid regex"),
        ({"use_dora": "yes"}, "use_dora must be true or false"),
        ({"rank_pattern": [1]}, "rank_pattern must be an object"),
        ({"rank_pattern": {"(": 4}}, r"rank_pattern key '\(' is not a valid regex"),
        ({"alpha_pattern": {"q_proj": 0}}, r"alpha_pattern\['q_proj'\] must be a positive number"),
        ({"peft_type": "IA3"}, "peft_type is 'IA3'; only LORA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save=.* is not supported"),
    ],
)
def test_adapter_config_fields(tiny, adapter_copy, changes, message):
    edit_adapter(adapter_copy, config=changes)
    with pytest.raises(ValueError, match=f"adapter_config.json: {message}"):
        jqlora.load_peft_adapter(adapter_copy, tiny[1])


@pytest.mark.parametrize("text", ["{oops", "[1]", ""])
def test_adapter_config_that_is_not_a_json_object(adapter_copy, text):
    (adapter_copy / "adapter_config.json").write_text(text)
    with pytest.raises(ValueError, match="adapter_config.json: (not valid JSON|expected a JSON)"):
        jqlora.load_peft_adapter(adapter_copy)


def test_target_modules_that_do_not_exist_in_the_model(tiny, adapter_copy):
    """PEFT refuses such an adapter (NoMatchingPeftModuleError); so does jqlora."""
    edit_adapter(adapter_copy, config={"target_modules": ["query", "value"]})
    with pytest.raises(
        ValueError,
        match=r"target_modules \['query', 'value'\] select no linear layer of the model. "
        r"Linear module names available: \['down_proj'",
    ):
        jqlora.load_peft_adapter(adapter_copy, tiny[1])


@pytest.mark.parametrize(
    "edit, message",
    [
        (rename(f"{Q}.lora_A.weight", f"{Q.replace('q_proj', 'qkv')}.lora_A.weight"), "needs both"),
        (
            lambda t: [
                rename(f"{Q}.lora_{x}.weight", f"{Q[:-6]}qkv.lora_{x}.weight")(t) for x in "AB"
            ],
            r"no 'qkv' under model.layers.0.self_attn \(there: \['k_proj'",
        ),
        (
            lambda t: [
                rename(f"{Q}.lora_{x}.weight", Q.replace(".0.", ".7.") + f".lora_{x}.weight")(t)
                for x in "AB"
            ],
            r"no '7' under model.layers \(there: \['0'\]\)",
        ),
        (
            lambda t: t.update({f"{Q}.lora_A.weight": np.zeros((4, 31), np.float32)}),
            r"a \(4, 31\) and b \(32, 4\) do not fit the weight \(32, 32\)",
        ),
        (
            lambda t: t.update({f"{Q}.lora_B.weight": np.zeros((4,), np.float32)}),
            r"lora_A \(4, 32\) and lora_B \(4,\) are not \[r, in\] and \[out, r\]",
        ),
        (
            lambda t: t.update({f"{Q}.lora_A.weight": np.zeros((4, 32), np.int32)}),
            f"tensor '{Q}.lora_A.weight' has dtype I32; adapter weights are floating-point",
        ),
        (lambda t: t.clear(), "holds no tensors"),
    ],
)
def test_adapter_tensors_that_do_not_fit(tiny, adapter_copy, edit, message):
    edit_adapter(adapter_copy, tensors=edit)
    with pytest.raises(ValueError, match=f"adapter.*{message}"):
        jqlora.load_peft_adapter(adapter_copy, tiny[1])


@FAST
@given(keep=st.floats(0.0, 0.9999))
def test_truncated_adapter_file(adapter, tmp_path_factory, keep):
    path = tmp_path_factory.mktemp("cut") / "adapter"
    shutil.copytree(adapter, path)
    file = path / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: int(keep * len(data))])
    with pytest.raises(
        ValueError, match="adapter_model.safetensors: (truncated|not a safetensors)"
    ):
        jqlora.load_peft_adapter(path)
