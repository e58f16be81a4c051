"""LoraConfig and target selection: PEFT's matching rules, checked against peft's own code; bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

import jqlora
from jqlora.lora import LoraConfig, LoraSpec, check_lora, init_lora, select_targets
from jqlora.lora.targets import dotted, matches

KEYS = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.10.self_attn.q_proj",
    "model.layers.1.mlp.up_proj",
    "model.layers.1.mlp.down_proj",
    "transformer.h.0.attn.c_attn",
    "transformer.h.0.mlp.c_proj",
    "q_proj",
    "model.layers.0.self_attn.xq_proj",
    "lm_head",
]
TARGETS = [
    ["q_proj", "v_proj"],
    ["self_attn.q_proj"],
    ["model.layers.1.mlp.up_proj"],
    ["proj"],
    ["c_attn"],
    r".*\.(q|v)_proj",
    r"model\.layers\.1\..*",
    r"q_proj",
    r".*layers\.1.*proj",
]


@pytest.mark.parametrize("targets", TARGETS, ids=str)
def test_target_matching_is_peft(targets):
    ref = peft.LoraConfig(target_modules=targets)
    ours = LoraConfig(target_modules=targets)
    for key in KEYS:
        assert matches(ours.target_modules, key) == bool(check_target_module_exists(ref, key)), key


def test_rank_and_alpha_patterns_are_peft():
    rank_pattern = {"q_proj": 2, r"layers\.1\..*": 6, "mlp.down_proj": 3, "v": 5}
    alpha_pattern = {r".*\.10\..*": 7.0, "up_proj": 1.5}
    cfg = LoraConfig(r=4, alpha=8, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    for key in KEYS:
        r_key, a_key = (
            get_pattern_key(rank_pattern.keys(), key),
            get_pattern_key(alpha_pattern.keys(), key),
        )
        assert cfg.rank_and_alpha(key) == (
            rank_pattern.get(r_key, 4),
            alpha_pattern.get(a_key, 8),
        ), key


def _tree(state_dict) -> dict:
    tree: dict = {}
    for name, t in state_dict.items():
        *parents, leaf = name.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jax.ShapeDtypeStruct(tuple(t.shape), jnp.float32)
    return tree


def _peft_targets(model, config: peft.LoraConfig) -> set[str]:
    wrapped = peft.get_peft_model(model, config)
    return {
        n.removeprefix("base_model.model.")
        for n, m in wrapped.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }


TINY = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16
    ),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=64,
        hidden_size=32,
        ffn_dim=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=16,
    ),
}


@pytest.mark.parametrize("family", TINY)
@pytest.mark.parametrize(
    "targets", ["all-linear", ["q_proj", "v_proj", "c_attn"], r".*\.1\..*(proj|fc)"], ids=str
)
def test_selected_modules_are_peft_on_tiny_transformers(family, targets):
    """all-linear, a name list and a regex select exactly the modules peft adapts (lm_head and embeddings left out)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(TINY[family]())
    params = _tree(model.state_dict())
    if family == "gpt2":
        targets = ["c_attn"] if isinstance(targets, list) else targets
    elif isinstance(targets, list):
        targets = ["q_proj", "v_proj"]
    expected = _peft_targets(model, peft.LoraConfig(r=2, target_modules=targets))
    assert {
        dotted(p) for p in select_targets(params, LoraConfig(r=2, target_modules=targets))
    } == expected


def test_attention_only_helper():
    cfg = LoraConfig.attention_only(r=4)
    assert cfg.target_modules == ("q_proj", "v_proj") and cfg.r == 4
    assert LoraConfig.attention_only(("c_attn",)).target_modules == ("c_attn",)
    # hashable (a static jit argument), patterns included
    assert hash(LoraConfig(rank_pattern={"q_proj": 2})) == hash(
        LoraConfig(rank_pattern={"q_proj": 2})
    )


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(r=-4), "r must be a positive integer"),
        (dict(r=2.5), "r must be a positive integer"),
        (dict(alpha=0), "alpha must be a positive number"),
        (dict(alpha=-1.0), "alpha must be a positive number"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
        (dict(target_modules=[]), "non-empty list"),
        (dict(target_modules="(q_proj"), "not a valid regex"),
        (dict(init="kaiming"), "unknown init"),
        (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be a positive integer"),
        (
            dict(alpha_pattern={"q_proj": -2}),
            r"alpha_pattern\['q_proj'\] must be a positive number",
        ),
        (dict(loftq_iter=0), "loftq_iter"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def _params():
    rng = np.random.default_rng(0)
    w = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    return {
        "model": {
            "embed_tokens": {"weight": w(50, 16)},
            "layers": {
                "0": {
                    "self_attn": {"q_proj": {"weight": w(16, 16)}, "v_proj": {"weight": w(4, 16)}},
                    "input_layernorm": {"weight": w(16)},
                }
            },
            "norm": {"weight": w(16)},
        },
        "lm_head": {"weight": w(50, 16)},
    }


def test_pattern_matching_nothing_lists_the_modules():
    with pytest.raises(
        ValueError,
        match=r"matched no linear layer.*\['lm_head', 'q_proj', 'v_proj'\]"
        r".*model\.layers\.0\.self_attn\.q_proj",
    ):
        init_lora(jax.random.key(0), _params(), LoraConfig(target_modules=["qkv"]))
    with pytest.raises(ValueError, match="matched no linear layer"):
        init_lora(jax.random.key(0), _params(), LoraConfig(target_modules=r"layers\.1\..*"))


def test_targeting_an_embedding_or_norm_is_an_error():
    with pytest.raises(ValueError, match="'model.embed_tokens', which is an embedding"):
        init_lora(jax.random.key(0), _params(), LoraConfig(target_modules=["embed_tokens"]))
    with pytest.raises(
        ValueError, match=r"'model.norm', which is not a linear layer \(weight shape \(16,\)\)"
    ):
        init_lora(jax.random.key(0), _params(), LoraConfig(target_modules=["norm"]))


def test_rank_above_a_layer_dimension():
    with pytest.raises(
        ValueError, match=r"r=8 for 'model.layers.0.self_attn.v_proj' exceeds .* \[out=4, in=16\]"
    ):
        init_lora(jax.random.key(0), _params(), LoraConfig(r=8))
    lora = init_lora(jax.random.key(0), _params(), LoraConfig(r=8, rank_pattern={"v_proj": 4}))
    assert lora["model"]["layers"]["0"]["self_attn"]["v_proj"]["a"].shape == (4, 16)
    assert "lm_head" not in lora and "embed_tokens" not in lora["model"]


def test_pissa_and_loftq_need_the_residual_function():
    with pytest.raises(ValueError, match="init_lora_from_base"):
        init_lora(jax.random.key(0), _params(), LoraConfig(init="pissa"))


def _good_lora():
    return init_lora(jax.random.key(0), _params(), LoraConfig(r=2, use_dora=True))


def _q(lora):
    return lora["model"]["layers"]["0"]["self_attn"]["q_proj"]


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (
            lambda e: e.update(a=jnp.zeros((2, 15))),
            r"a \(2, 15\) and b \(16, 2\) do not fit the weight",
        ),
        (lambda e: e.update(b=jnp.zeros((16, 3))), r"a \(2, 16\) and b \(16, 3\) do not fit"),
        (lambda e: e.update(a=jnp.zeros((2, 16), jnp.int32)), "'a' must be a 2-D float array"),
        (
            lambda e: e.update(magnitude=jnp.zeros(4)),
            r"DoRA magnitude has shape \(4,\), expected \(16,\)",
        ),
        (lambda e: e.pop("spec"), r"missing \['spec'\]"),
        (lambda e: e.update(spec=2.0), "'spec' is a float, not a LoraSpec"),
        (lambda e: e.update(c=jnp.zeros(1)), r"unexpected \['c'\]"),
    ],
)
def test_check_lora_rejects_mismatched_trees(corrupt, message):
    params, lora = _params(), _good_lora()
    check_lora(params, lora)
    corrupt(_q(lora))
    with pytest.raises(
        ValueError, match=r"lora entry 'model.layers.0.self_attn.q_proj': " + message
    ):
        check_lora(params, lora)


def test_check_lora_rejects_paths_params_lack():
    lora = {"model": {"layers": {"1": {"self_attn": {"q_proj": _q(_good_lora())}}}}}
    with pytest.raises(
        ValueError, match=r"no module in params: no '1' under model.layers \(there: \['0'\]\)"
    ):
        check_lora(_params(), lora)
    with pytest.raises(ValueError, match="no linear 'weight'"):
        check_lora(
            _params(),
            {
                "model": {
                    "norm": {
                        "a": jnp.zeros((1, 16)),
                        "b": jnp.zeros((16, 1)),
                        "spec": LoraSpec(1.0),
                    }
                }
            },
        )
    with pytest.raises(ValueError, match="adapter entry"):
        check_lora(_params(), {"model": jnp.zeros(3)})


def test_check_lora_runs_under_jit_and_on_quantized_params():
    """Under jit, on a 4-bit q_proj (whose packed codes are (16, 8) uint8), the check
    compares the adapter with the weight's logical shape (16, 16): a fitting adapter
    passes, one a column short is refused."""
    params = _params()
    q = params["model"]["layers"]["0"]["self_attn"]["q_proj"]
    q["weight"] = jqlora.quantize(q["weight"])
    checked = jax.jit(lambda p, tree: check_lora(p, tree) or jnp.int32(1))
    assert int(checked(params, _good_lora())) == 1
    lora = _good_lora()
    _q(lora)["a"] = jnp.zeros((2, 15))
    with pytest.raises(
        ValueError, match=r"a \(2, 15\) and b \(16, 2\) do not fit the weight \(16, 16\)"
    ):
        checked(params, lora)


def test_stacked_layers_get_stacked_adapters():
    """A weight [L, out, in] (layers under nn.scan) gets a [L, r, in], b [L, out, r], magnitude [L, out]."""
    w = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 16)), jnp.float32)
    # a stacked norm scale is 2-D too, and is not a linear layer
    params = {
        "layers": {
            "mlp": {"up_proj": {"weight": w}},
            "post_attention_layernorm": {"weight": w[:, 0]},
            "ln_1": {"weight": w[:, 0]},
        }
    }
    lora = init_lora(jax.random.key(0), params, LoraConfig(r=2, use_dora=True))
    assert list(lora["layers"]) == ["mlp"]
    e = lora["layers"]["mlp"]["up_proj"]
    assert (e["a"].shape, e["b"].shape, e["magnitude"].shape) == ((3, 2, 16), (3, 8, 2), (3, 8))
    np.testing.assert_allclose(e["magnitude"], jnp.linalg.norm(w, axis=-1), rtol=1e-6)
    check_lora(params, lora)
