"""`jqlora export` / `save_gguf` against independent readers: transformers' GGUF loader reads
the exported model (logits equal to the merged model's, and to PEFT's unmerged adapter), its
tokenizer (the same ids as the source tokenizer) and, applied by hand with
``gguf.GGUFReader``, the adapter-only file (the merged logits again)."""

from __future__ import annotations

import shutil
import subprocess

import gguf
import numpy as np
import pytest
import torch
from adapter_reference import jqlora_logits, load_torch, peft_config, torch_logits
from finetune_tiny import CHATML, make_tokenizer
from hf_reference import make_tiny

from jqlora.app.cli import main
from jqlora.hf import names as names_lib
from jqlora.hf.ollama import modelfile_text

TEXT = (
    "The quick brown fox, 42 times! Grüße aus Köln, ça va très bien. Привет, как дела? "
    "你好，世界。こんにちは。مرحبا بالعالم. 🦙 Ünïcödé\n\ttabs and  spaces."
)
TEXTS = [TEXT, "user assistant system", "What is 17 plus 25? Answer: 42."] * 4


def _config(family: str, vocab: int, **overrides):
    import transformers
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    if family == "llama":  # head_dim 32 != hidden / heads: the key_length keys are needed
        return LlamaConfig(**common, head_dim=32, rope_theta=50000.0, tie_word_embeddings=False)
    if family == "qwen2":  # q/k/v biases, tied embeddings, NeoX RoPE (no q/k row reordering)
        return Qwen2Config(**common, tie_word_embeddings=True)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None, tie_word_embeddings=False)
    # transformers' GGUF loader drops Qwen3's key_length, Gemma 2's soft-caps and
    # query_pre_attn_scalar, Phi-3's partial rotary factor: these use its defaults for them
    # (head_dim 128 / 256), so its model is the exported one
    extra = {
        "qwen3": dict(head_dim=128, tie_word_embeddings=False),  # q/k norms
        "gemma2": dict(head_dim=256, sliding_window=4),  # 4 norms, soft-caps, window
        "gemma3": dict(head_dim=256, sliding_window=4, num_hidden_layers=6),  # q/k norms
        "phi3": dict(tie_word_embeddings=False),  # fused qkv_proj and gate_up_proj
    }[family]  # fmt: skip
    cls = {"qwen3": "Qwen3Config", "gemma2": "Gemma2Config", "gemma3": "Gemma3TextConfig"}
    return getattr(transformers, cls.get(family, "Phi3Config"))(**{**common, **extra, **overrides})


def _relative_error(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def _transformers_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


# Phi-3's fused matrices take the place of Llama's q/k/v and gate/up
PHI3_LORA = dict(
    target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    rank_pattern={"o_proj": 2}, alpha_pattern={"o_proj": 3},
)  # fmt: skip


@pytest.fixture(
    scope="module", params=["llama", "qwen2", "mistral", "qwen3", "gemma2", "gemma3", "phi3"]
)
def tiny(request, tmp_path_factory):
    """A tiny model of the family with a byte-level BPE tokenizer, a PEFT adapter with
    per-module ranks and alphas, the ids of TEXT, and the merged model's logits."""
    import jax.numpy as jnp
    from peft import get_peft_model

    from jqlora.hf import load_hf
    from jqlora.hf.peft import load_peft_adapter
    from jqlora.lora.merge import merge_lora

    tmp = tmp_path_factory.mktemp(request.param)
    tok = make_tokenizer(TEXTS)
    make_tiny(_config(request.param, len(tok)), tmp / "base")
    tok.save_pretrained(tmp / "base")
    lora_kwargs = PHI3_LORA if request.param == "phi3" else {}
    peft_model = get_peft_model(
        load_torch(tmp / "base"), peft_config("llama", "plain", **lora_kwargs)
    )
    peft_model.save_pretrained(tmp / "adapter")
    ids = np.asarray([tok(TEXT)["input_ids"]])
    model, params = load_hf(tmp / "base", dtype=jnp.float32)
    lora, _ = load_peft_adapter(tmp / "adapter", params)
    merged_params = merge_lora(params, lora)
    merged = jqlora_logits(model, merged_params, ids)
    # jqlora's merged model is PEFT's adapted one (test_merge.py); here as a sanity check
    assert _relative_error(merged, torch_logits(peft_model.eval(), ids)) < 1e-4
    return dict(
        dir=tmp, family=request.param, tok=tok, ids=ids, merged=merged, model=model,
        merged_params=merged_params,
    )  # fmt: skip


def _export(tiny, name, *extra) -> object:
    out = tiny["dir"] / name
    argv = ["export", "--model", str(tiny["dir"] / "base"), "--out", str(out), *extra]
    assert main(argv) == 0
    return out


def test_merged_f32_export_computes_the_merged_model(tiny):
    out = _export(
        tiny, "merged-f32.gguf", "--adapter", str(tiny["dir"] / "adapter"), "--outtype", "f32"
    )
    got = torch_logits(_transformers_gguf(out), tiny["ids"])
    # measured: 0.5-1.5e-6 (float32 rounding of two implementations); 1e-4 is the bound asked for
    assert _relative_error(got, tiny["merged"]) <= 1e-4


def test_merged_q8_0_export_is_close(tiny):
    out = _export(
        tiny, "merged-q8.gguf", "--adapter", str(tiny["dir"] / "adapter"), "--outtype", "q8_0"
    )
    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_output.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    got = torch_logits(_transformers_gguf(out), tiny["ids"])
    # The exact reference: the merged model with each matrix rounded through Q8_0 (gguf.quants;
    # the q/k row reordering moves whole rows, so it commutes with the rounding).
    q8 = gguf.GGMLQuantizationType.Q8_0
    rounded = {
        k: gguf.quants.dequantize(gguf.quants.quantize(np.asarray(v), q8), q8) if v.ndim == 2 else v
        for k, v in names_lib.flatten(tiny["merged_params"]).items()
    }
    want = jqlora_logits(tiny["model"], names_lib.unflatten(rounded), tiny["ids"])
    assert _relative_error(got, want) <= 1e-4  # measured: 0.8-1e-6
    # against the unrounded model: 8-bit rounding (0.5 % RMS per matrix) moves the logits of
    # a random tiny model by up to 3.5 % of their range (measured; 1.7-3.5 % by family, 33 %
    # for the six-layer Gemma 3, whose (1 + w) norms and embedding scale amplify it)
    assert _relative_error(got, tiny["merged"]) <= (0.6 if tiny["family"] == "gemma3" else 1e-1)


def test_tokenizer_read_back_encodes_like_the_source(tiny):
    from transformers import AutoTokenizer

    out = _export(tiny, "tok.gguf", "--outtype", "f16")
    back = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    source = tiny["tok"]
    assert back(TEXT)["input_ids"] == source(TEXT)["input_ids"]
    assert back.eos_token == source.eos_token and back.bos_token == source.bos_token
    messages = [{"role": "user", "content": "Grüße? 你好"}]
    assert back.apply_chat_template(messages, tokenize=False) == source.apply_chat_template(
        messages, tokenize=False
    )
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    im_end = source.convert_tokens_to_ids("<|im_end|>")
    assert reader.fields["tokenizer.ggml.token_type"].contents(im_end) == gguf.TokenType.CONTROL


def _rewrite_gguf(src, dst, replace: dict) -> None:
    """A copy of GGUF file ``src`` with some tensors replaced (float32)."""
    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, replace.get(t.name, np.asarray(t.data)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_adapter_gguf_applied_by_hand_gives_the_merged_model(tiny):
    base = _export(tiny, "base-f32.gguf", "--outtype", "f32")
    adapter = _export(
        tiny, "adapter.gguf", "--adapter", str(tiny["dir"] / "adapter"), "--adapter-only"
    )
    reader = gguf.GGUFReader(str(adapter))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["general.architecture"].contents() == (
        "llama" if tiny["family"] == "mistral" else tiny["family"]
    )
    alpha = reader.fields["adapter.lora.alpha"].contents()
    lora = {t.name: np.asarray(t.data, np.float32) for t in reader.tensors}
    projections = len(PHI3_LORA["target_modules"]) if tiny["family"] == "phi3" else 7
    layers = tiny["model"].config.hf["num_hidden_layers"]
    assert len(lora) == 2 * projections * layers  # a and b of each projection
    weights = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(base)).tensors}
    merged = {}
    for name in lora:
        if name.endswith(".lora_a"):
            w = name.removesuffix(".lora_a")
            a, b = lora[name], lora[w + ".lora_b"]
            assert a.shape[1] == weights[w].shape[1] and b.shape[0] == weights[w].shape[0]
            # llama.cpp: W x + (alpha / r) B A x, r = the rows of A
            merged[w] = weights[w] + np.float32(alpha / a.shape[0]) * (b @ a)
    by_hand = tiny["dir"] / "by-hand.gguf"
    _rewrite_gguf(base, by_hand, merged)
    got = torch_logits(_transformers_gguf(by_hand), tiny["ids"])
    assert _relative_error(got, tiny["merged"]) <= 1e-4  # measured: 0.6-2.3e-6


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)  # one family is enough
def test_bnb_4bit_base_exports_its_dequantized_weights(tiny):
    """A bitsandbytes 4-bit checkpoint (``jqlora quantize``) exports as the float model it
    stands for: the f32 GGUF computes what transformers + bitsandbytes compute on it."""
    from adapter_reference import bnb_nf4_config, exact_nf4
    from transformers import AutoModelForCausalLM

    nf4 = tiny["dir"] / "base-nf4"
    assert main(["quantize", str(tiny["dir"] / "base"), str(nf4)]) == 0
    reference = AutoModelForCausalLM.from_pretrained(
        tiny["dir"] / "base", quantization_config=bnb_nf4_config(), device_map="cpu"
    )
    out = tiny["dir"] / "from-nf4.gguf"
    assert main(["export", "--model", str(nf4), "--out", str(out), "--outtype", "f32"]) == 0
    got = torch_logits(_transformers_gguf(out), tiny["ids"])
    want = torch_logits(exact_nf4(reference), tiny["ids"])
    assert _relative_error(got, want) <= 1e-4  # measured: 0 (the same float weights)


def test_modelfile_is_written_beside_the_export(tiny):
    out = _export(tiny, "chat.gguf", "--adapter", str(tiny["dir"] / "adapter"), "--outtype", "q8_0")
    text = out.with_suffix(".Modelfile").read_text()
    assert text.startswith("FROM ./chat.gguf\n")
    assert "TEMPLATE" in text and "<|im_start|>{{ .Role }}" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text
    assert "SYSTEM" not in text  # the tiny model's template has no default system prompt
    # a default system prompt in the Jinja template (SmolLM2's) becomes SYSTEM
    jinja = "{{ '<|im_start|>system\nYou are SmolLM.<|im_end|>\n' }}" + CHATML
    assert 'SYSTEM """You are SmolLM."""' in modelfile_text("./m.gguf", jinja, "<|im_end|>")


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

func main() {
	src, _ := os.ReadFile(os.Args[1])
	var data map[string]any
	json.NewDecoder(os.Stdin).Decode(&data)
	t := template.Must(template.New("m").Parse(string(src)))
	if err := t.Execute(os.Stdout, data); err != nil {
		panic(err)
	}
}
"""


@pytest.mark.skipif(
    shutil.which("go") is None, reason="needs the Go toolchain (Ollama's templates)"
)
@pytest.mark.parametrize("fmt", ["chatml", "llama3", "inst"])
def test_ollama_template_renders_like_the_jinja_template(tmp_path, fmt):
    """Go's text/template (what Ollama runs) renders the Modelfile's TEMPLATE as transformers
    renders a Jinja chat template of that format, for a conversation with a system turn."""
    import json

    from jqlora.hf.ollama import CHAT_FORMATS

    jinja = {
        "chatml": CHATML,
        "llama3": "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>"
        "\\n\\n' + m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
        "inst": "{% set ns = namespace(sys='') %}{% for m in messages %}{% if m['role'] == 'system' %}"
        "{% set ns.sys = m['content'] %}{% elif m['role'] == 'user' %}{{ '[INST] ' }}{% if ns.sys %}"
        "{{ ns.sys + '\\n\\n' }}{% set ns.sys = '' %}{% endif %}{{ m['content'] + '[/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + '</s>' }}{% endif %}{% endfor %}",
    }[fmt]
    tok = make_tokenizer(TEXTS)
    tok.chat_template = jinja
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi, 你好?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
    ]
    (tmp_path / "render.go").write_text(GO_RENDER)
    (tmp_path / "template.txt").write_text(CHAT_FORMATS[fmt].template)
    go_messages = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    rendered = subprocess.run(
        ["go", "run", str(tmp_path / "render.go"), str(tmp_path / "template.txt")],
        input=json.dumps({"Messages": go_messages}),
        capture_output=True,
        text=True,
        check=True,
        env={
            **__import__("os").environ,
            "GOCACHE": str(tmp_path / "gocache"),
            "GOPATH": str(tmp_path),
        },
    ).stdout
    assert rendered == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_bad_requests_are_one_line_errors(tiny, tmp_path, capsys):
    base, adapter = str(tiny["dir"] / "base"), str(tiny["dir"] / "adapter")
    cases = [
        (["--adapter-only"], "--adapter-only needs --adapter"),
        (["--adapter", adapter, "--adapter-only", "--outtype", "q4_0"], "an adapter is stored as"),
    ]
    for extra, message in cases:
        assert main(["export", "--model", base, "--out", str(tmp_path / "x.gguf"), *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["export", "--model", base, "--out", str(tmp_path / "x.bin")]) == 2
    assert "ending in .gguf" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


# What transformers' GGUF loader drops, so the logits tests above keep its defaults
DROPPED = {
    "qwen3": dict(head_dim=32),
    "gemma2": dict(head_dim=32, attn_logit_softcapping=40.0, final_logit_softcapping=20.0),
    "gemma3": dict(rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "phi3": dict(partial_rotary_factor=0.5),
}


@pytest.mark.parametrize("family", sorted(DROPPED))
def test_keys_transformers_drops_read_back(family, tmp_path):
    """Against jqlora's GGUF reader (test_gguf_files.py checks it against transformers' loader
    and llama.cpp's converter): the config values transformers' loader drops come back, and
    every tensor is the source's exactly (f32)."""
    from transformers import AutoModelForCausalLM

    from jqlora.hf.gguf_io import read_gguf

    tok = make_tokenizer(TEXTS)
    config = _config(family, len(tok), **DROPPED[family])
    source = make_tiny(config, tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    out = tmp_path / "x.gguf"
    argv = ["export", "--model", str(tmp_path / "base"), "--out", str(out), "--outtype", "f32"]
    assert main(argv) == 0
    got, _, stream = read_gguf(out)
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "base").config.to_dict()
    for key in ("head_dim", "attn_logit_softcapping", "final_logit_softcapping",
                "partial_rotary_factor", "sliding_window", "rope_parameters"):  # fmt: skip
        assert got.get(key) == want.get(key), key
    state = {k: v.numpy() for k, v in source.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    tensors = {name: array for _, name, array in stream}
    assert tensors.keys() == state.keys()
    for name, array in tensors.items():
        # exact, but for Gemma's norms: (1 + w) - 1 rounds w to float32's spacing at 1
        np.testing.assert_allclose(array, state[name], rtol=0, atol=1.2e-7, err_msg=name)


@pytest.mark.slow
def test_smollm2_export_in_transformers(tmp_path):
    """The real SmolLM2-135M with a random adapter on every linear layer: the f32 export
    computes the merged model in transformers, the q8_0 export predicts its tokens, and the
    tokenizer is the source file's, field for field."""
    import jax
    import jax.numpy as jnp
    from transformers import AutoTokenizer

    from jqlora.hf import load_hf
    from jqlora.hf.peft import save_peft_adapter
    from jqlora.hf.smollm2 import HUB_NAME, smollm2_gguf_path
    from jqlora.lora import LoraConfig, init_lora
    from jqlora.lora.merge import merge_lora

    path = smollm2_gguf_path(fetch=True)
    model, params = load_hf(path, dtype=jnp.float32)
    config = LoraConfig(r=8, alpha=16)
    lora = init_lora(jax.random.PRNGKey(0), params, config)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 1000))
    lora = jax.tree.map(
        lambda x: 0.02 * jax.random.normal(next(keys), x.shape) if x.ndim == 2 else x, lora
    )  # a non-zero B, so that the adapter changes the model
    save_peft_adapter(tmp_path / "adapter", lora, config, base_model_name_or_path=HUB_NAME)
    text = "The licenses for most software are designed to take away your freedom to share it."
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids = np.asarray([tokenizer(text)["input_ids"]])
    merged = jqlora_logits(model, merge_lora(params, lora), ids)
    assert _relative_error(merged, jqlora_logits(model, params, ids)) > 1e-2  # the adapter matters

    adapter = str(tmp_path / "adapter")
    for outtype in ("f32", "q8_0"):
        out = tmp_path / f"smollm2-{outtype}.gguf"
        argv = ["export", "--model", str(path), "--adapter", adapter, "--out", str(out)]
        assert main([*argv, "--outtype", outtype]) == 0
        got = torch_logits(_transformers_gguf(out), ids)
        if outtype == "f32":
            assert _relative_error(got, merged) <= 1e-4  # the bound asked for (tiny models: ~1e-6)
        else:
            agreement = (got.argmax(-1) == merged.argmax(-1)).mean()
            assert agreement >= 0.99, agreement

    source, exported = (gguf.GGUFReader(str(p)) for p in (path, out))
    for key, field in source.fields.items():
        if key.startswith("tokenizer."):
            assert exported.fields[key].contents() == field.contents(), key
    modelfile = out.with_suffix(".Modelfile").read_text()
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile

    out = tmp_path / "smollm2-adapter.gguf"
    argv = ["export", "--model", str(path), "--adapter", adapter, "--out", str(out)]
    assert main([*argv, "--adapter-only"]) == 0
    modelfile = out.with_suffix(".Modelfile").read_text()
    assert f"FROM {path.resolve()}\nADAPTER ./smollm2-adapter.gguf\n" in modelfile
