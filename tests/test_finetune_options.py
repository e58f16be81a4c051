"""`jqlora finetune` options end to end on a tiny Llama: --offload-optimizer --remat
--epochs 2 --quant fp4 --seed 3. The adapter loads in peft on transformers' own FP4 base
(bitsandbytes) and computes jqlora's logits; metrics.jsonl follows the warm-up schedule."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from adapter_reference import exact_nf4
from finetune_tiny import chat_records, make_tiny_model_dir, texts_of, write_jsonl
from transformers import get_scheduler

import jqlora
from jqlora.app.cli import main
from jqlora.hf.peft import load_peft_adapter

LR = 5e-3


@pytest.mark.slow  # a finetune run of ~110 steps
def test_offload_remat_epochs_fp4_seed_run_loads_in_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    records = chat_records(120)
    model_dir = make_tiny_model_dir(tmp_path / "model", texts_of(records))
    data = write_jsonl(tmp_path / "data.jsonl", records)
    out = str(tmp_path / "run")
    argv = ["finetune", "--model", model_dir, "--data", data, "--out", out]
    argv += ["--offload-optimizer", "--remat", "--epochs", "2", "--quant", "fp4", "--seed", "3"]
    argv += ["--batch-size", "2", "--seq-len", "32", "--lr", str(LR), "--lora-r", "4"]
    argv += ["--eval-every", "1000", "--save-every", "1000"]
    assert main(argv) == 0

    # Two passes over the training split; QLoRA's schedule: transformers' constant_with_warmup
    # over warmup_ratio 0.03 of the steps (Trainer rounds the warm-up up), update k at its
    # index k-1.
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    steps = len(metrics)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert steps >= 100  # 2 epochs of ~108 training examples, 2 a batch
    warmup = math.ceil(0.03 * steps)
    assert warmup > 1
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    schedule = get_scheduler("constant_with_warmup", opt, warmup, steps)
    expected = []
    for _ in metrics:
        expected.append(schedule.get_last_lr()[0])
        opt.step()
        schedule.step()
    np.testing.assert_allclose([m["lr"] for m in metrics], expected, rtol=1e-6, atol=0)
    assert all(math.isfinite(m["loss"]) for m in metrics)

    # peft on transformers' FP4 base (bitsandbytes, double quantization as --quant fp4 uses)
    # computes what jqlora computes with the same adapter on its own FP4 base.
    fp4 = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="fp4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=fp4, device_map="cpu"
    )
    peft_model = exact_nf4(PeftModel.from_pretrained(exact_nf4(base), out))
    ids = np.array([[1, 5, 9, 30, 7, 2, 11, 40]])
    with torch.no_grad():
        expected_logits = peft_model(torch.tensor(ids)).logits.numpy()
    model, params = jqlora.load_hf(model_dir, jqlora.QuantConfig("fp4", double_quant=True))
    lora, _ = load_peft_adapter(out, params)
    ours = np.asarray(model.apply({"params": params, "lora": lora}, ids))
    plain = np.asarray(model.apply({"params": params}, ids))
    assert np.abs(ours - plain).max() > 1e-3  # training moved the adapter off zero
    np.testing.assert_allclose(ours, expected_logits, atol=1e-4, rtol=0)
