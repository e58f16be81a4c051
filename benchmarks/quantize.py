"""Quantize throughput: jqlora (jit, CPU) vs bitsandbytes.functional.quantize_4bit (CPU).

Same run, same 4096 x 11008 bfloat16 matrix, NF4, blocksize 64, double quantization.
Also checks that both produced the same bytes. Run: ``python benchmarks/quantize.py``.
"""

from __future__ import annotations

import argparse
import logging
import time

import jax
import numpy as np


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=11008)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    logging.disable(logging.WARNING)  # bitsandbytes' optional-kernel notice at import
    import bitsandbytes.functional as bnbf
    import torch

    import jqlora

    jqlora.runtime.tune_cpu()  # as the jqlora command does (a no-op off the CPU)

    w = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0)).to(
        torch.bfloat16
    )
    w_jax = jax.numpy.asarray(w.float().numpy()).astype(jax.numpy.bfloat16)
    n = w.numel()

    # The offset's float32 summation order follows torch's thread count above 32768 blocks.
    threads = torch.get_num_threads()
    quantize = jax.jit(lambda x: jqlora.quantize(x, "nf4", 64, True, offset_threads=threads))
    qt = jax.block_until_ready(quantize(w_jax))  # compile
    t_jq = best_of(lambda: jax.block_until_ready(quantize(w_jax)), args.repeats)

    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    t_bnb = best_of(
        lambda: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True),
        args.repeats,
    )

    same_codes = np.array_equal(np.asarray(qt.codes).reshape(-1), packed.numpy().reshape(-1))
    same_stats = (
        np.array_equal(np.asarray(qt.absmax), state.absmax.numpy())
        and np.array_equal(np.asarray(qt.nested_absmax), state.state2.absmax.numpy())
        and np.float32(qt.offset) == state.offset.numpy()
    )
    print(
        f"matrix {args.rows}x{args.cols} bf16, nf4, blocksize 64, double quant; best of {args.repeats}"
    )
    print(f"jqlora       {t_jq:7.3f} s  {n / t_jq / 1e6:8.1f} M params/s")
    print(f"bitsandbytes {t_bnb:7.3f} s  {n / t_bnb / 1e6:8.1f} M params/s")
    print(f"ratio (jqlora / bitsandbytes throughput): {t_bnb / t_jq:.2f}x")
    print(
        f"identical codes: {same_codes}; identical absmax codes, nested absmax and offset: {same_stats}"
    )


if __name__ == "__main__":
    main()
