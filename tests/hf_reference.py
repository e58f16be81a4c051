"""Tiny random transformers models saved to disk, and their logits: the references the
model and checkpoint tests compare jqlora against."""

from __future__ import annotations

import numpy as np
import torch


def make_tiny(config, out_dir, seed: int = 0):
    """A transformers model from ``config`` with random weights (norm scales and biases
    included, so a mix-up of any tensor shows), saved to ``out_dir``; returns the model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(out_dir)
    return model


def torch_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(np.asarray(ids), dtype=torch.long),
            attention_mask=None
            if mask is None
            else torch.as_tensor(np.asarray(mask), dtype=torch.long),
        )
    return out.logits.float().numpy()


def random_ids(vocab: int, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq)).astype(np.int32)


def left_padding_mask(batch: int, seq: int, pads) -> np.ndarray:
    """Rows of ones with ``pads[i]`` leading zeros."""
    mask = np.ones((batch, seq), np.int32)
    for i, p in enumerate(pads):
        mask[i, :p] = 0
    return mask
