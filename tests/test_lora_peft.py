"""LoRA / DoRA adapters against live peft on tiny torch modules with the same weights.

The torch module and the Flax module below have the same layers under the same names, so
the params tree is the torch ``state_dict`` split on dots, and an adapter peft made is
copied into a jqlora lora tree entry for entry.
"""

from __future__ import annotations

import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import scipy.stats
import torch

import jqlora
from jqlora.lora import Linear, LoraConfig, LoraSpec, init_lora, merge_lora
from jqlora.lora.branch import dropout_seed, keep_mask, keep_scale
from jqlora.lora.dora import dora_linear
from jqlora.lora.linear import lora_branch, lora_dropout

# Last dimensions multiples of 64: bitsandbytes' CPU dequantize misreads absmax for a last
# dimension that is a multiple of 16 but not of the blocksize (see REFERENCES).
D, H = 64, 128  # model width, MLP width


class TorchBlock(torch.nn.Module):
    """q/v projections and a gated MLP: enough distinct linear layers to target."""

    def __init__(self, linear=torch.nn.Linear):
        super().__init__()
        self.attn = torch.nn.Module()
        self.attn.q_proj = linear(D, D, bias=False)
        self.attn.v_proj = linear(D, D, bias=True)
        self.mlp = torch.nn.Module()
        self.mlp.up_proj = linear(D, H, bias=False)
        self.mlp.down_proj = linear(H, D, bias=True)

    def forward(self, x):
        y = self.attn.q_proj(x) * torch.tanh(self.attn.v_proj(x))
        return self.mlp.down_proj(torch.nn.functional.gelu(self.mlp.up_proj(y)))


class _Attn(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Linear(D, name="q_proj")(x), Linear(D, use_bias=True, name="v_proj")(x)


class _Mlp(nn.Module):
    @nn.compact
    def __call__(self, y):
        return Linear(D, use_bias=True, name="down_proj")(
            nn.gelu(Linear(H, name="up_proj")(y), approximate=False)
        )


class FlaxBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        q, v = _Attn(name="attn")(x)
        return _Mlp(name="mlp")(q * jnp.tanh(v))


def torch_model(seed=0, linear=torch.nn.Linear) -> TorchBlock:
    torch.manual_seed(seed)
    return TorchBlock(linear).eval()


def params_of(module: torch.nn.Module) -> dict:
    """The params tree of a torch module: its state_dict names split on dots."""
    tree: dict = {}
    for name, t in module.state_dict().items():
        *parents, leaf = name.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(t.detach().float().numpy())
    return tree


def lora_from_peft(model, scale_of, dora=False) -> dict:
    """peft's adapters as a jqlora lora tree (``scale_of(path)`` gives each module's scale)."""
    lora: dict = {}
    for name, module in model.base_model.model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        entry = {
            "a": jnp.asarray(module.lora_A["default"].weight.detach().numpy()),
            "b": jnp.asarray(module.lora_B["default"].weight.detach().numpy()),
            "spec": LoraSpec(scale=module.scaling["default"]),
        }
        if dora:
            entry["magnitude"] = jnp.asarray(
                module.lora_magnitude_vector["default"].weight.detach().numpy()
            )
        node = lora
        for p in name.split("."):
            node = node.setdefault(p, {})
        node.update(entry)
    return lora


def peft_model(base, **kw):
    kw.setdefault("init_lora_weights", False)  # non-zero B, or the adapter path proves nothing
    return peft.get_peft_model(base, peft.LoraConfig(**kw)).eval()


def x_input(n=5, seed=1):
    return np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)


def run_flax(params, lora, x, rngs=None):
    variables = {"params": params} if lora is None else {"params": params, "lora": lora}
    return np.asarray(FlaxBlock().apply(variables, jnp.asarray(x), rngs=rngs))


def run_torch(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


# --- init -----------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_init_statistics_match_peft(init):
    """A drawn as peft draws it (same law: KS test against peft's own sample), B zero."""
    r = 16
    ref = peft_model(
        torch_model(),
        r=r,
        lora_alpha=32,
        target_modules=["up_proj", "down_proj"],
        init_lora_weights=True if init == "default" else "gaussian",
    )
    params = params_of(torch_model())
    lora = init_lora(
        jax.random.key(0),
        params,
        LoraConfig(r=r, alpha=32, init=init, target_modules=["up_proj", "down_proj"]),
    )
    for name, fan_in in (("up_proj", D), ("down_proj", H)):
        peft_layer = getattr(ref.base_model.model.mlp, name)
        a_ref = peft_layer.lora_A["default"].weight.detach().numpy().ravel()
        entry = lora["mlp"][name]
        a = np.asarray(entry["a"]).ravel()
        assert entry["a"].shape == (r, fan_in) and entry["b"].shape == (
            D if name == "down_proj" else H,
            r,
        )
        assert not np.any(np.asarray(entry["b"])) and not peft_layer.lora_B["default"].weight.any()
        assert entry["spec"] == LoraSpec(scale=2.0)
        if init == "default":  # kaiming_uniform_(a=sqrt(5)) on [r, in]: U(-1/sqrt(in), 1/sqrt(in))
            bound = 1 / math.sqrt(fan_in)
            assert np.abs(a).max() <= bound and np.abs(a_ref).max() <= bound
            assert np.abs(a).max() > 0.95 * bound
        else:
            assert abs(a.std() - 1 / r) < 0.1 / r
        assert scipy.stats.ks_2samp(a, a_ref).pvalue > 1e-3


def test_init_leaves_model_unchanged_and_is_per_layer():
    params = params_of(torch_model())
    x = x_input()
    lora = init_lora(jax.random.key(0), params, LoraConfig(r=4))
    np.testing.assert_array_equal(run_flax(params, lora, x), run_flax(params, None, x))
    only_q = init_lora(jax.random.key(0), params, LoraConfig(r=4, target_modules=["q_proj"]))
    # a layer's draw does not depend on which other layers are targeted
    np.testing.assert_array_equal(only_q["attn"]["q_proj"]["a"], lora["attn"]["q_proj"]["a"])
    assert not np.array_equal(lora["attn"]["q_proj"]["a"], lora["attn"]["v_proj"]["a"][:, :D])


# --- forward --------------------------------------------------------------------------

FORWARD_CASES = {
    "lora": dict(r=4, lora_alpha=8),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        rank_pattern={"up_proj": 2, "attn.v_proj": 6},
        alpha_pattern={"down_proj": 3},
    ),
    "dora": dict(r=4, lora_alpha=8, use_dora=True),
    "dora_rslora": dict(r=8, lora_alpha=4, use_dora=True, use_rslora=True),
}


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_forward_matches_peft(case):
    kw = FORWARD_CASES[case]
    ref = peft_model(torch_model(), target_modules="all-linear", **kw)
    params = params_of(torch_model())
    lora = lora_from_peft(ref, None, dora=kw.get("use_dora", False))
    jqlora.lora.check_lora(params, lora)
    x = x_input()
    np.testing.assert_allclose(run_flax(params, lora, x), run_torch(ref, x), atol=2e-5, rtol=1e-5)
    # the config gives the same shapes and scales as peft for every module
    cfg = LoraConfig(
        r=kw["r"],
        alpha=kw["lora_alpha"],
        use_rslora=kw.get("use_rslora", False),
        use_dora=kw.get("use_dora", False),
        rank_pattern=kw.get("rank_pattern", {}),
        alpha_pattern=kw.get("alpha_pattern", {}),
    )
    ours = init_lora(jax.random.key(0), params, cfg)
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, lora)


def test_dora_magnitude_and_gradients_match_peft():
    """DoRA's magnitude init ||W + s B A||_row, and gradients with the norm detached, as peft."""
    ref = peft_model(torch_model(), r=4, lora_alpha=8, use_dora=True, target_modules="all-linear")
    ref.train()  # dropout 0: train mode only switches DoRA to its training-time path
    params = params_of(torch_model())
    lora = lora_from_peft(ref, None, dora=True)
    # peft computed the magnitude from its own (non-zero) B; ours from the same a, b
    ours = init_lora(jax.random.key(0), params, LoraConfig(r=4, alpha=8, use_dora=True))
    for path in (("attn", "q_proj"), ("mlp", "down_proj")):
        e, o = lora[path[0]][path[1]], ours[path[0]][path[1]]
        w = params[path[0]][path[1]]["weight"]
        expected = jnp.linalg.norm(w + e["spec"].scale * e["b"] @ e["a"], axis=1)
        np.testing.assert_allclose(e["magnitude"], expected, rtol=1e-5)
        np.testing.assert_allclose(o["magnitude"], jnp.linalg.norm(w, axis=1), rtol=1e-6)  # B = 0
    x = x_input()
    run_torch_loss = ref(torch.from_numpy(x)).square().sum()
    run_torch_loss.backward()
    grads = jax.grad(
        lambda tree: jnp.sum(
            FlaxBlock().apply({"params": params, "lora": tree}, jnp.asarray(x)) ** 2
        )
    )(lora)
    for path in (("attn", "v_proj"), ("mlp", "up_proj")):
        layer = ref.base_model.model.get_submodule(".".join(path))
        g = grads[path[0]][path[1]]
        np.testing.assert_allclose(
            g["magnitude"], layer.lora_magnitude_vector["default"].weight.grad, rtol=2e-4, atol=1e-5
        )
        np.testing.assert_allclose(
            g["a"], layer.lora_A["default"].weight.grad, rtol=2e-4, atol=1e-5
        )
        np.testing.assert_allclose(
            g["b"], layer.lora_B["default"].weight.grad, rtol=2e-4, atol=1e-5
        )


class _FixedDropout(torch.nn.Module):
    def __init__(self, keep, scale):
        super().__init__()
        self.keep, self.scale = keep, scale

    def forward(self, x):
        return torch.where(self.keep, x * self.scale, 0.0)


@pytest.mark.parametrize("use_dora", [False, True])
def test_dropout_branch_matches_peft(use_dora):
    """In training with dropout, only the LoRA input is dropped (DoRA: peft's x_d W^T term).

    jqlora's layer computes its own mask from the rng, exactly as `Linear` does; peft's
    dropout module is replaced by one that applies that mask and scale."""
    rate = 0.3
    ref = peft_model(
        torch_model(),
        r=4,
        lora_alpha=8,
        lora_dropout=rate,
        use_dora=use_dora,
        target_modules=["up_proj"],
    ).train()
    layer = ref.base_model.model.mlp.up_proj
    x = np.random.default_rng(3).normal(size=(6, D)).astype(np.float32)
    rng = jax.random.key(4)
    keep = np.array(keep_mask(dropout_seed(rng), x.shape, rate))
    assert 0 < keep.mean() < 1
    layer.lora_dropout["default"] = _FixedDropout(torch.from_numpy(keep), keep_scale(rate))
    with torch.no_grad():
        expected = layer(torch.from_numpy(x)).numpy()
    entry = lora_from_peft(ref, None, dora=use_dora)["mlp"]["up_proj"]
    entry["spec"] = LoraSpec(entry["spec"].scale, rate)
    w = params_of(torch_model())["mlp"]["up_proj"]["weight"]
    xj = jnp.asarray(x)
    if use_dora:
        got = dora_linear(xj, xj @ w.T, w, entry, lora_dropout(xj, rate, rng))
    else:
        got = xj @ w.T + lora_branch(xj, entry, dropout_rng=rng)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)


def test_dropout_needs_rng_and_has_the_right_rate():
    """Through the Flax layer: no rng, no dropout; with one, the LoRA input loses a
    fraction ``rate`` of its elements and the rest are scaled by 1 / (1 - rate).

    With a zero base weight and a = b = identity (r = D), the layer's output is
    dropout(x) itself, so the mask and its scale can be read off directly."""
    rate = 0.3
    params = {"proj": {"weight": jnp.zeros((D, D))}}
    eye = jnp.eye(D)
    lora = {"proj": {"a": eye, "b": eye, "spec": LoraSpec(1.0, rate)}}
    x = jnp.ones((256, D), jnp.float32)

    def run(rngs=None):
        layer = Linear(D, name="proj")
        return np.asarray(
            layer.apply({"params": params["proj"], "lora": lora["proj"]}, x, rngs=rngs)
        )

    np.testing.assert_array_equal(run(), x)  # no rng: no dropout
    a = run({"dropout": jax.random.key(1)})
    b = run({"dropout": jax.random.key(2)})
    assert not np.array_equal(a, b)  # a new key, a new mask
    for out in (a, b):
        kept = out != 0
        np.testing.assert_allclose(out[kept], 1 / (1 - rate), rtol=1e-6)
        # 16384 Bernoulli draws: the drop fraction's standard deviation is 0.0036; 5 of them.
        assert abs(1 - kept.mean() - rate) < 0.018, 1 - kept.mean()


# --- merge ----------------------------------------------------------------------------


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_matches_peft_merge_and_unload(use_dora):
    ref = peft_model(
        torch_model(), r=4, lora_alpha=8, use_dora=use_dora, target_modules="all-linear"
    )
    params = params_of(torch_model())
    lora = lora_from_peft(ref, None, dora=use_dora)
    x = x_input()
    unmerged = run_flax(params, lora, x)
    merged_ref = params_of(ref.merge_and_unload())
    merged = merge_lora(params, lora)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6), merged, merged_ref
    )
    np.testing.assert_allclose(run_flax(merged, None, x), unmerged, atol=2e-5, rtol=1e-5)
    bf16 = merge_lora(params, lora, dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(bf16))


def test_merge_into_4bit_base_is_float_and_requantize_matches_peft():
    """Merging into an NF4 base dequantizes first; re-quantizing matches peft's 4-bit merge byte for byte."""
    import bitsandbytes as bnb

    from jqlora.lora.storage import settings_of

    base = torch_model()
    params = params_of(base)
    qparams = jax.tree_util.tree_map_with_path(
        lambda p, w: jqlora.quantize(w, "nf4", 64, True) if p[-1].key == "weight" else w, params
    )

    def linear4bit(i, o, bias):
        return bnb.nn.Linear4bit(
            i, o, bias=bias, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True
        )

    qbase = torch_model(linear=linear4bit)
    qbase.load_state_dict(base.state_dict())  # quantizes on the CPU as transformers would
    for m in qbase.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    qbase = qbase.to("cpu")
    qbase.is_loaded_in_4bit = True  # what transformers sets; peft then wraps Linear4bit as such
    ref = peft_model(qbase, r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    lora = lora_from_peft(ref, None)
    for name in ("q_proj",):
        w = ref.base_model.model.attn.q_proj.base_layer.weight
        np.testing.assert_array_equal(
            np.asarray(qparams["attn"][name]["weight"].codes).ravel(), w.data.numpy().ravel()
        )
    x = x_input()
    merged = merge_lora(qparams, lora)
    assert not any(
        isinstance(v, jqlora.QuantizedTensor)
        for v in jax.tree.leaves(merged, is_leaf=lambda v: isinstance(v, jqlora.QuantizedTensor))
    )
    np.testing.assert_allclose(
        run_flax(merged, None, x), run_flax(qparams, lora, x), atol=2e-5, rtol=1e-5
    )

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        requant = merge_lora(
            qparams, lora, requantize=settings_of(qparams["attn"]["q_proj"]["weight"])
        )
    assert any("lossy" in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_merged = ref.merge_and_unload()
    for path in (("attn", "q_proj"), ("mlp", "up_proj")):
        ours = requant[path[0]][path[1]]["weight"]
        theirs = ref_merged.get_submodule(".".join(path)).weight
        np.testing.assert_array_equal(np.asarray(ours.codes).ravel(), theirs.data.numpy().ravel())
        np.testing.assert_allclose(
            jqlora.dequantize(ours, jnp.float32),
            bnb.functional.dequantize_4bit(theirs.data, theirs.quant_state).numpy(),
            atol=1e-6,
        )
    assert requant["attn"]["v_proj"]["weight"] is qparams["attn"]["v_proj"]["weight"]  # untouched


def test_dora_on_nf4_base_matches_peft():
    """DoRA over a bitsandbytes NF4 layer: peft normalizes the dequantized weight; so does jqlora."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    float_layer = torch.nn.Linear(D, H, bias=False)
    layer = bnb.nn.Linear4bit(D, H, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict(float_layer.state_dict())
    layer = layer.to("cpu")
    layer.support_avx512bf16_for_cpu = False
    holder = torch.nn.Module()
    holder.up_proj = layer
    holder.forward = lambda x: holder.up_proj(x)
    holder.is_loaded_in_4bit = True
    ref = peft_model(holder, r=4, lora_alpha=8, use_dora=True, target_modules=["up_proj"])
    entry = lora_from_peft(ref, None, dora=True)["up_proj"]
    w = jqlora.quantize(
        jnp.asarray(float_layer.weight.detach().numpy()), "nf4", 64, double_quant=True
    )
    np.testing.assert_array_equal(np.asarray(w.codes).ravel(), layer.weight.data.numpy().ravel())
    x = x_input()
    got = Linear(H).apply({"params": {"weight": w}, "lora": entry}, jnp.asarray(x))
    with torch.no_grad():
        expected = ref.base_model.model.up_proj(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, atol=3e-5, rtol=1e-5)
    ours = init_lora(jax.random.key(0), {"up_proj": {"weight": w}}, LoraConfig(r=4, use_dora=True))
    np.testing.assert_allclose(
        ours["up_proj"]["magnitude"],
        jnp.linalg.norm(jqlora.dequantize(w, jnp.float32), axis=1),
        rtol=1e-6,
    )
