"""PEFT adapters in and out, against live peft + transformers (CPU, float32).

Both directions for every family (Llama, OPT, GPT-2) and variant (plain LoRA, rsLoRA,
DoRA), with rank / alpha patterns: an adapter peft built (non-zero B) gives jqlora the
logits peft computes, and an adapter jqlora built loads in ``PeftModel.from_pretrained``
with the logits jqlora computes.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from adapter_reference import (
    PATTERNED,
    VARIANTS,
    VOCAB,
    bnb_nf4_config,
    exact_nf4,
    jqlora_logits,
    llama64_config,
    load_torch,
    peft_config,
    tiny_configs,
    torch_logits,
)
from hf_reference import make_tiny
from safetensors.numpy import load_file, save_file

import jqlora
from jqlora.hf.peft import load_peft_adapter, save_peft_adapter
from jqlora.lora.check import adapters

FAMILIES = ("llama", "opt", "gpt2")
IDS = np.random.default_rng(0).integers(3, VOCAB, size=(2, 7))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """family -> (checkpoint dir, jqlora model, params); each built once per module."""
    cache = {}

    def get(family):
        if family not in cache:
            d = tmp_path_factory.mktemp(family)
            make_tiny(tiny_configs()[family], d)
            model, params = jqlora.load_hf(d)
            cache[family] = (d, model, params)
        return cache[family]

    return get


def _perturb(lora, seed=1):
    """B (and the DoRA magnitude) made non-zero and different from their init."""
    key = jax.random.PRNGKey(seed)
    out = {}
    for i, (path, entry) in enumerate(adapters(lora)):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        new = dict(entry, b=0.2 * jax.random.normal(k1, entry["b"].shape))
        if "magnitude" in entry:
            new["magnitude"] = entry["magnitude"] * (
                1 + 0.2 * jax.random.uniform(k2, entry["magnitude"].shape)
            )
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = new
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adapter_runs_in_jqlora(bases, tmp_path, family, variant):
    from peft import get_peft_model

    base_dir, model, params = bases(family)
    peft_model = get_peft_model(load_torch(base_dir), peft_config(family, variant)).eval()
    expected = torch_logits(peft_model, IDS)
    peft_model.save_pretrained(tmp_path / "peft")

    lora, config = load_peft_adapter(tmp_path / "peft", params)
    assert config.use_dora == (variant == "dora") and config.use_rslora == (variant == "rslora")
    np.testing.assert_allclose(jqlora_logits(model, params, IDS, lora), expected, atol=1e-4, rtol=0)
    assert np.abs(expected - jqlora_logits(model, params, IDS)).max() > 1e-2  # the adapter matters

    # Written back, the files are peft's own: same tensors, same config.
    save_peft_adapter(tmp_path / "back", lora, config, base_model_name_or_path=str(base_dir))
    ours, theirs = (
        load_file(tmp_path / "back/adapter_model.safetensors"),
        load_file(tmp_path / "peft/adapter_model.safetensors"),
    )
    assert ours.keys() == theirs.keys()
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    ours_cfg, theirs_cfg = (
        json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("back", "peft")
    )
    for cfg in (ours_cfg, theirs_cfg):
        cfg["target_modules"] = sorted(cfg["target_modules"])
        cfg.pop("init_lora_weights")  # peft records how it was initialized (False here)
    assert ours_cfg == theirs_cfg


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_jqlora_adapter_runs_in_peft(bases, tmp_path, family, variant):
    from peft import PeftModel

    base_dir, model, params = bases(family)
    name = PATTERNED[family]
    config = jqlora.LoraConfig(
        r=4,
        alpha=8,
        target_modules="all-linear",
        rank_pattern={name: 2},
        alpha_pattern={name: 3},
        **VARIANTS[variant],
    )
    lora = _perturb(jqlora.init_lora(jax.random.PRNGKey(0), params, config))
    expected = jqlora_logits(model, params, IDS, lora)
    save_peft_adapter(tmp_path, lora, config, base_model_name_or_path=str(base_dir))

    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["fan_in_fan_out"] == (family == "gpt2")
    assert written["use_dora"] == (variant == "dora")
    peft_model = PeftModel.from_pretrained(load_torch(base_dir), tmp_path).eval()
    np.testing.assert_allclose(torch_logits(peft_model, IDS), expected, atol=1e-4, rtol=0)


@pytest.fixture
def llama_adapter(bases, tmp_path):
    from peft import get_peft_model

    base_dir, model, params = bases("llama")
    d = tmp_path / "adapter"
    get_peft_model(load_torch(base_dir), peft_config("llama", "plain")).save_pretrained(d)
    return d, params


def _rewrite_keys(d, old, new):
    file = d / "adapter_model.safetensors"
    tensors = load_file(file)
    save_file(
        {k.replace(old, new, 1): v for k, v in tensors.items()}, file, metadata={"format": "pt"}
    )


def test_wrong_key_prefix_fails_loudly(llama_adapter):
    d, params = llama_adapter
    # One "model." too few: the paths miss the model; loading must not run as a no-op adapter.
    _rewrite_keys(d, "base_model.model.model.", "base_model.model.")
    with pytest.raises(ValueError, match="no module in params"):
        load_peft_adapter(d, params)
    # No PEFT prefix at all (a bare state dict): refused even without params to check against.
    _rewrite_keys(d, "base_model.model.", "")
    with pytest.raises(ValueError, match="does not start with 'base_model.model.'"):
        load_peft_adapter(d)


def test_unsupported_adapters_are_refused(llama_adapter):
    d, params = llama_adapter
    cfg_file = d / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps(dict(cfg, modules_to_save=["lm_head"])))
    with pytest.raises(ValueError, match="modules_to_save"):
        load_peft_adapter(d, params)
    cfg_file.write_text(json.dumps(dict(cfg, r=8)))
    with pytest.raises(ValueError, match=r"adapter_config.json gives rank 8 .*have rank 4"):
        load_peft_adapter(d, params)
    cfg_file.write_text(json.dumps(dict(cfg, peft_type="IA3")))
    with pytest.raises(ValueError, match="only LORA"):
        load_peft_adapter(d, params)


def test_bfloat16_adapter_loads_as_float32(llama_adapter):
    d, params = llama_adapter
    file = d / "adapter_model.safetensors"
    from safetensors.flax import load_file as load_jax
    from safetensors.flax import save_file as save_jax

    save_jax(
        {k: v.astype(jnp.bfloat16) for k, v in load_jax(file).items()},
        file,
        metadata={"format": "pt"},
    )
    lora, _ = load_peft_adapter(d, params)
    assert {e["a"].dtype for _, e in adapters(lora)} == {np.dtype(np.float32)}


def test_adapter_trained_on_a_4bit_base_loads_onto_jqlora_nf4(tmp_path):
    """peft on a bitsandbytes NF4 base (QLoRA) -> jqlora with the same NF4 base: same logits."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    make_tiny(llama64_config(), tmp_path / "base")
    q = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=bnb_nf4_config(), device_map="cpu"
    )
    q = exact_nf4(prepare_model_for_kbit_training(q, use_gradient_checkpointing=False))
    peft_model = get_peft_model(q, peft_config("llama", "plain")).eval()
    expected = torch_logits(peft_model, IDS)
    peft_model.save_pretrained(tmp_path / "adapter")

    model, params = jqlora.load_hf(tmp_path / "base", jqlora.QuantConfig("nf4"))
    lora, _ = load_peft_adapter(tmp_path / "adapter", params)
    np.testing.assert_allclose(jqlora_logits(model, params, IDS, lora), expected, atol=1e-4, rtol=0)


def test_finetune_adapter_names_the_default_model_by_its_hub_name(bases, tmp_path):
    """PEFT loads an adapter's base by ``base_model_name_or_path``: the default model's short
    name is jqlora's own, so the adapter records the hub name; any other model is as given."""
    from jqlora.app.outputs import _save_adapter
    from jqlora.hf import smollm2

    base_dir, _, params = bases("llama")
    config = jqlora.LoraConfig(r=2, target_modules=["q_proj"])
    lora = jqlora.init_lora(jax.random.PRNGKey(0), params, config)
    for model, expected in ((smollm2.MODEL_NAME, smollm2.HUB_NAME), (str(base_dir),) * 2):
        out = tmp_path / str(len(expected))
        out.mkdir()
        _save_adapter(str(out), lora, config, model)
        written = json.loads((out / "adapter_config.json").read_text())
        assert written["base_model_name_or_path"] == expected
