"""The memory estimator: exact counts against transformers / peft / bitsandbytes, and the
estimate against XLA's own figure for the compiled train step."""

import json

import bitsandbytes.functional as bnbf
import jax
import jax.numpy as jnp
import peft
import pytest
import torch
import transformers

import jqlora
from jqlora.app.cli import main as cli_main
from jqlora.lora.targets import get_in, linear_modules, set_in
from jqlora.memory import estimate_memory, quantized_bytes
from jqlora.train.step import init_train_state, make_optimizer, make_train_step

LLAMA2_7B = dict(
    model_type="llama",
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


@pytest.mark.parametrize(
    "shape,blocksize,dq",
    [
        ((96, 64), 64, True),
        ((300, 77), 64, True),
        ((128, 256), 128, False),
        ((4096, 520), 64, True),
    ],
)
def test_quantized_bytes_equal_bitsandbytes(shape, blocksize, dq):
    w = torch.randn(shape)
    packed, state = bnbf.quantize_4bit(
        w, blocksize=blocksize, quant_type="nf4", compress_statistics=dq
    )
    ref = (
        packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
    )
    if dq:
        ref += state.state2.absmax.numel() * 4 + 4  # nested absmax (f32) and the offset
    assert quantized_bytes(w.numel(), blocksize, dq) == ref
    assert jqlora.quantize(jnp.asarray(w.numpy()), "nf4", blocksize, dq).nbytes == ref


def test_llama2_7b_figures():
    """The seed's arithmetic on the exact Llama-2-7B shapes (parameters counted by transformers)."""
    with torch.device("meta"):
        hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA2_7B))
    n = sum(p.numel() for p in hf_model.parameters())
    est = estimate_memory(transformers.LlamaConfig(**LLAMA2_7B), jqlora.LoraConfig(r=64), 1, 512)
    assert est.base_params == n == 6_738_415_616
    full = est.column("full fine-tuning")
    # 16 bytes per parameter: 107.8 GB for the exact count (the seed's 112 GB is 16 x 7e9).
    assert full.total_without_activations == 16 * n
    assert 105e9 < full.total_without_activations < 112e9
    # NF4 with double quantization: 0.5 byte + the block constants (1/64 + 4/(64*256)).
    assert est.quantized_bytes / est.quantized_params == pytest.approx(
        0.5 + 1 / 64 + 4 / (64 * 256), rel=1e-4
    )
    assert est.qlora.device["base weights"] < 4e9  # vs 13.5 GB in 16 bits
    assert est.qlora.device["optimizer state"] == 8 * est.lora_params + 4  # + Adam's count
    off = estimate_memory(LLAMA2_7B, jqlora.LoraConfig(r=64), 1, 512, offload=True)
    assert (
        off.qlora.device["optimizer state"] == 0
        and off.qlora.host["optimizer state"] == 8 * est.lora_params + 4
    )
    remat = estimate_memory(LLAMA2_7B, jqlora.LoraConfig(r=64), 1, 512, remat=True)
    assert remat.qlora.device["activations"] < 0.2 * est.qlora.device["activations"]


def test_lora_counts_equal_peft():
    """Trainable parameters as peft counts them, all-linear r=64 and the classic q/v r=8, on
    two Llama-2-7B-wide layers (per-layer counts are what the 32-layer model multiplies)."""
    cfg = {**LLAMA2_7B, "num_hidden_layers": 2}
    for r, targets in ((64, "all-linear"), (8, ["q_proj", "v_proj"])):
        with torch.device("meta"):
            hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
        pm = peft.get_peft_model(
            hf_model, peft.LoraConfig(r=r, lora_alpha=16, target_modules=targets)
        )
        trainable, _ = pm.get_nb_trainable_parameters()
        est = estimate_memory(cfg, jqlora.LoraConfig(r=r, target_modules=targets), 1, 8)
        assert est.lora_params == trainable
    # Llama-2-7B, r=64 on every linear layer: 2.37 % of the parameters.
    assert (
        estimate_memory(LLAMA2_7B, jqlora.LoraConfig(r=64), 1, 8).lora_params == 32 * 4_997_120
    )  # 159,907,840


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_base_counts_equal_transformers(family):
    if family == "gpt2":
        cfg = transformers.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32
        )
    else:
        cfg = transformers.OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=100,
            max_position_embeddings=32,
            word_embed_proj_dim=32,
        )
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    # transformers ties the output head to the input embedding: one tensor.
    n = sum(p.numel() for p in model.parameters())
    assert estimate_memory(cfg, None, 1, 8).base_params == n


def _llama(h, i, layers, heads, kv, vocab):
    return dict(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=h,
        intermediate_size=i,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


@pytest.mark.parametrize(
    "cfg,batch,seq,quant",
    [
        (_llama(256, 512, 2, 8, 8, 1024), 2, 128, True),
        (_llama(128, 384, 2, 4, 2, 512), 4, 128, True),
        (_llama(256, 512, 2, 8, 8, 4096), 2, 64, False),
        # A plain head and a large vocabulary: the loss applies the head 256 tokens at a
        # time (full logits would be twice the estimate's logits term).
        (_llama(128, 256, 2, 4, 2, 65536), 4, 128, False),
    ],
)
def test_estimate_within_15_percent_of_xla(cfg, batch, seq, quant):
    """Peak = arguments + outputs - donated aliases + temporaries of the compiled step (CPU,
    float32, XLA back end), against the estimate for the same setup."""
    model = jqlora.models.model_for_config(cfg, jnp.float32)
    params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))()[
        "params"
    ]
    lora_config = jqlora.LoraConfig(r=8)
    lora = jqlora.init_lora(jax.random.key(1), params, lora_config)
    if quant:
        for p in linear_modules(params):
            params = set_in(
                params, p + ("weight",), jqlora.quantize(get_in(params, p + ("weight",)))
            )
    opt = make_optimizer(1e-3)
    ids = jnp.zeros((batch, seq), jnp.int32)
    step = make_train_step(model, opt, compute_dtype=jnp.float32)
    m = (
        step.lower(init_train_state(lora, opt), params, {"input_ids": ids})
        .compile()
        .memory_analysis()
    )
    xla = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
    est = estimate_memory(
        cfg,
        lora_config,
        batch,
        seq,
        # every linear layer is quantized above, lm_head included
        quantization=jqlora.QuantConfig("nf4", skip_modules=()) if quant else None,
        compute_dtype="float32",
        backend="xla",
    )
    assert est.qlora.total == pytest.approx(xla, rel=0.15), (est.table(), m)


def test_cli(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    assert (
        cli_main(
            ["estimate-memory", "--model", str(tmp_path), "--lora-r", "64", "--offload", "--remat"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "6,738,415,616 parameters" in out and "full fine-tuning" in out and "host memory" in out
    assert cli_main(["estimate-memory", "--model", str(tmp_path / "missing")]) == 2
    assert "no such config file" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(
        json.dumps({"model_type": "bert", "vocab_size": 3})
    )
    assert cli_main(["estimate-memory", "--model", str(tmp_path / "bad")]) == 2
    assert "unsupported model_type" in capsys.readouterr().err


def test_cli_mesh_gives_per_device_figures(tmp_path, capsys):
    """--mesh divides the weights by fsdp x tensor and the activations by data x fsdp."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    whole = estimate_memory(LLAMA2_7B, jqlora.LoraConfig(r=8), 8, 512, quantization="nf4")
    assert (
        cli_main(
            [
                "estimate-memory",
                "--model",
                str(tmp_path),
                "--batch-size",
                "8",
                "--mesh",
                "data=2,fsdp=4",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "Per device of the mesh data=2,fsdp=4" in out
    base_row = next(line for line in out.splitlines() if line.startswith("base weights "))
    per_device_base = float(base_row.split()[2])
    assert per_device_base == pytest.approx(whole.qlora.device["base weights"] / 4 / 1e9, abs=2e-3)
    assert cli_main(["estimate-memory", "--model", str(tmp_path), "--mesh", "data=2,fsdp=x"]) == 2
    assert "not an integer" in capsys.readouterr().err


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        estimate_memory(LLAMA2_7B, None, 0, 8)
    with pytest.raises(ValueError, match="quant_type"):
        estimate_memory(LLAMA2_7B, None, 1, 8, quantization="int3")
    with pytest.raises(ValueError, match="backend"):
        estimate_memory(LLAMA2_7B, None, 1, 8, backend="cuda")


def test_logits_term_follows_the_output_head():
    """One chunk of 256 tokens has logits when the loss applies a plain head itself; all
    tokens do when the head is quantized or carries an adapter (the full-logits path)."""
    cfg = _llama(128, 256, 2, 4, 2, 65536)
    full = 512 * 65536 * (2 + 8)  # bfloat16 logits, their float32 copy and gradient
    fused = 256 * 65536 * (4 + 2)  # one chunk: float32 logits, bfloat16 gradient

    def logits(**kw):
        return estimate_memory(cfg, kw.pop("lora", None), 4, 128, **kw).qlora.device[
            "logits + loss"
        ]

    assert logits(quantization=None) == logits() == fused
    assert logits(quantization=jqlora.QuantConfig("nf4", skip_modules=())) == full
    lm_head = jqlora.LoraConfig(target_modules=["q_proj", "lm_head"])
    assert logits(quantization=None, lora=lm_head) == full
