"""PiSSA and LoftQ: adapters and residual base against peft (PiSSA) and peft's LoftQ formula.

peft's ``loftq_init`` moves the weight to "cuda" / "xpu" unconditionally, so it cannot run
on a CPU; ``peft_loftq_on_cpu`` below is its loop with the device left out, on
bitsandbytes' CPU quantizer and peft's own ``_low_rank_decomposition``.
"""

from __future__ import annotations

import bitsandbytes as bnb
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft.utils.loftq_utils import _low_rank_decomposition
from test_lora_peft import (
    D,
    H,
    lora_from_peft,
    params_of,
    peft_model,
    run_flax,
    run_torch,
    torch_model,
    x_input,
)

import jqlora
from jqlora.hf import QuantConfig
from jqlora.lora import LoraConfig, init_lora_from_base, svd_lowrank
from jqlora.lora.dora import float_weight


def assert_same_factors(a, b, a_ref, b_ref, rtol=1e-4, atol=1e-5):
    """``a`` / ``b`` equal the reference up to the sign of each singular pair."""
    a, b, a_ref, b_ref = (np.asarray(v, np.float64) for v in (a, b, a_ref, b_ref))
    signs = np.sign(np.sum(a * a_ref, axis=1))
    np.testing.assert_allclose(a * signs[:, None], a_ref, rtol=rtol, atol=atol)
    np.testing.assert_allclose(b * signs[None, :], b_ref, rtol=rtol, atol=atol)


def decaying_model(seed=0, decay=0.7) -> torch.nn.Module:
    """A torch_model whose weights have a decaying spectrum, so a rank-r part is well defined."""
    model = torch_model(seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                out_f, in_f = m.weight.shape
                u, _ = torch.linalg.qr(torch.randn(out_f, out_f, generator=gen))
                v, _ = torch.linalg.qr(torch.randn(in_f, in_f, generator=gen))
                k = min(out_f, in_f)
                s = 2.0 * decay ** torch.arange(k, dtype=torch.float32) + 0.01
                m.weight.copy_(u[:, :k] @ torch.diag(s) @ v[:, :k].T)
    return model


@pytest.mark.parametrize("use_dora", [False, True])
def test_pissa_matches_peft(use_dora):
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=use_dora)
    ref = peft_model(decaying_model(), init_lora_weights="pissa", **kw)
    params = params_of(decaying_model())
    config = LoraConfig(
        r=4, alpha=8, target_modules=["q_proj", "down_proj"], init="pissa", use_dora=use_dora
    )
    new_params, lora = init_lora_from_base(jax.random.key(0), params, config)
    ref_lora = lora_from_peft(ref, None, dora=use_dora)
    for path in (("attn", "q_proj"), ("mlp", "down_proj")):
        e, r = lora[path[0]][path[1]], ref_lora[path[0]][path[1]]
        assert_same_factors(e["a"], e["b"], r["a"], r["b"])
        resid = new_params[path[0]][path[1]]["weight"]
        ref_resid = (
            ref.base_model.model.get_submodule(".".join(path)).base_layer.weight.detach().numpy()
        )
        np.testing.assert_allclose(resid, ref_resid, atol=2e-5)
        if use_dora:
            np.testing.assert_allclose(e["magnitude"], r["magnitude"], rtol=1e-5)
    x = x_input()
    expected = run_torch(decaying_model(), x)  # PiSSA starts from the float model
    np.testing.assert_allclose(run_flax(new_params, lora, x), expected, atol=5e-5, rtol=1e-4)
    np.testing.assert_allclose(run_torch(ref, x), expected, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", [(96, 40), (40, 96)])
def test_svd_lowrank_is_torch_svd_lowrank(shape):
    """Same test matrix, same algorithm: the same factors as torch.svd_lowrank."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    q, niter = 6, 3
    torch.manual_seed(7)
    omega = torch.randn(min(shape), q)  # torch draws R = randn(n, q) for the tall orientation
    torch.manual_seed(7)
    u_ref, s_ref, v_ref = torch.svd_lowrank(w, q=q, niter=niter)
    u, s, v = svd_lowrank(jnp.asarray(w.numpy()), q, niter, omega=jnp.asarray(omega.numpy()))
    np.testing.assert_allclose(s, s_ref, rtol=1e-4)
    assert_same_factors(np.asarray(v).T, u, v_ref.numpy().T, u_ref.numpy(), atol=1e-4)


def test_pissa_niter_is_close_to_peft_and_exact():
    """Randomized SVD (peft's "pissa_niter_N"): same principal part as peft's, up to its randomness.

    The spectrum decays fast, so 4 subspace iterations from any start converge to ~1e-5.
    """
    ref = peft_model(
        decaying_model(decay=0.3),
        r=4,
        lora_alpha=4,
        target_modules=["up_proj"],
        init_lora_weights="pissa_niter_4",
    )
    params = params_of(decaying_model(decay=0.3))
    new_params, lora = init_lora_from_base(
        jax.random.key(0),
        params,
        LoraConfig(r=4, alpha=4, target_modules=["up_proj"], init="pissa_niter_4"),
    )
    e, r = lora["mlp"]["up_proj"], lora_from_peft(ref, None)["mlp"]["up_proj"]
    np.testing.assert_allclose(e["b"] @ e["a"], r["b"] @ r["a"], atol=1e-4)
    w = params["mlp"]["up_proj"]["weight"]
    np.testing.assert_allclose(
        new_params["mlp"]["up_proj"]["weight"] + e["b"] @ e["a"], w, atol=1e-5
    )


def peft_loftq_on_cpu(weight: torch.Tensor, reduced_rank: int, num_iter: int):
    """peft.utils.loftq_utils.loftq_init (4 bits) with its device moves left out."""
    weight = weight.to(torch.float32)
    res = weight.clone()
    for i in range(num_iter):
        qweight = bnb.nn.Params4bit(
            res, requires_grad=False, compress_statistics=False, quant_type="nf4"
        ).to("cpu")
        dequantized = bnb.functional.dequantize_4bit(qweight.data, qweight.quant_state)
        res = weight - dequantized
        out = _low_rank_decomposition(res, reduced_rank=reduced_rank)
        L, R = out["L"], out["R"]
        if i + 1 == num_iter:
            break
        res = weight - torch.mm(L, R)
    return qweight, R, L


@pytest.mark.parametrize("num_iter", [1, 3])
def test_loftq_matches_peft_formula(num_iter):
    torch.manual_seed(0)
    w = torch.randn(H, D) * 0.05
    qweight, r_ref, l_ref = peft_loftq_on_cpu(w, 8, num_iter)
    params = {"mlp": {"up_proj": {"weight": jnp.asarray(w.numpy())}}}
    config = LoraConfig(
        r=8, alpha=8, init="loftq", loftq_iter=num_iter
    )  # scale 1: peft's convention
    quant = QuantConfig(double_quant=False)
    new_params, lora = init_lora_from_base(jax.random.key(0), params, config, quantization=quant)
    q = new_params["mlp"]["up_proj"]["weight"]
    e = lora["mlp"]["up_proj"]
    np.testing.assert_array_equal(np.asarray(q.codes).ravel(), qweight.data.numpy().ravel())
    np.testing.assert_allclose(q.absmax, qweight.quant_state.absmax.numpy(), rtol=1e-6)
    assert_same_factors(e["a"], e["b"], r_ref.numpy(), l_ref.numpy(), atol=2e-5, rtol=1e-3)
    # with another alpha the singular values are divided by the scale: scale * B A is the same
    _, lora4 = init_lora_from_base(
        jax.random.key(0),
        params,
        LoraConfig(r=8, alpha=32, init="loftq", loftq_iter=num_iter),
        quantization=quant,
    )
    e4 = lora4["mlp"]["up_proj"]
    np.testing.assert_allclose(4.0 * e4["b"] @ e4["a"], (l_ref @ r_ref).numpy(), atol=2e-5)


def test_loftq_and_quantized_pissa_beat_plain_quantization():
    """The point of both: quantized base + adapter is closer to W than quantizing W (LoftQ: more so with iterations)."""
    params = params_of(decaying_model())
    w = params["mlp"]["up_proj"]["weight"]
    plain = jnp.linalg.norm(w - jqlora.dequantize(jqlora.quantize(w), jnp.float32))

    def error(init, iters=1):
        config = LoraConfig(r=8, alpha=16, init=init, loftq_iter=iters, target_modules=["up_proj"])
        new_params, lora = init_lora_from_base(
            jax.random.key(0), params, config, quantization=QuantConfig()
        )
        e = lora["mlp"]["up_proj"]
        approx = (
            float_weight(new_params["mlp"]["up_proj"]["weight"]) + e["spec"].scale * e["b"] @ e["a"]
        )
        return float(jnp.linalg.norm(w - approx) / plain)

    loftq1, loftq3 = error("loftq", 1), error("loftq", 3)
    assert loftq3 < loftq1 < 0.85  # measured: 0.79, 0.71
    assert (
        error("pissa") < 0.2
    )  # measured: 0.07 (the large singular values leave the quantized part)


def test_quantization_covers_the_rest_of_the_base():
    params = params_of(decaying_model())
    config = LoraConfig(r=4, init="pissa", target_modules=["q_proj"])
    new_params, lora = init_lora_from_base(
        jax.random.key(0), params, config, quantization=QuantConfig(skip_modules=("mlp.down_proj",))
    )
    assert isinstance(
        new_params["attn"]["q_proj"]["weight"], jqlora.QuantizedTensor
    )  # the residual
    assert isinstance(
        new_params["attn"]["v_proj"]["weight"], jqlora.QuantizedTensor
    )  # not targeted
    assert not isinstance(
        new_params["mlp"]["down_proj"]["weight"], jqlora.QuantizedTensor
    )  # skipped
    assert new_params["attn"]["v_proj"]["bias"] is params["attn"]["v_proj"]["bias"]
    # a base already in 4 bits: PiSSA of its dequantized weight, residual re-quantized alike
    qparams, _ = init_lora_from_base(
        jax.random.key(0), params, LoraConfig(), quantization=QuantConfig("fp4", 128)
    )
    again, lora = init_lora_from_base(jax.random.key(0), qparams, config)
    resid = again["attn"]["q_proj"]["weight"]
    assert (resid.quant_type, resid.blocksize, resid.double_quant) == ("fp4", 128, True)
    e = lora["attn"]["q_proj"]
    w = float_weight(qparams["attn"]["q_proj"]["weight"])
    assert jnp.linalg.norm(
        w - float_weight(resid) - e["spec"].scale * e["b"] @ e["a"]
    ) < 0.2 * jnp.linalg.norm(w)


def test_residual_bad_input():
    params = params_of(decaying_model())
    with pytest.raises(
        ValueError, match="LoftQ chooses the quantized base itself: pass quantization="
    ):
        init_lora_from_base(jax.random.key(0), params, LoraConfig(init="loftq"))
    qparams, _ = init_lora_from_base(
        jax.random.key(0), params, LoraConfig(), quantization=QuantConfig()
    )
    with pytest.raises(ValueError, match="LoftQ of 'attn.q_proj': the weight is already quantized"):
        init_lora_from_base(
            jax.random.key(0), qparams, LoraConfig(init="loftq"), quantization=QuantConfig()
        )
