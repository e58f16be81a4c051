"""The GPU kernels compiled for a real GPU (no interpreter) against a float64 reference.

Skipped where JAX sees no GPU (the CPU suite checks the same kernel interpreted, in
test_kernels_pallas.py). On a GPU machine: ``pytest tests/test_kernels_on_gpu.py -p no:xdist``.
Every case draws fresh random inputs; the reference is ``x @ W.T`` in float64 on the host
from the weight dequantized by the XLA path (checked byte for byte against bitsandbytes in
the CPU suite). Error is ``||out - ref|| / ||ref||``: the bound is the compute dtype's
rounding (bf16 operands ~4e-3, f16 ~5e-4, f32 through TF32 tensor cores ~3e-4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqlora.kernels import gpu_tiles, pallas_gpu, qmatmul
from jqlora.quant import dequantize, quantize

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU"),
]

BOUND = {jnp.bfloat16: 1e-2, jnp.float16: 2e-3, jnp.float32: 2e-3}


def rel_norm_err(out, ref) -> float:
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    assert np.isfinite(out).all(), "non-finite output"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _weight(key, n, k, quant_type, blocksize, double_quant):
    qt = quantize(jax.random.normal(key, (n, k), jnp.float32), quant_type, blocksize, double_quant)
    return qt, np.asarray(dequantize(qt, jnp.float32), np.float64)


# (M, N, K, quant_type, blocksize, double_quant): M across the tile classes and ragged;
# N and K not multiples of any tile in gpu_tiles.TABLES; M = 1 and 3 take the GEMV kernels.
CASES = [
    (1, 4096, 4096, "nf4", 64, True),
    (3, 1000, 1344, "fp4", 128, True),
    (7, 200, 320, "nf4", 64, True),
    (16, 1000, 1024, "fp4", 64, False),
    (33, 96, 512, "nf4", 128, True),
    (300, 520, 768, "nf4", 256, False),
    (1024, 1376, 2048, "fp4", 64, True),
    (4099, 256, 448, "nf4", 64, True),
]


# Every case in bfloat16 (QLoRA's compute dtype); two of them in float16 and float32 too.
DTYPE_CASES = [(c, jnp.bfloat16) for c in CASES] + [
    (c, d) for c in (CASES[1], CASES[5]) for d in (jnp.float16, jnp.float32)
]


@pytest.mark.parametrize(
    "case,dtype", DTYPE_CASES, ids=[f"{c}-{jnp.dtype(d).name}" for c, d in DTYPE_CASES]
)
def test_kernel_forward_and_backward_match_float64(case, dtype):
    m, n, k, quant_type, blocksize, dq = case
    kw, kx, kd = jax.random.split(jax.random.key(m * 7919 + n), 3)
    qt, w = _weight(kw, n, k, quant_type, blocksize, dq)
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
    dy = jax.random.normal(kd, (m, n), jnp.float32).astype(dtype)
    fwd, bwd = gpu_tiles.route(m, "fwd"), gpu_tiles.route(m, "bwd")
    y = jax.jit(lambda x, w: pallas_gpu.matmul(x, w, dtype, fwd))(x, qt)
    dx = jax.jit(lambda dy, w: pallas_gpu.matmul_t(dy, w, dtype, bwd))(dy, qt)
    assert y.dtype == dx.dtype == dtype and y.shape == (m, n) and dx.shape == (m, k)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    dy64 = np.asarray(dy.astype(jnp.float32), np.float64)
    assert rel_norm_err(y, x64 @ w.T) < BOUND[dtype]
    assert rel_norm_err(dx, dy64 @ w) < BOUND[dtype]


ROUTES = [
    (direction, route)
    for direction in ("fwd", "bwd")
    for route in gpu_tiles.TABLES[gpu_tiles.gpu_name()][direction]
]


@pytest.mark.parametrize("direction,route", ROUTES, ids=[f"{d}-{r.kernel}" for d, r in ROUTES])
def test_every_table_row_is_exact_on_ragged_edges(direction, route):
    """Each row of this GPU's table forced on shapes that leave partial tiles on every axis."""
    kw, kx, kd = jax.random.split(jax.random.key(11), 3)
    m = min(route.max_m, 37)
    step = route.tiles.bk if route.kernel == "gemv" else 256
    n, k = 2 * getattr(route.tiles, "bn", 64) + 5, 2 * step + 64
    qt, w = _weight(kw, n, k, "nf4", 64, True)
    bf16 = jnp.bfloat16
    if direction == "fwd":
        x = jax.random.normal(kx, (m, k), bf16)
        y = jax.jit(lambda x, w: pallas_gpu.matmul(x, w, bf16, route))(x, qt)
        assert rel_norm_err(y, np.asarray(x, np.float64) @ w.T) < 1e-2
    else:
        dy = jax.random.normal(kd, (m, n), bf16)
        dx = jax.jit(lambda dy, w: pallas_gpu.matmul_t(dy, w, bf16, route))(dy, qt)
        assert rel_norm_err(dx, np.asarray(dy, np.float64) @ w) < 1e-2


@pytest.mark.parametrize("backend", [None, "xla"])
def test_qmatmul_on_gpu_and_its_gradient(backend):
    """The automatic back end on a GPU is the Pallas kernels, "xla" XLA's dequantize; jax.grad
    flows through either."""
    kw, kx, kc = jax.random.split(jax.random.key(5), 3)
    qt, w = _weight(kw, 384, 512, "nf4", 64, True)
    x = jax.random.normal(kx, (2, 9, 512), jnp.bfloat16)
    ct = jax.random.normal(kc, (2, 9, 384), jnp.float32)
    f = lambda x: qmatmul(x, qt, backend=backend)
    assert ("triton" in jax.jit(f).lower(x).as_text()) == (backend is None)
    loss = lambda x: jnp.sum(f(x).astype(jnp.float32) * ct)
    dx = jax.jit(jax.grad(loss))(x)
    x64 = np.asarray(x, np.float64).reshape(-1, 512)
    assert rel_norm_err(f(x).reshape(-1, 384), x64 @ w.T) < 1e-2
    ref_dx = np.asarray(ct, np.float64).reshape(-1, 384) @ w
    assert rel_norm_err(dx.reshape(-1, 512), ref_dx) < 1e-2


def test_qlora_gradients_on_gpu_match_the_xla_path(monkeypatch):
    """Loss and LoRA gradients of a QLoRA model: the GPU kernel against the XLA back end."""
    import jqlora
    from jqlora.models import model_for_config
    from jqlora.train.step import configure_model

    cfg = dict(
        model_type="llama",
        vocab_size=512,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = model_for_config(cfg, jnp.bfloat16)
    params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    params = jqlora.QuantConfig().quantize_params(params)
    lora = jqlora.init_lora(jax.random.key(1), params, jqlora.LoraConfig(r=8, dropout=0.0))
    # B = 0 at init would hide the adapters' path: give B values.
    lora = jax.tree.map(lambda a: a + 0.01 * jnp.ones_like(a), lora)
    batch = {"input_ids": jax.random.randint(jax.random.key(2), (2, 64), 0, 512)}
    bf16_model = configure_model(model, compute_dtype="bfloat16")
    results = {}
    for backend in ("pallas", "xla"):
        monkeypatch.setenv("JQLORA_QMATMUL", backend)
        f = jax.jit(
            jax.value_and_grad(
                lambda lora, params: jqlora.loss_fn(
                    lora, params, batch, model=bf16_model, compute_dtype="bfloat16"
                )[0]
            )
        )
        assert ("triton" in f.lower(lora, params).as_text()) == (backend == "pallas")
        results[backend] = f(lora, params)
    (loss_p, grads_p), (loss_x, grads_x) = results["pallas"], results["xla"]
    assert abs(float(loss_p) - float(loss_x)) < 1e-2 * abs(float(loss_x))
    for g_p, g_x in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_x), strict=True):
        assert rel_norm_err(g_p, np.asarray(g_x, np.float64)) < 3e-2
