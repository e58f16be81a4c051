"""The TPU Pallas kernel (interpreted on the CPU) equals the XLA path, and lowers for TPU.

The XLA path itself is checked against live bitsandbytes in test_kernels.py; the GPU
kernels are tested in test_kernels_gpu.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gpu_lowering import custom_calls, lowered_text

from jqlora.kernels import pallas_tpu, qmatmul, xla
from jqlora.quant import quantize


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# (M, N, K, quant_type, blocksize, double_quant): M = 1, 7, 129; N and K not multiples of
# the tiles below, several M, N and K tiles each.
CASES = [
    (1, 40, 192, "nf4", 64, True),
    (7, 33, 256, "fp4", 32, False),
    (129, 24, 256, "nf4", 128, True),
]
# The TPU kernel's tiles must divide the reduction axis (K forward, N backward) exactly.
TPU_TILES = {40: (16, 8), 33: (16, 11), 24: (16, 8)}  # N -> (bn forward, bn backward)


def _kernel_pair(n, k):
    bk = 128 if k % 128 == 0 else k
    fwd = dict(tiles=pallas_tpu.Tiles(bm=8, bn=TPU_TILES[n][0], bk=bk))
    bwd = dict(tiles=pallas_tpu.Tiles(bm=8, bn=TPU_TILES[n][1], bk=bk))
    return pallas_tpu.matmul, pallas_tpu.matmul_t, fwd, bwd


@pytest.mark.parametrize("m,n,k,quant_type,bs,dq", CASES)
def test_kernel_forward_and_dx_equal_xla_path_f32(m, n, k, quant_type, bs, dq):
    keys = jax.random.split(jax.random.key(m * n + k), 3)
    qt = quantize(jax.random.normal(keys[0], (n, k)), quant_type, bs, dq)
    x = jax.random.normal(keys[1], (m, k))
    dy = jax.random.normal(keys[2], (m, n))
    fwd, bwd, fwd_kw, bwd_kw = _kernel_pair(n, k)
    f32 = jnp.float32

    @jax.jit
    def both(x, dy, w):
        kernel_out = (
            fwd(x, w, f32, interpret=True, **fwd_kw),
            bwd(dy, w, f32, interpret=True, **bwd_kw),
        )
        return kernel_out, (xla.matmul(x, w, f32), xla.matmul_t(dy, w, f32))

    (y, dx), (y_ref, dx_ref) = both(x, dy, qt)
    assert y.shape == (m, n) and dx.shape == (m, k)
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(dx, dx_ref) < 1e-5


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
def test_grad_through_qmatmul_bf16_equals_xla_path(backend):
    # pallas_gpu: 14 rows, the dequantize kernel's route.
    """jax.grad wrt x through the custom_vjp: the kernel's dx equals the XLA path's (bf16)."""
    keys = jax.random.split(jax.random.key(3), 3)
    qt = quantize(jax.random.normal(keys[0], (24, 256)), "nf4", 64, True)
    x = jax.random.normal(keys[1], (2, 7, 256), jnp.bfloat16)
    ct = jax.random.normal(keys[2], (2, 7, 24), jnp.bfloat16)

    def value_and_dx(backend):
        loss = lambda x, w: jnp.sum(qmatmul(x, w, backend=backend).astype(jnp.float32) * ct)
        return jax.jit(lambda x, w: (qmatmul(x, w, backend=backend), jax.grad(loss)(x, w)))(x, qt)

    y, dx = value_and_dx(backend)
    y_ref, dx_ref = value_and_dx("xla")
    assert y.dtype == dx.dtype == jnp.bfloat16
    assert rel_err(y, y_ref) < 1e-2
    assert rel_err(dx, dx_ref) < 1e-2


def test_tpu_kernel_lowers_to_mosaic():
    qt = quantize(jnp.ones((512, 1024)), "fp4", 64, False)
    bf16 = jnp.bfloat16
    for f, a in [
        (lambda x, w: pallas_tpu.matmul(x, w, bf16), jnp.ones((16, 1024), bf16)),
        (lambda d, w: pallas_tpu.matmul_t(d, w, bf16), jnp.ones((16, 512), bf16)),
    ]:
        calls = set(custom_calls(lowered_text(f, a, qt, platform="tpu")))
        assert calls == {"tpu_custom_call"}, calls
