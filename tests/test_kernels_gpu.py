"""The GPU kernels (gpu_gemv, pallas_gpu's dequantize) on this CPU: interpreted against a
float64 reference, lowered for CUDA (an abstract H100), their per-weight arithmetic counted
in the traced kernel body, and a whole train step lowered for CUDA.

The reference is ``x @ W.T`` in float64 from the weight dequantized by the XLA path, which
test_kernels.py checks byte for byte against bitsandbytes. ``tests/test_kernels_on_gpu.py``
runs the compiled kernels on a real GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from gpu_lowering import TRITON, custom_calls, lowered_text, triton_kernel_names
from tiny_lm import TinyLM, init_params, make_lora, quantize_base

from jqlora.kernels import gpu_gemv, gpu_tiles, pallas_gpu, qmatmul
from jqlora.quant import dequantize, quantize
from jqlora.train.step import init_train_state, make_train_step

GEMV = gpu_tiles.Route(4, "gemv", gpu_tiles.GemvTiles(bn=4, bk=256, programs=8, num_warps=4))
GEMV_T = gpu_tiles.Route(4, "gemv", gpu_tiles.GemvTiles(bn=8, bk=256, programs=8, num_warps=4))
DEQUANT = gpu_tiles.Route(1 << 62, "dequant", gpu_tiles.DequantTiles(elements=1024, num_warps=4))

# (M, N, K, quant_type, blocksize, double_quant, dtype): ragged M, N and K (K = 320, 448,
# 576 are not multiples of the 256-wide K step); every blocksize 64-256; NF4 and FP4; with
# and without double quantization; bf16, f16 and f32. M <= 4 runs the GEMV kernels,
# larger M the dequantize kernel (several programs, the last one partly past the edge).
CASES = [
    (1, 40, 320, "nf4", 64, True, jnp.float32),
    (3, 33, 256, "fp4", 128, False, jnp.float32),
    (2, 24, 768, "nf4", 256, True, jnp.bfloat16),
    (4, 57, 448, "fp4", 64, True, jnp.float16),
    (5, 40, 320, "nf4", 64, True, jnp.float32),
    (33, 33, 256, "fp4", 128, False, jnp.bfloat16),
    (129, 24, 768, "nf4", 256, True, jnp.float16),
    (7, 57, 576, "fp4", 64, False, jnp.float32),
]
# Relative max error against float64, ten times the worst measured: f32 ~2e-7 (summation
# order); bf16/f16 outputs round once to the dtype (~4e-3 / ~5e-4 of the largest value).
TOLERANCE = {jnp.float32: 2e-6, jnp.float16: 5e-3, jnp.bfloat16: 4e-2}


def rel_err(out, ref) -> float:
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def _case(m, n, k, quant_type, bs, dq, dtype):
    keys = jax.random.split(jax.random.key(m * n + k), 3)
    qt = quantize(jax.random.normal(keys[0], (n, k)), quant_type, bs, dq)
    x = jax.random.normal(keys[1], (m, k), dtype)
    dy = jax.random.normal(keys[2], (m, n), dtype)
    w64 = np.asarray(dequantize(qt, jnp.float32), np.float64)
    if dtype != jnp.float32 and m > 4:  # the dequantize path multiplies the rounded weight
        w64 = np.asarray(dequantize(qt, dtype).astype(jnp.float32), np.float64)
    x64, dy64 = (np.asarray(a.astype(jnp.float32), np.float64) for a in (x, dy))
    return qt, x, dy, x64 @ w64.T, dy64 @ w64


@pytest.mark.parametrize("case", CASES, ids=[f"{c[:6]}-{jnp.dtype(c[6]).name}" for c in CASES])
def test_every_path_equals_float64_interpreted(case):
    m, dtype = case[0], case[-1]
    qt, x, dy, y_ref, dx_ref = _case(*case)
    fwd, bwd = (GEMV, GEMV_T) if m <= 4 else (DEQUANT, DEQUANT)
    y = pallas_gpu.matmul(x, qt, dtype, fwd, interpret=True)
    dx = pallas_gpu.matmul_t(dy, qt, dtype, bwd, interpret=True)
    assert y.dtype == dx.dtype == dtype and y.shape == y_ref.shape and dx.shape == dx_ref.shape
    assert rel_err(y, y_ref) < TOLERANCE[dtype]
    assert rel_err(dx, dx_ref) < TOLERANCE[dtype]


def test_dequantize_kernel_equals_xla_dequantize():
    """Every value, every dtype: the kernel's weight equals `dequantize` (the XLA path)."""
    for quant_type, bs, dq in [("nf4", 64, True), ("fp4", 256, False), ("nf4", 128, False)]:
        qt = quantize(jax.random.normal(jax.random.key(bs), (37, 512)), quant_type, bs, dq)
        for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
            got = pallas_gpu.dequantize(qt, dtype, tiles=DEQUANT.tiles, interpret=True)
            want = dequantize(qt, dtype)
            # f32: the in-kernel absmax may round as one FMA (one ulp of the scale).
            np.testing.assert_allclose(
                np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=3e-7, atol=0
            )


def test_qmatmul_routes_by_m_and_differentiates(monkeypatch):
    """Through `qmatmul` and jax.grad on the GPU back end (interpreted): the table's route
    for each M, forward and dx, against the XLA back end. Lowered for a GPU whose table was
    not tuned on it, `qmatmul` calls no kernel unless asked (`JQLORA_QMATMUL=pallas`)."""
    qt = quantize(jax.random.normal(jax.random.key(0), (48, 256)), "nf4", 64, True)
    for m in (1, 4, 5, 64):
        x = jax.random.normal(jax.random.key(m), (m, 256))
        ct = jax.random.normal(jax.random.key(m + 1), (m, 48))

        def value_and_dx(backend, x, ct):
            loss = lambda x: jnp.sum(qmatmul(x, qt, backend=backend) * ct)
            return qmatmul(x, qt, backend=backend), jax.grad(loss)(x)

        (y, dx), (y_ref, dx_ref) = (value_and_dx(b, x, ct) for b in ("pallas_gpu", "xla"))
        assert rel_err(y, np.asarray(y_ref, np.float64)) < 2e-6
        assert rel_err(dx, np.asarray(dx_ref, np.float64)) < 2e-6
    monkeypatch.delenv("JQLORA_QMATMUL", raising=False)
    text = lowered_text(lambda x: qmatmul(x, qt), jnp.ones((1, 256)), platform="cuda")
    assert triton_kernel_names(text) == []
    monkeypatch.setenv("JQLORA_QMATMUL", "pallas")
    text = lowered_text(lambda x: qmatmul(x, qt), jnp.ones((1, 256)), platform="cuda")
    assert triton_kernel_names(text) == ["gemv_nf4"]
    text = lowered_text(lambda x: qmatmul(x, qt), jnp.ones((64, 256)), platform="cuda")
    assert triton_kernel_names(text) == ["dequantize_nf4"]


PATHS = {
    "gemv": (gpu_gemv.matmul, GEMV.tiles, "x"),
    "gemv_t": (gpu_gemv.matmul_t, GEMV_T.tiles, "dy"),
    "dequantize": (None, DEQUANT.tiles, None),
}


def _path_fn(path, dtype):
    f, tiles, _ = PATHS[path]
    if f is None:
        return lambda a, w: pallas_gpu.dequantize(w, dtype, tiles=tiles)
    return lambda a, w: f(a, w, dtype, tiles=tiles)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_every_path_lowers_for_cuda(path, dtype):
    qt = quantize(jnp.ones((96, 768)), "nf4", 64, True)
    a = jnp.ones((3, 96 if path == "gemv_t" else 768), dtype)
    text = lowered_text(_path_fn(path, dtype), a, qt, platform="cuda")
    assert custom_calls(text) == [TRITON]
    assert f"num_warps = {PATHS[path][1].num_warps}" in text


LAYOUT = {"broadcast_in_dim", "reshape", "stack", "unstack", "squeeze", "iota", "transpose"}
# The tile's streaming loads and stores (plgpu.load / store) move memory; the gathers from
# the code book and the scale tables (``ref[indices]``, primitive "get") are counted.
STREAMING = {"masked_load", "masked_swap", "load", "swap"}


def _body_ops(jaxpr, out):
    for eqn in jaxpr.eqns:
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _body_ops(sub, out)
        if eqn.primitive.name in LAYOUT | STREAMING or eqn.primitive.name in (
            "while",
            "scan",
            "cond",
        ):
            continue
        arrays = [v.aval for v in [*eqn.invars, *eqn.outvars] if not hasattr(v.aval, "inner_aval")]
        sizes = [int(np.prod(a.shape)) for a in arrays if hasattr(a, "shape")]
        out.append((eqn.primitive.name, max(sizes, default=0), [v.aval for v in eqn.outvars]))
    return out


def ops_per_weight(f, *args) -> tuple[float, list]:
    """Elementwise operations per weight element in the kernel body ``f`` traces to.

    Every equation of the body (loop bodies included), but layout ones (broadcast, reshape,
    stack) and streaming loads and stores, weighs the largest array it reads or writes over
    the weight elements one step covers (twice the packed bytes). Work per block or per
    output row counts a fraction.
    """
    closed = jax.make_jaxpr(f)(*args)
    (call,) = [e for e in closed.jaxpr.eqns if e.primitive.name == "pallas_call"]
    body = call.params["jaxpr"]
    ops = _body_ops(body, [])
    weights = 2 * max(  # the widened packed bytes: one per two weight elements
        size
        for name, size, outs in ops
        if name == "convert_element_type" and outs[0].dtype == jnp.int32
    )
    return sum(size for _, size, _ in ops) / weights, ops


@pytest.mark.parametrize("path", list(PATHS))
def test_kernel_body_does_at_most_six_operations_per_weight(path):
    """One decoding row (M = 1), a 7B-sized projection: the unpacking (half a widening,
    shift and mask each: they act on bytes), the gather-load, then for the GEMV one
    multiply-add and a block sum, for the dequantize kernel one multiply and one cast."""
    qt = quantize(jnp.ones((4096, 4096)), "nf4", 64, True)
    a = jnp.ones((1, 4096), jnp.bfloat16)
    per_weight, ops = ops_per_weight(_path_fn(path, jnp.bfloat16), a, qt)
    print(path, per_weight)
    assert per_weight <= 6, sorted(ops, key=lambda o: -o[1])[:14]
    assert per_weight >= 3  # the count sees the unpacking and the lookup at least


def test_train_step_lowers_with_one_dequantize_call_per_projection_and_direction(monkeypatch):
    """A decoder's QLoRA train step on the GPU back end, lowered for CUDA: every quantized
    projection is one dequantize kernel forward and one backward (batch 2 x 8 = 16 rows,
    past the GEMV rows), plus XLA's dots; no other kernel. The first layer's q, k and v
    need no backward: their dx would only reach the frozen embedding, and jax drops it."""
    monkeypatch.setenv("JQLORA_QMATMUL", "pallas")  # the kernels, as on a tuned GPU
    model = TinyLM(vocab=64, hidden=64, heads=4, intermediate=128, layers=2)
    params = init_params(model, jax.random.key(0))
    lora = make_lora(jax.random.key(1), params)
    params = quantize_base(params)
    opt = optax.adam(1e-3)
    step = make_train_step(model, opt, compute_dtype=jnp.bfloat16, jit=False, donate=False)
    state = init_train_state(lora, opt)
    batch = {"input_ids": jnp.zeros((2, 8), jnp.int32)}
    text = lowered_text(lambda s, p, b: step(s, p, b), state, params, batch, platform="cuda")
    names = triton_kernel_names(text)
    projections = 7 * model.layers
    assert names.count("dequantize_nf4") == 2 * projections - 3, names
    assert set(names) == {"dequantize_nf4"}
