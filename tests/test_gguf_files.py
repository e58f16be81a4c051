"""GGUF files of every architecture jqlora reads, against transformers' GGUF loader.

Tiny files are written with ``gguf.GGUFWriter`` (``gguf_reference.py``): F32/F16 tensors,
block quantizations and k-quants. jqlora's tensors must equal transformers' bit for bit
(same names, same values), and the writer's model within the storage type's error; the
config must describe the model that was written. llama and qwen2, whose jqlora models
exist, also load end to end and give transformers' logits. Then bad files: each one a
ValueError naming the file.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch
from gguf_reference import ARCH_CLASSES, EXTRA, tiny_model, transformers_gguf_tensors, write_gguf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jqlora
from jqlora.hf import names
from jqlora.hf.gguf_io import read_gguf

CONFIG_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "head_dim", "sliding_window", "attn_logit_softcapping", "final_logit_softcapping",
    "layer_types", "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id",
)  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``{arch: (gguf path, the transformers model written into it)}``."""
    out = {}
    for arch in ARCH_CLASSES:
        model = tiny_model(arch)
        path = tmp_path_factory.mktemp(arch) / f"tiny-{arch}.gguf"
        out[arch] = (write_gguf(model, arch, path), model)
    return out


def jqlora_tensors(path) -> dict:
    _, _, stream = read_gguf(path)
    return {hf: np.asarray(a, np.float32) for _, hf, a in stream}


@pytest.mark.parametrize("arch", list(ARCH_CLASSES))
def test_tensors_equal_transformers_gguf_loader(files, arch):
    path, model = files[arch]
    ours, theirs = jqlora_tensors(path), transformers_gguf_tensors(path, arch)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert np.array_equal(ours[name], theirs[name]), name  # bit for bit
    written = {k: v.numpy() for k, v in model.state_dict().items()}
    for name, array in ours.items():
        w = written[name]
        if array.ndim == 1:  # stored F32: exact, but for Gemma's (1 + w) - 1 (one rounding)
            np.testing.assert_allclose(array, w, rtol=0, atol=1e-6)
        elif w.shape[-1] % 256:  # block types (k-quant blocks are random bytes)
            # 4-bit blocks: error up to absmax / 8; a tensor in the wrong place is off by ~|w|
            assert np.abs(array - w).max() <= 0.2 * np.abs(w).max(), name


@pytest.mark.parametrize("arch", list(ARCH_CLASSES))
def test_config_describes_the_written_model(files, arch):
    path, model = files[arch]
    config, _, _ = read_gguf(path)
    want = model.config.to_dict()
    assert config["model_type"] == want["model_type"]
    for key in CONFIG_KEYS:
        got, expected = config.get(key), want.get(key)
        if isinstance(expected, float):  # GGUF stores float32
            assert got == pytest.approx(expected, rel=1e-6), key
        else:
            assert got == expected, key
    # every setting the writer chose is compared (RoPE ones through rope_parameters)
    assert set(EXTRA[arch]) - {"query_pre_attn_scalar"} <= {
        *CONFIG_KEYS,
        "rope_theta",
        "rope_scaling",
    }


@pytest.mark.parametrize("arch", list(ARCH_CLASSES))
def test_load_hf_end_to_end_equals_transformers(files, arch, tmp_path):
    """params bit for bit, logits within float32 rounding of two implementations."""
    from hf_reference import random_ids, torch_logits

    path, _ = files[arch]
    theirs = transformers_gguf_tensors(path, arch)
    model, params = jqlora.load_hf(path)
    flat = {k: np.asarray(v) for k, v in names.flatten(params).items()}
    assert sorted(flat) == sorted(theirs)
    assert all(np.array_equal(flat[k], theirs[k]) for k in flat)
    reference = tiny_model(arch)
    loaded = reference.load_state_dict(
        {k: torch.from_numpy(v) for k, v in theirs.items()}, strict=False
    )
    tied = {"lm_head.weight"} if reference.config.tie_word_embeddings else set()
    assert set(loaded.missing_keys) <= tied and not loaded.unexpected_keys, loaded
    reference.tie_weights()
    ids = random_ids(reference.config.vocab_size, 2, 12)
    logits = np.asarray(model.apply({"params": params}, ids))
    np.testing.assert_allclose(logits, torch_logits(reference, ids), rtol=0, atol=1e-4)  # ~1e-5
    # and saved as a checkpoint transformers loads as the same model
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(jqlora.save_hf(tmp_path / "saved", model, params))
    assert type(saved) is type(reference)
    state = {k: v.numpy() for k, v in saved.state_dict().items()}
    assert all(np.array_equal(state[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("arch", list(ARCH_CLASSES))
def test_tokenizer_from_the_file_equals_transformers(tmp_path, arch):
    from finetune_tiny import chat_records, make_tokenizer, texts_of
    from transformers import AutoTokenizer

    from jqlora.hf.tokenizer import load_tokenizer

    texts = texts_of(chat_records())
    tokenizer = make_tokenizer(texts)
    path = write_gguf(tiny_model(arch), arch, tmp_path / "tok.gguf", tokenizer=tokenizer)
    ours = load_tokenizer(path)
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in texts[:10] + ["What is 12 plus zero? Answer: 12"]:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"] == tokenizer(text)["input_ids"]


# ------------------------------------------------------------------ bad files


def test_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(
        ValueError,
        match=r"bert.gguf: GGUF architecture 'bert' is not supported; supported: gemma2, gemma3, llama, phi3, qwen2, qwen3",
    ):
        jqlora.load_hf(path)


def test_missing_tensor(files, tmp_path):
    path = write_gguf(files["qwen2"][1], "qwen2", tmp_path / "m.gguf", skip={"blk.1.ffn_up.weight"})
    with pytest.raises(
        ValueError, match=r"m.gguf: missing tensor\(s\) \['model.layers.1.mlp.up_proj.weight'\]"
    ):
        jqlora.load_hf(path)


def test_misshapen_tensor(files, tmp_path):
    """A file whose metadata says one width and whose tensors have another."""
    model = tiny_model("qwen2")
    model.model.layers[0].mlp.up_proj.weight.data = torch.zeros(256, 32)
    path = write_gguf(model, "qwen2", tmp_path / "s.gguf")
    with pytest.raises(
        ValueError, match=re.escape("s.gguf: tensor 'blk.0.ffn_up.weight' has shape (256, 32), but")
    ):
        jqlora.load_hf(path)


def test_metadata_without_a_size(files, tmp_path):
    import gguf

    path = tmp_path / "nosize.gguf"
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_embedding_length(64)
    w.add_tensor("token_embd.weight", np.zeros((4, 64), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(
        ValueError, match=r"nosize.gguf: GGUF metadata lacks qwen3.feed_forward_length"
    ):
        jqlora.load_hf(path)


FUZZ = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(keep=st.floats(0.0, 0.9999))
def test_any_truncation_is_a_value_error_naming_the_file(files, tmp_path_factory, keep):
    path = tmp_path_factory.mktemp("cut") / "cut.gguf"
    data = files["qwen2"][0].read_bytes()
    path.write_bytes(data[: max(4, int(keep * len(data)))])  # the magic stays
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: "):
        jqlora.load_hf(path)


@FUZZ
@given(position=st.integers(4, 10**6), byte=st.integers(0, 255))
def test_any_corrupt_metadata_byte_is_a_value_error_or_loads(
    files, tmp_path_factory, position, byte
):
    """One byte of the header or metadata (before the tensor data) replaced: a ValueError
    naming the file, or a load (a change GGUF cannot detect, e.g. in a token string)."""
    import gguf

    source = files["qwen2"][0]
    data = bytearray(source.read_bytes())
    data_start = gguf.GGUFReader(str(source)).data_offset
    data[4 + position % (data_start - 4)] = byte
    path = tmp_path_factory.mktemp("flip") / "flip.gguf"
    path.write_bytes(bytes(data))
    try:
        jqlora.load_hf(path)
    except ValueError as e:
        assert str(path) in str(e), str(e)


def test_a_loaded_copy_of_a_file_equals_the_original(files, tmp_path):
    """The fuzz's 'loads' outcome is a real load: an unchanged copy gives the same params."""
    path = tmp_path / "copy.gguf"
    shutil.copy(files["qwen2"][0], path)
    a = names.flatten(jqlora.load_hf(path)[1])
    b = names.flatten(jqlora.load_hf(files["qwen2"][0])[1])
    assert all(np.array_equal(a[k], b[k]) for k in a)
