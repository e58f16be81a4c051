"""qmatmul's XLA path against live bitsandbytes and against dequantize-then-dot; dispatch rules.

The Pallas kernels are tested against the XLA path in test_kernels_pallas.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jqlora.kernels import qmatmul, xla
from jqlora.kernels.qmatmul import resolve_backend
from jqlora.quant import QuantizedTensor, dequantize, quantize


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def weight(n, k, quant_type="nf4", blocksize=64, double_quant=True, seed=0):
    return quantize(
        jax.random.normal(jax.random.key(seed), (n, k)), quant_type, blocksize, double_quant
    )


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_xla_path_equals_bitsandbytes_dequantize_then_matmul(quant_type, double_quant):
    """y = x @ bnb.dequantize_4bit(W).T (torch float32) from the very bytes bitsandbytes wrote."""
    torch = pytest.importorskip("torch")
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    n, k, bs = 1000, 192, 64  # 3 row chunks at the chunk size set below, plus a tail
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen)
    x = torch.randn(5, k, generator=gen)
    packed, state = bnb_f.quantize_4bit(
        w, blocksize=bs, quant_type=quant_type, compress_statistics=double_quant
    )
    expected = x @ bnb_f.dequantize_4bit(packed, state).T

    qt = QuantizedTensor(
        codes=jnp.asarray(packed.numpy().reshape(n, k // 2)),
        absmax=jnp.asarray(state.absmax.numpy()),
        nested_absmax=jnp.asarray(state.state2.absmax.numpy()) if double_quant else None,
        offset=jnp.asarray(state.offset.numpy()) if double_quant else None,
        shape=(n, k),
        dtype=jnp.float32,
        quant_type=quant_type,
        blocksize=bs,
    )
    old = xla.CHUNK_ELEMENTS
    xla.CHUNK_ELEMENTS = 300 * k
    try:
        assert xla._split(xla.plain_absmax(qt))[0] is not None, "the test must exercise the scan"
        got = jax.jit(lambda x, w: qmatmul(x, w, backend="xla"))(jnp.asarray(x.numpy()), qt)
    finally:
        xla.CHUNK_ELEMENTS = old
    assert rel_err(got, expected.numpy()) < 1e-5


# (N, K, blocksize): blocks within rows, blocks across rows (K not a multiple), odd K.
SHAPES = [(70, 128, 64), (50, 96, 64), (45, 33, 32)]


@pytest.mark.parametrize("n,k,bs", SHAPES)
def test_xla_path_forward_and_grad_equal_dequantize_then_dot(monkeypatch, n, k, bs):
    monkeypatch.setattr(xla, "CHUNK_ELEMENTS", 16 * k)  # several chunks and a ragged tail
    qt = weight(n, k, blocksize=bs)
    x = jax.random.normal(jax.random.key(1), (2, 3, k))
    wd = dequantize(qt, jnp.float32)
    ct = jax.random.normal(jax.random.key(2), (2, 3, n))
    y, vjp = jax.jit(lambda x, w: jax.vjp(lambda x: qmatmul(x, w, backend="xla"), x))(x, qt)
    assert rel_err(y, x @ wd.T) < 1e-5
    (dx,) = jax.jit(vjp)(ct)
    assert rel_err(dx, ct @ wd) < 1e-5


def test_bf16_output_dtype_and_no_gradient_to_the_weight():
    qt = weight(40, 128)
    x = jax.random.normal(jax.random.key(1), (7, 128), jnp.bfloat16)
    y = jax.jit(lambda x, w: qmatmul(x, w, compute_dtype=jnp.bfloat16, backend="xla"))(x, qt)
    assert y.dtype == jnp.bfloat16
    ref = x.astype(jnp.float32) @ dequantize(qt, jnp.float32).T
    assert rel_err(y, ref) < 1e-2
    loss = lambda x, w: qmatmul(x, w).astype(jnp.float32).sum()
    gx, gw = jax.jit(jax.grad(loss, argnums=(0, 1), allow_int=True))(x, qt)
    assert gx.dtype == jnp.bfloat16
    assert float(jnp.abs(gw.nested_absmax).max()) == 0.0 and float(jnp.abs(gw.offset)) == 0.0


def test_plain_weight_is_differentiable_in_x_and_w():
    w = jax.random.normal(jax.random.key(0), (6, 4))
    x = jax.random.normal(jax.random.key(1), (3, 4))
    gx, gw = jax.grad(lambda x, w: qmatmul(x, w).sum(), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(gx, jnp.broadcast_to(w.sum(0), x.shape), rtol=1e-6)
    np.testing.assert_allclose(gw, jnp.broadcast_to(x.sum(0), w.shape), rtol=1e-6)


def test_dispatch(monkeypatch):
    qt = weight(8, 128)
    assert resolve_backend(qt) == "xla"  # CPU
    assert resolve_backend(qt, "pallas") == "pallas_gpu"
    monkeypatch.setenv("JQLORA_QMATMUL", "pallas_tpu")
    assert resolve_backend(qt) == "pallas_tpu"
    # Blocks across rows: the kernels cannot take it, the XLA path does.
    assert resolve_backend(weight(8, 96), "pallas") == "xla"
    monkeypatch.setenv("JQLORA_QMATMUL", "cuda")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        resolve_backend(qt)


@pytest.mark.parametrize(
    "platform,auto,pallas,chunk",
    [
        ("cpu", "xla", "pallas_gpu", xla.CHUNK_ELEMENTS),
        ("gpu", "xla", "pallas_gpu", xla.ACCELERATOR_CHUNK_ELEMENTS),
        ("tpu", "pallas_tpu", "pallas_tpu", xla.ACCELERATOR_CHUNK_ELEMENTS),
    ],
)
def test_automatic_backend_and_chunk_follow_the_platform(
    monkeypatch, platform, auto, pallas, chunk
):
    """CPUs and GPUs whose kernel table was not tuned on them take the XLA path, a tuned GPU
    its Pallas kernels (routed by M, gpu_tiles); chunks of a dequantized weight hold a whole
    Llama-2-7B projection on an accelerator."""
    from jqlora.kernels import gpu_tiles

    monkeypatch.delenv("JQLORA_QMATMUL", raising=False)
    monkeypatch.setattr(jax, "default_backend", lambda: platform)
    monkeypatch.setattr(jax, "devices", lambda *a: [type("D", (), {"device_kind": "NVIDIA H100"})])
    qt = weight(8, 128)
    assert (resolve_backend(qt), resolve_backend(qt, "pallas")) == (auto, pallas)
    monkeypatch.setattr(gpu_tiles, "TUNED", frozenset({"H100"}))
    tuned_auto = "pallas_gpu" if platform == "gpu" else auto
    assert resolve_backend(qt) == tuned_auto
    assert xla.chunk_elements() == chunk
    assert xla._chunk_rows(4096, 4096, 64) == (4096 if platform != "cpu" else 256)


def test_mismatched_features_and_bad_shard_are_named():
    qt = weight(8, 128)
    with pytest.raises(ValueError, match="x has 64 features"):
        qmatmul(jnp.ones((2, 64)), qt)
    cut = dataclasses.replace(qt, codes=qt.codes[:, :16])  # a cut through blocks' codes only
    with pytest.raises(ValueError, match="block boundaries"):
        qmatmul(jnp.ones((2, 32)), cut)


def test_chunked_scan_keeps_less_scratch_than_dequantize_then_dot():
    """Compiled temp memory: the scan holds one chunk, XLA's plain path the whole f32 weight."""
    n = k = 2048
    qt = weight(n, k)
    x = jax.ShapeDtypeStruct((256, k), jnp.float32)
    chunked = jax.jit(lambda x, w: xla.matmul(x, w, jnp.float32)).lower(x, qt).compile()
    whole = jax.jit(lambda x, w: x @ dequantize(w, jnp.float32).T).lower(x, qt).compile()
    chunked_mib = chunked.memory_analysis().temp_size_in_bytes / 2**20
    whole_mib = whole.memory_analysis().temp_size_in_bytes / 2**20
    assert whole_mib >= 16  # the whole 2048 x 2048 float32 weight is live
    assert chunked_mib < whole_mib / 2, (chunked_mib, whole_mib)
