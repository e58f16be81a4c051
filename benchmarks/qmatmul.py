"""jqlora's NF4 matmul on a GPU against bf16 ``jnp.dot`` and dequantize-then-dot.

    python benchmarks/qmatmul.py                 # the full table (M x Llama-2 7B/70B shapes)
    python benchmarks/qmatmul.py --tune          # first sweep the kernels' tiles, print a table
    python benchmarks/qmatmul.py --backward      # also the backward product dx = dy @ W
    python benchmarks/qmatmul.py --smoke         # tiny shapes, any machine (checks the script)
    python benchmarks/qmatmul.py --memory        # compiled scratch: chunked XLA vs deq+dot (any machine)

For each (M, K, N), in bf16 with float32 accumulation, ``y = x @ W.T`` with ``W [N, K]``:

* ``jqlora``: `qmatmul` on the NF4 weight (double-quantized, blocksize 64): the GPU kernel
  its table routes M to (``kernel`` column: GEMV or dequantize kernel + ``dot``);
* ``dot``: ``jnp.dot`` on the bf16 weight;
* ``deq+dot``: ``x @ dequantize(W, bf16).T`` as XLA compiles it;
* ``xla-chunked``: the chunked XLA back end of `qmatmul` (the fallback).

Correctness first: every method is compared with a float32 reference before any timing.
Timing: one jitted program applies a method to ``R`` distinct weight copies (more bytes than
the L2 cache, so every call reads from HBM) and fresh activations; its wall time over ``R``,
median of ``--reps`` runs after warm-up, is the time of one call. TFLOP/s counts ``2MNK``;
GB/s counts the bytes a method must move (weight in its stored format, x, y).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from jqlora.kernels import gpu_tiles, pallas_gpu, qmatmul, xla
from jqlora.kernels.qmatmul import _kernels, resolve_backend
from jqlora.quant import QuantizedTensor, dequantize, quantize

PEAK_TFLOPS = 790.0  # H200, bf16 dense, measured ceiling
PEAK_GBPS = 4300.0  # H200, device copy, measured ceiling
MS = (1, 4, 16, 64, 1024, 4096)
#: (model, projection, K = in_features, N = out_features)
SHAPES = (
    ("7B", "q/k/v/o", 4096, 4096),
    ("7B", "gate/up", 4096, 11008),
    ("7B", "down", 11008, 4096),
    ("70B", "q/o", 8192, 8192),
    ("70B", "k/v", 8192, 1024),
    ("70B", "gate/up", 8192, 28672),
    ("70B", "down", 28672, 8192),
)
SMOKE_SHAPES = (("tiny", "proj", 256, 96),)
L2_BYTES = 50 * 2**20


def random_nf4(key, n: int, k: int, blocksize: int = 64) -> QuantizedTensor:
    """A double-quantized NF4 weight with random bytes: timing does not depend on the values."""
    kc, ka, kn = jax.random.split(key, 3)
    n_blocks = n * k // blocksize
    return QuantizedTensor(
        codes=jax.random.randint(kc, (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8),
        absmax=jax.random.randint(ka, (n_blocks,), 0, 256, jnp.int32).astype(jnp.uint8),
        nested_absmax=jax.random.uniform(kn, (-(-n_blocks // 256),), jnp.float32, 0.01, 0.02),
        offset=jnp.float32(0.02),
        shape=(n, k),
        dtype=jnp.bfloat16,
        quant_type="nf4",
        blocksize=blocksize,
    )


def methods(backend: str, backward: bool = False, names=None):
    """name -> (prepare(weight_qt) -> operand, f(a, operand), bytes of the operand).

    Forward ``a = x [M, K]``: ``x @ W.T``. Backward ``a = dy [M, N]``: ``dx = dy @ W``, the
    product `qmatmul`'s custom_vjp computes (its kernel called directly, so nothing else is
    timed).
    """
    bf16 = jnp.bfloat16
    if backward:
        fused = lambda dy, q: _kernels(resolve_backend(q, backend), dy.shape[0])[1](dy, q, bf16)
        chunked = lambda dy, q: xla.matmul_t(dy, q, bf16)
        dot = lambda a, w: jnp.dot(a, w, preferred_element_type=jnp.float32).astype(bf16)
    else:
        fused = lambda x, q: qmatmul(x, q, backend=backend)
        chunked = lambda x, q: qmatmul(x, q, backend="xla")
        dot = lambda a, w: jnp.dot(a, w.T, preferred_element_type=jnp.float32).astype(bf16)
    every = {
        "jqlora": (lambda q: q, fused, lambda q: q.nbytes),
        "dot": (lambda q: dequantize(q, bf16), dot, lambda w: w.size * 2),
        "deq+dot": (lambda q: q, lambda a, q: dot(a, dequantize(q, bf16)), lambda q: q.nbytes),
        "xla-chunked": (lambda q: q, chunked, lambda q: q.nbytes),
    }
    return {name: every[name] for name in names or every}


def check_correctness(ms, backend: str, smoke: bool) -> None:
    """Every method against a float32 reference on a real quantized weight (bf16 tolerance)."""
    n, k = (96, 256) if smoke else (1024, 4096)
    w = jax.random.normal(jax.random.key(0), (n, k), jnp.float32)
    qt = quantize(w, "nf4", 64, True)
    ref_w = dequantize(qt, jnp.float32)
    for m in ms:
        for backward in (False, True):
            a = jax.random.normal(jax.random.key(m), (m, n if backward else k), jnp.float32)
            ref = a @ ref_w if backward else a @ ref_w.T
            for name, (prep, f, _) in methods(backend, backward).items():
                y = jax.jit(f)(a.astype(jnp.bfloat16), prep(qt)).astype(jnp.float32)
                err = float(jnp.abs(y - ref).max() / jnp.abs(ref).max())
                if not err < 1e-2:
                    where = "backward" if backward else "forward"
                    sys.exit(
                        f"correctness FAILED: {name} {where} at M={m}: relative error {err:.2e}"
                    )
    print(
        f"correctness: all methods, forward and backward, within 1e-2 of float32 for M in {tuple(ms)}"
    )


def time_call(f, args_list, reps: int) -> float:
    """Seconds per call: one program over all argument sets, median of ``reps`` runs."""
    many = jax.jit(lambda all_args: [f(*a) for a in all_args])
    jax.block_until_ready(many(args_list))  # compile + warm-up
    jax.block_until_ready(many(args_list))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(many(args_list))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / len(args_list)


def bench(ms, shapes, backend: str, reps: int, backward: bool = False, names=None) -> list[dict]:
    rows = []
    for model, proj, k, n in shapes:
        nf4_bytes = n * k // 2
        copies = max(2, min(32, math.ceil(4 * L2_BYTES / nf4_bytes)))
        weights = [random_nf4(jax.random.key(i), n, k) for i in range(copies)]
        for m in ms:
            xs = [
                jax.random.normal(jax.random.key(100 + i), (m, n if backward else k), jnp.bfloat16)
                for i in range(copies)
            ]
            kernel = gpu_tiles.route(m, "bwd" if backward else "fwd").kernel
            row = dict(model=model, proj=proj, m=m, k=k, n=n, kernel=kernel)
            for name, (prep, f, nbytes) in methods(backend, backward, names).items():
                operands = [prep(w) for w in weights]
                t = time_call(f, list(zip(xs, operands, strict=True)), reps)
                moved = nbytes(operands[0]) + 2 * m * (k + n)
                row[name] = dict(us=t * 1e6, tflops=2 * m * n * k / t / 1e12, gbps=moved / t / 1e9)
                del operands
            rows.append(row)
            print(format_row(row), flush=True)
        del weights
    return rows


HEADER = (
    "| model | proj | M | K | N | kernel | jqlora us | TFLOP/s | GB/s | dot us | deq+dot us "
    "| xla-chunked us | jqlora vs dot | target | % TFLOP ceiling | % BW ceiling |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _us(row: dict, name: str) -> str:
    return f"{row[name]['us']:.1f}" if name in row else "-"


def format_row(r: dict) -> str:
    fused, dot = r["jqlora"], r["dot"]
    speedup = dot["us"] / fused["us"]
    target = 2.5 if r["m"] <= 16 else (0.8 if r["m"] >= 1024 else None)
    verdict = (
        "-" if target is None else (f">= {target}x " + ("PASS" if speedup >= target else "FAIL"))
    )
    return (
        f"| {r['model']} | {r['proj']} | {r['m']} | {r['k']} | {r['n']} | {r['kernel']} | "
        f"{fused['us']:.1f} | "
        f"{fused['tflops']:.1f} | {fused['gbps']:.0f} | {dot['us']:.1f} | {_us(r, 'deq+dot')} | "
        f"{_us(r, 'xla-chunked')} | {speedup:.2f}x | {verdict} | "
        f"{100 * fused['tflops'] / PEAK_TFLOPS:.0f}% | {100 * fused['gbps'] / PEAK_GBPS:.0f}% |"
    )


GEMV_CANDIDATES = [
    gpu_tiles.GemvTiles(bn, bk, programs, warps)
    for bn, bk, programs, warps in [
        (4, 256, 1024, 4),
        (4, 512, 1024, 4),
        (4, 512, 2048, 8),
        (16, 256, 1024, 4),
        (32, 128, 2048, 8),
    ]
]
DEQUANT_CANDIDATES = [
    gpu_tiles.DequantTiles(elements, warps)
    for elements, warps in [(4096, 4), (8192, 4), (16384, 8), (32768, 8)]
]


def tune(ms, shapes, reps: int, interpret: bool) -> None:
    """Time both kernels over their candidate tiles per (M, shape, direction); print the
    table row set for `gpu_tiles.TABLES` (GEMV where it beats dequantize, up to some M)."""
    bf16 = jnp.bfloat16
    best: dict = {}  # (direction, m) -> {(kernel, tiles): summed seconds over shapes}
    for model, proj, k, n in shapes:
        copies = max(2, min(32, math.ceil(4 * L2_BYTES / (n * k // 2))))
        weights = [random_nf4(jax.random.key(i), n, k) for i in range(copies)]
        for direction, f in (("fwd", pallas_gpu.matmul), ("bwd", pallas_gpu.matmul_t)):
            for m in ms:
                cols = k if direction == "fwd" else n
                xs = [
                    jax.random.normal(jax.random.key(100 + i), (m, cols), bf16)
                    for i in range(copies)
                ]
                candidates = [
                    ("dequant", t) for t in DEQUANT_CANDIDATES[: 2 if interpret else None]
                ]
                if m <= 64:
                    candidates += [("gemv", t) for t in GEMV_CANDIDATES[: 2 if interpret else None]]
                for kernel, tiles in candidates:
                    route = gpu_tiles.Route(m, kernel, tiles)
                    g = lambda a, w, route=route, f=f: f(a, w, bf16, route, interpret=interpret)
                    try:
                        t = time_call(g, list(zip(xs, weights, strict=True)), reps)
                    except (
                        Exception
                    ) as e:  # a tile set the compiler refuses (shared memory, registers)
                        print(
                            f"  {direction} M={m} {kernel} {tiles}: {type(e).__name__}", flush=True
                        )
                        continue
                    totals = best.setdefault((direction, m), {})
                    totals[(kernel, tiles)] = totals.get((kernel, tiles), 0.0) + t
                winner = min(best[(direction, m)].items(), key=lambda kv: kv[1])
                print(f"tune {direction} {model} {proj} M={m}: so far best {winner[0]}", flush=True)
        del weights
    print(f"# gpu_tiles.TABLES[{gpu_tiles.gpu_name()!r}], from benchmarks/qmatmul.py --tune")
    print(f"# (and add {gpu_tiles.gpu_name()!r} to gpu_tiles.TUNED once it beats the XLA path):")
    print("{")
    for direction in ("fwd", "bwd"):
        winners = {m: min(best[(direction, m)].items(), key=lambda kv: kv[1])[0] for m in ms}
        gemv_ms = [m for m in ms if winners[m][0] == "gemv"]
        # GEMV up to the largest M it won with no dequantize win below it.
        cross = max(
            (m for m in gemv_ms if all(winners[j][0] == "gemv" for j in ms if j <= m)), default=0
        )
        rows = []
        if cross:
            rows.append(f"Route({cross}, 'gemv', {winners[cross][1]!r})")
        rows.append(f"Route(ANY_M, 'dequant', {winners[max(ms)][1]!r})")
        print(f"    {direction!r}: ({', '.join(rows)},),")
    print("}")


def memory_report(m: int = 512, k: int = 4096, n: int = 4096) -> None:
    """Compiled temp bytes of the chunked XLA path vs dequantize-then-dot, and their times."""
    qt = random_nf4(jax.random.key(0), n, k)
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jax.random.normal(jax.random.key(1), (m, k), dtype)
        report = []
        for name, f in (
            ("xla-chunked", lambda x, w: qmatmul(x, w, backend="xla")),
            ("deq+dot", lambda x, w: x @ dequantize(w, x.dtype).T),
        ):
            temp = jax.jit(f).lower(x, qt).compile().memory_analysis().temp_size_in_bytes
            seconds = time_call(f, [(x, qt)], reps=3)
            report.append(f"{name} {temp / 2**20:.1f} MiB, {seconds * 1e3:.0f} ms")
        print(
            f"scratch, M={m} K={k} N={n} {jnp.dtype(dtype).name} on {jax.default_backend()}: "
            + ", ".join(report)
        )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, Pallas interpreted on a CPU")
    p.add_argument("--tune", action="store_true", help="first sweep the GPU kernels' tiles per M")
    p.add_argument("--memory", action="store_true", help="only the compiled-scratch comparison")
    p.add_argument("--backward", action="store_true", help="also time dx = dy @ W")
    p.add_argument("--no-table", action="store_true", help="no timing table (with --tune)")
    p.add_argument(
        "--methods", default="jqlora,dot,deq+dot,xla-chunked", help="comma-separated columns"
    )
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--m", type=int, nargs="*", default=list(MS))
    p.add_argument("--models", default="7B,70B", help="comma-separated subset of 7B,70B")
    args = p.parse_args(argv)
    platform = jax.default_backend()
    if args.memory:
        return memory_report()
    if platform != "gpu" and not args.smoke:
        sys.exit(
            f"this benchmark needs a GPU (jax sees {platform!r}); --smoke runs it on tiny shapes"
        )
    models = args.models.split(",")
    shapes = SMOKE_SHAPES if args.smoke else tuple(s for s in SHAPES if s[0] in models)
    ms = [1, 7] if args.smoke else args.m
    reps = 2 if args.smoke else args.reps
    print(
        f"date {time.strftime('%Y-%m-%d %H:%M')}, jax {jax.__version__}, device {jax.devices()[0].device_kind}"
    )
    check_correctness(ms, "pallas", args.smoke)
    if args.tune:
        tune(ms, shapes[:1], reps, interpret=args.smoke)  # 7B q/k/v: one shape, in time
    if args.no_table:
        return
    names = args.methods.split(",")
    for backward in (False, True) if args.backward else (False,):
        print("\nbackward, dx = dy @ W (same columns)" if backward else "\nforward, y = x @ W.T")
        print(HEADER)
        bench(ms, shapes, "pallas", reps, backward=backward, names=names)


if __name__ == "__main__":
    main()
