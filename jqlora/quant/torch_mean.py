"""``torch.mean`` of a float32 vector on the CPU, reproduced bit for bit in JAX.

bitsandbytes' double-quantization offset is ``absmax.mean()``. torch computes it on the CPU
as a float32 sum in the order of its cascade kernel (``cascade_sum`` in ATen's
``native/cpu/SumKernel.cpp``), then one correctly rounded division by ``n``. A float32 sum in
any other order lands one or two ulps away, and the offset then moves absmax codes. The
order, for a contiguous vector of ``n`` floats:

- ``n`` is split into ``LANES``-wide vectors (8 floats: torch dispatches its x86 sum kernel
  with 256-bit vectors, also on AVX512 CPUs) and ``n % LANES`` scalars at the end.
- The vectors are taken four at a time (ILP), giving ``4 x LANES`` independent accumulators.
  Each sums its ``size`` inputs in chunks of ``step = 2**max(4, ceil(log2(size)) // 4)``
  running adds; chunk sums are added running into level 1, whose sum moves to level 2 every
  ``step`` chunks, whose sum moves to level 3 every ``step**2`` chunks (level 3 keeps
  adding). Leftover inputs after the last whole chunk go into a fresh level 0. Result:
  ``((level0 + level1) + level2) + level3``.
- Vectors beyond the last group of four are added to accumulator 0, then accumulators 1, 2, 3
  are added to it, lane by lane.
- The scalar tail is summed running from 0, then the ``LANES`` lanes are added to it in order.
- Fewer than ``LANES`` floats: the same four-accumulator scheme over scalars.
- With ``threads > 1`` and ``n >= GRAIN``, ``k = min(threads, ceil(n / GRAIN))`` threads
  each sum one of ``k`` equal slices (``ceil(n / k)`` floats, the last one shorter) as
  above, and the ``threads`` per-thread sums (0 for idle threads) are summed the same way.

Every add is a separate float32 addition, which XLA keeps in order (it does not reassociate
floating-point adds), so the result is the same on every back end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

#: floats per vector in torch's CPU sum kernel for float32
LANES = 8
#: accumulators interleaved per row sum (``ilp_factor``)
ILP = 4
#: cascade levels in ``multi_row_sum``
LEVELS = 4
#: torch's ``at::internal::GRAIN_SIZE``: shorter reductions run on one thread
GRAIN = 32768


def _ceil_log2(x: int) -> int:
    return 1 if x <= 2 else (x - 1).bit_length()


def _running_sum(x: jax.Array, axis: int = 0):
    """``((x[0] + x[1]) + x[2]) + ...`` along ``axis``; None for an empty axis (a sum of 0)."""
    if x.shape[axis] == 0:
        return None
    take = lambda i: jax.lax.index_in_dim(x, i, axis, keepdims=False)
    total = take(0)
    for i in range(1, x.shape[axis]):
        total = total + take(i)
    return total


def _plus(a, b):
    """``a + b`` where None stands for an exact 0 (adding it changes nothing)."""
    return b if a is None else a if b is None else a + b


def _multi_row_sum(rows: jax.Array) -> jax.Array:
    """torch's ``multi_row_sum``: rows ``(size, ILP, ...)`` to ``(ILP, ...)`` by cascade levels."""
    size, rest = rows.shape[0], rows.shape[1:]
    step = 1 << max(4, _ceil_log2(size) // LEVELS)
    n_chunks = size // step
    sums = _running_sum(rows[: n_chunks * step].reshape(n_chunks, step, *rest), axis=1)
    carried = []  # what levels 1 and 2 hold at the end, then level 3
    for _ in range(LEVELS - 2):
        if sums is None:
            break
        whole = sums.shape[0] // step
        carried.append(_running_sum(sums[whole * step :]))
        sums = _running_sum(sums[: whole * step].reshape(whole, step, *rest), axis=1)
    carried.append(None if sums is None else _running_sum(sums))
    total = _running_sum(rows[n_chunks * step :])
    for level in carried:
        total = _plus(total, level)
    return jnp.zeros(rest, rows.dtype) if total is None else total


def _row_sum(x: jax.Array) -> jax.Array:
    """torch's ``row_sum`` over axis 0 of ``x`` (scalars or ``LANES``-wide vectors)."""
    size, rest = x.shape[0], x.shape[1:]
    groups = size // ILP
    partial = _multi_row_sum(x[: groups * ILP].reshape(groups, ILP, *rest))
    total = partial[0]
    for i in range(groups * ILP, size):
        total = total + x[i]
    for k in range(1, ILP):
        total = total + partial[k]
    return total


def _one_thread_sum(x: jax.Array) -> jax.Array:
    """The float32 sum of a 1-D ``x`` in the order of one thread of torch's kernel."""
    n = x.shape[0]
    if n < LANES:
        return _row_sum(x)
    n_vectors = n // LANES
    lanes = _row_sum(x[: n_vectors * LANES].reshape(n_vectors, LANES))
    return _running_sum(jnp.concatenate([x[n_vectors * LANES :], lanes]))


def torch_sum(x: jax.Array, threads: int = 1) -> jax.Array:
    """``torch.sum(x)`` of a 1-D float32 ``x`` on the CPU with ``threads`` threads, bit-exact."""
    x = jnp.asarray(x, jnp.float32)
    n = x.shape[0]
    if threads == 1 or n < GRAIN:
        return _one_thread_sum(x)
    k = min(threads, -(-n // GRAIN))
    size = -(-n // k)
    parts = [_one_thread_sum(x[start : start + size]) for start in range(0, n, size)]
    return _one_thread_sum(jnp.stack(parts + [jnp.float32(0.0)] * (threads - len(parts))))


def torch_mean(x: jax.Array, threads: int = 1) -> jax.Array:
    """``torch.mean(x)`` of a 1-D float32 ``x`` on the CPU: `torch_sum` then ``/ n``, bit-exact.

    XLA rewrites a division by a constant as a multiplication by its rounded reciprocal,
    which is not the correctly rounded quotient torch computes; ``min(|total|, 0)`` (0, or
    NaN exactly when the total is) makes the divisor opaque to that rewrite.
    """
    total = torch_sum(x, threads)
    return total / (np.float32(x.shape[0]) + jnp.minimum(jnp.abs(total), 0.0))
