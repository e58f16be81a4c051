"""Generation with a KV cache: greedy tokens equal transformers' ``generate`` token for
token (every family, left-padded batches, with and without an adapter), sampling filters
equal transformers' warpers, several adapters in one batch equal each alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from adapter_reference import VOCAB, jqlora_logits, load_torch, peft_config, tiny_configs
from hf_reference import make_tiny

import jqlora
from jqlora.generation import (
    SamplingConfig,
    _generate_jit,
    filter_logits,
    generate,
    stream_generate,
)
from jqlora.hf.peft import load_peft_adapter
from jqlora.lora.multi import apply_per_row_adapters, stack_adapters

FAMILIES = ("llama", "opt", "gpt2")
EOS, PAD = 2, 0
PROMPTS = np.random.default_rng(2).integers(3, VOCAB, size=(3, 9))
MASK = np.ones_like(PROMPTS)
MASK[0, :4] = 0  # left padding of different lengths
MASK[2, :1] = 0


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            d = tmp_path_factory.mktemp(family)
            make_tiny(tiny_configs()[family], d)
            model, params = jqlora.load_hf(d)
            cache[family] = (d, model, params, load_torch(d))
        return cache[family]

    return get


def hf_generate(torch_model, ids, mask, n, **kw):
    with torch.no_grad():
        out = torch_model.generate(
            torch.as_tensor(np.where(mask == 1, ids, PAD)), attention_mask=torch.as_tensor(mask),
            max_new_tokens=n, do_sample=False, eos_token_id=EOS, pad_token_id=PAD, **kw,
        )  # fmt: skip
    return out.numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers(bases, family):
    _, model, params, torch_model = bases(family)
    ids = np.where(MASK == 1, PROMPTS, PAD)
    expected = hf_generate(torch_model, ids, MASK, 12)
    got = generate(
        model,
        params,
        ids,
        attention_mask=MASK,
        max_new_tokens=12,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    np.testing.assert_array_equal(got, expected)


def test_eos_stops_rows_and_pads_like_transformers(bases):
    _, model, params, torch_model = bases("llama")
    ids = np.where(MASK == 1, PROMPTS, PAD)
    free = hf_generate(torch_model, ids, MASK, 10, suppress_tokens=[EOS])
    eos = int(free[1, 9 + 2])  # row 1 ends at its third new token
    with torch.no_grad():
        expected = torch_model.generate(
            torch.as_tensor(ids), attention_mask=torch.as_tensor(MASK), max_new_tokens=10, do_sample=False,
            eos_token_id=eos, pad_token_id=PAD,
        ).numpy()  # fmt: skip
    got = generate(
        model,
        params,
        ids,
        attention_mask=MASK,
        max_new_tokens=10,
        eos_token_id=eos,
        pad_token_id=PAD,
    )
    np.testing.assert_array_equal(got, expected)
    assert (got[1, 12:] == PAD).all()


def test_greedy_with_adapter_equals_peft(bases, tmp_path):
    from peft import get_peft_model

    base_dir, model, params, _ = bases("llama")
    peft_model = get_peft_model(load_torch(base_dir), peft_config("llama", "plain")).eval()
    peft_model.save_pretrained(tmp_path)
    lora, _ = load_peft_adapter(tmp_path, params)
    ids = np.where(MASK == 1, PROMPTS, PAD)
    expected = hf_generate(peft_model, ids, MASK, 8)
    got = generate(
        model,
        params,
        ids,
        lora=lora,
        attention_mask=MASK,
        max_new_tokens=8,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    np.testing.assert_array_equal(got, expected)


def test_one_compile_per_shape_bucket(bases):
    _, model, params, _ = bases("llama")
    generate(model, params, PROMPTS[:, :5], max_new_tokens=4)
    before = _generate_jit._cache_size()
    key = jax.random.PRNGKey(0)
    # Same bucket (prompt <= 16, prompt + new <= 32); sampling settings are traced values.
    for length, n, sampling in (
        (3, 4, {}),
        (7, 6, dict(temperature=0.5, top_k=3)),
        (9, 2, dict(temperature=1.0, top_p=0.9)),
    ):
        generate(model, params, PROMPTS[:, :length], max_new_tokens=n, key=key, **sampling)
    assert _generate_jit._cache_size() == before


def test_stream_generate_yields_generate_tokens(bases):
    _, model, params, _ = bases("llama")
    full = generate(model, params, PROMPTS[2], max_new_tokens=7)
    assert (
        list(stream_generate(model, params, PROMPTS[2], max_new_tokens=7)) == full[0, 9:].tolist()
    )


def test_sampling_filters_equal_transformers_warpers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = np.random.default_rng(3).normal(size=(4, 50)).astype(np.float32) * 3
    for temperature, top_k, top_p in (
        (0.7, 5, None),
        (1.3, None, 0.6),
        (1.0, 20, 0.3),
        (0.9, None, None),
    ):
        t = TemperatureLogitsWarper(temperature)(None, torch.as_tensor(logits))
        if top_k:
            t = TopKLogitsWarper(top_k)(None, t)
        if top_p:
            t = TopPLogitsWarper(top_p)(None, t)
        # The distribution jqlora samples from is the one transformers samples from.
        ours = jax.nn.softmax(
            filter_logits(jnp.asarray(logits), SamplingConfig.of(temperature, top_k, top_p))
        )
        np.testing.assert_allclose(np.asarray(ours), torch.softmax(t, -1).numpy(), atol=1e-6)


def test_sampling_is_seeded_and_top_k_1_is_greedy(bases):
    _, model, params, _ = bases("llama")
    greedy = generate(model, params, PROMPTS, max_new_tokens=6)
    kw = dict(max_new_tokens=6, temperature=0.8, key=jax.random.PRNGKey(7))
    np.testing.assert_array_equal(generate(model, params, PROMPTS, top_k=1, **kw), greedy)
    np.testing.assert_array_equal(
        generate(model, params, PROMPTS, **kw), generate(model, params, PROMPTS, **kw)
    )


def _random_lora(params, r, seed, targets):
    config = jqlora.LoraConfig(r=r, alpha=2 * r, target_modules=targets)
    lora = jqlora.init_lora(jax.random.PRNGKey(seed), params, config)
    return jax.tree.map(
        lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(seed + 1), x.shape), lora
    )


@pytest.mark.slow  # second tier: jqlora against itself, no outside reference (tests/README.md)
def test_stacked_adapters_equal_each_adapter_alone(bases):
    _, model, params, _ = bases("llama")
    loras = [
        _random_lora(params, 4, 0, "all-linear"),
        _random_lora(params, 2, 5, ["q_proj", "v_proj"]),
    ]
    stacked = stack_adapters(loras)
    ids = jnp.asarray([1, 0, 1])
    apply = lambda lora, x: model.apply({"params": params, "lora": lora}, x)
    mixed = np.asarray(
        jax.jit(lambda s, i, x: apply_per_row_adapters(apply, s, i, x))(
            stacked, ids, jnp.asarray(PROMPTS)
        )
    )
    for row, k in enumerate(ids.tolist()):
        np.testing.assert_allclose(
            mixed[row], jqlora_logits(model, params, PROMPTS[row : row + 1], loras[k])[0], atol=1e-5
        )

    # Generation: adapters of one structure, so running each alone compiles once.
    loras = [_random_lora(params, 2, seed, ["q_proj", "v_proj"]) for seed in (0, 5)]
    got = generate(
        model,
        params,
        PROMPTS,
        lora=stack_adapters(loras),
        adapter_ids=ids,
        attention_mask=MASK,
        max_new_tokens=6,
    )
    for row, k in enumerate(ids.tolist()):
        alone = generate(
            model,
            params,
            PROMPTS[row : row + 1],
            lora=loras[k],
            attention_mask=MASK[row : row + 1],
            max_new_tokens=6,
        )
        np.testing.assert_array_equal(got[row : row + 1], alone)


def test_bad_generate_input(bases):
    _, model, params, _ = bases("llama")
    with pytest.raises(ValueError, match="left padding"):
        generate(model, params, PROMPTS, attention_mask=np.flip(MASK, axis=1))
    with pytest.raises(ValueError, match="needs a PRNG key"):
        generate(model, params, PROMPTS, temperature=1.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, params, PROMPTS, max_new_tokens=0)


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers(smollm2):
    """32 greedy tokens for a left-padded batch of two chat prompts, token for token."""
    tokenizer, reference, model, params = smollm2
    questions = [
        "What is the capital of France?",
        "Write a haiku about the sea and the wind at night.",
    ]
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="np", padding=True, add_special_tokens=False)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask.min() == 0  # the batch really is padded
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    with torch.no_grad():
        expected = reference.generate(
            torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=32, do_sample=False,
            eos_token_id=eos, pad_token_id=pad,
        ).numpy()  # fmt: skip
    got = generate(
        model,
        params,
        ids,
        attention_mask=mask,
        max_new_tokens=32,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    np.testing.assert_array_equal(got, expected)
