"""`jqlora.finetune` on a tiny Gemma 3 and Qwen3 (NF4 base, adapters on every linear layer):
the eval loss falls, and the adapter it writes loads in peft with jqlora's logits."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from families_reference import family_configs, load_eager
from finetune_tiny import chat_records, make_tokenizer, texts_of, write_jsonl
from hf_reference import make_tiny, random_ids, torch_logits

import jqlora
from jqlora.app import loop
from jqlora.hf.peft import load_peft_adapter


@pytest.mark.parametrize("family", ["gemma3_text", "qwen3"])
def test_finetune_adapter_loads_in_peft(family, tmp_path):
    from peft import PeftModel

    records = chat_records(24)
    tok = make_tokenizer(texts_of(records))
    config = family_configs()[family]
    config.vocab_size = len(tok)
    config.bos_token_id, config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    config.pad_token_id = tok.pad_token_id
    model_dir = tmp_path / "model"
    make_tiny(config, model_dir)
    tok.save_pretrained(model_dir)
    result = loop.finetune(
        model=str(model_dir), data=write_jsonl(tmp_path / "data.jsonl", records),
        out=str(tmp_path / "out"), steps=6, batch_size=4, seq_len=48, lr=5e-3, lora_r=4, lora_alpha=8, eval_every=6,
        save_every=6, sample=False, progress=False, log=lambda *a: None,
    )  # fmt: skip
    assert result.eval_loss_after < result.eval_loss_before
    assert os.path.exists(tmp_path / "out" / "adapter_model.safetensors")

    model, params = jqlora.load_hf(model_dir)
    lora, _ = load_peft_adapter(tmp_path / "out", params)
    ids = random_ids(len(tok), 2, 12, seed=6)
    ours = np.asarray(jax.jit(model.apply)({"params": params, "lora": lora}, ids))
    peft_model = PeftModel.from_pretrained(load_eager(model_dir), tmp_path / "out").eval()
    np.testing.assert_allclose(torch_logits(peft_model, ids), ours, atol=1e-4, rtol=0)
    base = np.asarray(jax.jit(model.apply)({"params": params}, ids))
    assert np.abs(ours - base).max() > 1e-3  # training moved the adapter
