"""Whole-model LoRA gradients against peft: a tiny Llama in float32, adapters on every
linear layer, the next-token loss of one batch; every adapter's d loss / d lora_A and
d loss / d lora_B from jqlora's train-step loss equals torch autograd through peft."""

from __future__ import annotations

import jax
import numpy as np
import torch
from adapter_reference import VOCAB, load_torch, peft_config, tiny_configs
from hf_reference import make_tiny

import jqlora
from jqlora.hf.peft import load_peft_adapter
from jqlora.lora.check import adapters
from jqlora.lora.targets import dotted
from jqlora.train.step import loss_fn

IDS = np.random.default_rng(5).integers(3, VOCAB, size=(2, 10))


def test_every_adapter_gradient_equals_peft(tmp_path):
    from peft import get_peft_model

    make_tiny(tiny_configs()["llama"], tmp_path / "base")
    peft_model = get_peft_model(load_torch(tmp_path / "base"), peft_config("llama", "plain"))
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.train()  # dropout is 0: train mode only enables the gradients
    ids = torch.as_tensor(IDS)
    peft_model(input_ids=ids, labels=ids).loss.backward()  # mean next-token cross-entropy
    expected = {}
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            module = name.removeprefix("base_model.model.").split(".lora_")[0]
            key = "a" if ".lora_A." in name else "b"
            expected[(module, key)] = p.grad.numpy()

    model, params = jqlora.load_hf(tmp_path / "base")
    lora, _ = load_peft_adapter(tmp_path / "adapter", params)
    batch = {"input_ids": jax.numpy.asarray(IDS)}
    grads = jax.jit(jax.grad(lambda lo: loss_fn(lo, params, batch, model=model)[0]))(lora)

    got = {(dotted(path), k): np.asarray(entry[k]) for path, entry in adapters(grads) for k in "ab"}
    assert sorted(got) == sorted(expected)
    assert len(got) == 2 * 7 * 2  # a and b of 7 linear layers in each of 2 layers
    for key, want in expected.items():
        scale = np.abs(want).max()
        assert scale > 0, key
        # float32 sums in another order: measured worst error 2.5e-6 of the largest entry
        np.testing.assert_allclose(got[key], want, rtol=0, atol=3e-5 * scale, err_msg=str(key))
