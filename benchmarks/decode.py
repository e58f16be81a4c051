"""Decode speed on SmolLM2-135M-Instruct: jqlora (KV cache, jitted while_loop) beside
transformers on the same machine, in one run.

    python benchmarks/decode.py [--new-tokens 64] [--batch 1] [--repeats 3]

Rows: jqlora with an NF4 (double-quantized) base and with the float32 base; transformers
float32; transformers + bitsandbytes NF4 (float32 compute) both as exact NF4 (its AVX512
repack switched off) and with its default CPU path (weights repacked to bf16 on the first
forward). All greedy, ``--new-tokens`` forced (no early eos).

Decode tokens/s = ``batch * (N - 1) / (t(N) - t(1))``: the time of a run producing N
tokens minus that of a run producing 1 (prefill + first token), so prompt processing and
(for jqlora) compilation are not counted; median over ``--repeats`` interleaved rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import numpy as np

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def jqlora_runner(path, quantization, batch_ids, new_tokens):
    import jqlora

    jqlora.runtime.tune_cpu()  # as the jqlora command does (a no-op off the CPU)
    from jqlora.generation import generate

    model, params = jqlora.load_hf(path, quantization)

    def run(n):
        generate(model, params, batch_ids, max_new_tokens=n)

    run(1), run(new_tokens)  # compile the shape buckets before timing (one when they coincide)
    return run


def torch_runner(model, batch_ids):
    import torch

    ids = torch.as_tensor(batch_ids)

    def run(n):
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    run(2)
    return run


def torch_models(path):
    """transformers float32 from the GGUF, and NF4 (exact / default CPU path) of the same weights."""
    import torch
    import transformers as tf

    float_model = tf.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    tmp = tempfile.mkdtemp()
    float_model.hf_quantizer = None
    if hasattr(float_model.config, "quantization_config"):
        del float_model.config.quantization_config
    float_model.save_pretrained(tmp)
    bnb = tf.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    exact = tf.AutoModelForCausalLM.from_pretrained(
        tmp, quantization_config=bnb, device_map="cpu"
    ).eval()
    for m in exact.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    repacked = tf.AutoModelForCausalLM.from_pretrained(
        tmp, quantization_config=bnb, device_map="cpu"
    ).eval()
    return float_model, exact, repacked


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 32 new tokens after this prompt (< 32 tokens) keep t(1) and t(N) in one shape bucket.
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    # On a machine shared with other jobs torch's spinning OpenMP threads can stall badly;
    # --torch-threads 1 is the fair setting there.
    parser.add_argument("--torch-threads", type=int, default=None)
    args = parser.parse_args()

    import torch
    import transformers as tf

    from jqlora.hf import QuantConfig
    from jqlora.hf.smollm2 import smollm2_gguf_path

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    path = smollm2_gguf_path()
    tokenizer = tf.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids = np.asarray(tokenizer(PROMPT)["input_ids"], np.int32)
    batch_ids = np.tile(ids, (args.batch, 1))
    float_model, exact, repacked = torch_models(path)
    makers = {
        "jqlora, NF4-DQ base, f32 compute": lambda: jqlora_runner(
            path, QuantConfig(), batch_ids, args.new_tokens
        ),
        "jqlora, float32": lambda: jqlora_runner(path, None, batch_ids, args.new_tokens),
        "transformers, float32": lambda: torch_runner(float_model, batch_ids),
        "transformers + bnb NF4-DQ, f32 compute (exact NF4)": lambda: torch_runner(
            exact, batch_ids
        ),
        "transformers + bnb NF4-DQ, default CPU path (bf16 repack)": lambda: torch_runner(
            repacked, batch_ids
        ),
    }
    runners = {}
    for name, make in makers.items():
        t = time.perf_counter()
        runners[name] = make()
        print(
            f"ready in {time.perf_counter() - t:.0f} s (load + compile + warm-up): {name}",
            file=sys.stderr,
            flush=True,
        )
    rates = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run(1)
            t1 = time.perf_counter()
            run(args.new_tokens)
            t2 = time.perf_counter()
            rates[name].append(args.batch * (args.new_tokens - 1) / ((t2 - t1) - (t1 - t0)))
            print(f"{name}: {rates[name][-1]:.1f} tokens/s", file=sys.stderr, flush=True)
    print(
        f"prompt {len(ids)} tokens, batch {args.batch}, {args.new_tokens} new tokens, median of {args.repeats}"
    )
    print("| run | decode tokens/s |")
    print("|---|---|")
    for name, r in rates.items():
        print(f"| {name} | {statistics.median(r):.1f} |")


if __name__ == "__main__":
    main()
