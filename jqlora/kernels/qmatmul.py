"""`qmatmul`: the one place a (possibly quantized) weight meets an activation.

    qmatmul(x, W) = x @ W.T        W: [out, in] (torch layout), x: [..., in]

For a `QuantizedTensor` ``W`` the product runs under one ``jax.custom_vjp``: the forward
``x @ W.T`` and the backward ``dx = dy @ dequantize(W)``; the frozen weight gets no
gradient. The back end is chosen here, never by callers: the Pallas kernel on TPU; on a
GPU whose table was tuned on it (`gpu_tiles.TUNED`) the Pallas kernels that
`gpu_tiles.TABLES` routes M (the activation's rows) and the direction to (a GEMV kernel for
small M, a dequantize kernel before XLA's ``dot`` for training-sized M); the XLA path
(dequantize a chunk, then ``dot``) on CPU and on GPUs not yet tuned.
``JQLORA_QMATMUL=xla|pallas`` (or ``backend=``) forces one.
"""

from __future__ import annotations

import contextlib
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from jqlora.kernels import xla
from jqlora.quant import QuantizedTensor

BACKENDS = ("xla", "pallas", "pallas_gpu", "pallas_tpu")
ENV_VAR = "JQLORA_QMATMUL"


def resolve_backend(w: QuantizedTensor, backend: str | None = None) -> str:
    """The back end that will run ``x @ W.T``: "xla", "pallas_gpu" or "pallas_tpu".

    ``backend`` (else ``$JQLORA_QMATMUL``, else automatic: "pallas_tpu" on TPU,
    "pallas_gpu" on a GPU in `gpu_tiles.TUNED`, "xla" on CPU and other GPUs) may name one; "pallas" means the Pallas kernels of
    the platform (the GPU kernels, interpreted, on a CPU). The kernels need whole blocks within each row
    (``in_features % blocksize == 0``); other weights always take the XLA path.
    """
    choice = backend or os.environ.get(ENV_VAR) or None
    if choice is not None and choice not in BACKENDS:
        raise ValueError(
            f"qmatmul: unknown backend {choice!r} (from backend= or ${ENV_VAR}); expected one of {BACKENDS}"
        )
    where = platform()
    if choice is None:
        choice = {"tpu": "pallas_tpu", "gpu": "pallas_gpu" if _gpu_tuned() else "xla"}.get(
            where, "xla"
        )
    elif choice == "pallas":
        choice = "pallas_tpu" if where == "tpu" else "pallas_gpu"
    if choice != "xla" and not kernel_supports(w):
        return "xla"
    return choice


def _gpu_tuned() -> bool:
    from jqlora.kernels import gpu_tiles  # lazily, as in _kernels

    return gpu_tiles.tuned()


def kernel_supports(w: QuantizedTensor) -> bool:
    """Whether the Pallas kernels handle ``w``: 2-D, 2-D codes, blocks within rows."""
    w = xla.local_weight(w)
    return w.codes.ndim == 2 and w.shape[1] % w.blocksize == 0


_platform_override: list[str] = []


def platform() -> str:
    """The platform the kernels are built for: `jax.default_backend`, or "gpu" inside
    `lowering_for_gpu`."""
    return _platform_override[-1] if _platform_override else jax.default_backend()


@contextlib.contextmanager
def lowering_for_gpu():
    """Trace for a GPU on a machine without one (to lower with ``lowering_platforms=("cuda",)``).

    Inside, `qmatmul` takes the GPU kernels, compiled rather than interpreted, and (where
    no GPU is attached) an abstract H100 is the target: jax >= 0.11 lowers a Triton kernel
    only for a named GPU.
    """
    target = contextlib.nullcontext()
    if jax.default_backend() != "gpu":
        device = jax.sharding.AbstractDevice("NVIDIA H100", None, "gpu")
        target = jax.sharding.use_abstract_mesh(
            jax.sharding.AbstractMesh((1,), ("gpu",), abstract_device=device)
        )
    _platform_override.append("gpu")
    try:
        with target:
            yield
    finally:
        _platform_override.pop()


def _kernels(backend: str, m: int):
    """``(matmul, matmul_t)`` of a back end for ``m`` activation rows.

    The GPU's kernel and tiles come from its row of `gpu_tiles.TABLES` for ``m`` and the
    direction: the only place a GPU product is routed. Pallas runs interpreted on a CPU.
    """
    if backend == "xla":
        return xla.matmul, xla.matmul_t
    interpret = platform() == "cpu"
    if backend == "pallas_gpu":
        from jqlora.kernels import gpu_tiles, pallas_gpu  # lazily: Triton's jax modules

        return (
            functools.partial(
                pallas_gpu.matmul, route=gpu_tiles.route(m, "fwd"), interpret=interpret
            ),
            functools.partial(
                pallas_gpu.matmul_t, route=gpu_tiles.route(m, "bwd"), interpret=interpret
            ),
        )
    from jqlora.kernels import pallas_tpu

    return (
        functools.partial(pallas_tpu.matmul, interpret=interpret),
        functools.partial(pallas_tpu.matmul_t, interpret=interpret),
    )


def _zero_cotangent(a):
    if a is None:
        return None
    if jnp.issubdtype(a.dtype, jnp.floating):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _qmatmul_2d(x: jax.Array, w: QuantizedTensor, dtype, backend: str) -> jax.Array:
    return _kernels(backend, x.shape[0])[0](x, w, dtype)


def _fwd(x, w, dtype, backend):
    return _kernels(backend, x.shape[0])[0](x, w, dtype), w


def _bwd(dtype, backend, w, dy):
    dx = _kernels(backend, dy.shape[0])[1](dy, w, dtype)
    return dx, jax.tree.map(_zero_cotangent, w)


_qmatmul_2d.defvjp(_fwd, _bwd)


def qmatmul(x: jax.Array, w, *, compute_dtype=None, backend: str | None = None) -> jax.Array:
    """``x @ W.T`` for a weight ``W`` of shape ``[out, in]`` (torch Linear layout).

    ``w`` is a ``QuantizedTensor`` or a plain array. The matmul runs in ``compute_dtype``
    (default: ``x.dtype``) with float32 accumulation, and returns that dtype. No gradient
    flows to a quantized ``w``; a plain ``w`` is an ordinary differentiable ``einsum``.
    """
    dtype = jnp.dtype(compute_dtype or x.dtype)
    x = x.astype(dtype)
    if not isinstance(w, QuantizedTensor):
        return jnp.einsum(
            "...k,nk->...n", x, w.astype(dtype), preferred_element_type=jnp.float32
        ).astype(dtype)
    w = xla.local_weight(w)
    k = w.shape[1]
    if x.shape[-1] != k:
        raise ValueError(
            f"qmatmul: x has {x.shape[-1]} features but the weight {w.shape} expects {k}"
        )
    lead = x.shape[:-1]
    y = _qmatmul_2d(x.reshape(-1, k), w, dtype, resolve_backend(w, backend))
    return y.reshape(*lead, w.shape[0])
