"""The real model, SmolLM2-135M-Instruct (llama architecture, tied embeddings, GGUF Q4_1/Q8_0):
jqlora's GGUF loading gives transformers' logits on a real prompt, and the KV cache agrees."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow

PROMPT = (
    "The licenses for most software and other practical works are designed to take away your "
    "freedom to share and change the works. By contrast, the GNU General Public License is intended "
    "to guarantee your freedom to share and change all versions of a program."
)


def test_gguf_config_and_tensors(smollm2):
    _, reference, model, params = smollm2
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (
        576,
        30,
        9,
        3,
    )
    assert c.tie_word_embeddings and "lm_head" not in params
    q = params["model"]["layers"]["7"]["self_attn"]["q_proj"]["weight"]  # row order of q/k undone
    np.testing.assert_array_equal(
        np.asarray(q), reference.model.layers[7].self_attn.q_proj.weight.detach().numpy()
    )


def test_logits_equal_transformers_on_a_real_prompt(smollm2):
    import torch

    tokenizer, reference, model, params = smollm2
    ids = tokenizer(PROMPT, return_tensors="np")["input_ids"].astype(np.int32)
    with torch.no_grad():
        want = reference(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    got = np.asarray(model.apply({"params": params}, ids))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    # the KV cache: prefill all but the last 4 tokens, then decode them one by one
    n = ids.shape[1]
    logits, cache = model.apply({"params": params}, ids[:, : n - 4], cache=model.init_cache(1, n))
    steps = [logits]
    for t in range(n - 4, n):
        logits, cache = model.apply({"params": params}, ids[:, t : t + 1], cache=cache)
        steps.append(logits)
    cached = np.concatenate([np.asarray(s) for s in steps], axis=1)
    assert np.abs(cached - want).max() <= 1e-4 * np.abs(want).max()
