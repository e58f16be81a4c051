"""Packing on the house-style set: the padding share of an epoch's batches, and the target
tokens per second of `jqlora finetune` with and without `--packing`, one after the other on
the same machine.

    python benchmarks/packing.py [--steps 12] [--out /tmp/packing]

Padding share: the token slots of one epoch's micro-batches that hold no example token
(`attention_mask` 0), counted over every batch each stream yields. Throughput: target (loss)
tokens per second of training, from each run's metrics.jsonl (`tokens`, `step_s`), over the
steps after the first (which compiles).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import numpy as np


def padding_share(stream) -> float:
    slots = real = 0
    for i in range(stream.batches_per_epoch):
        mask = np.asarray(stream[i]["attention_mask"])
        slots, real = slots + mask.size, real + int(mask.sum())
    return 1.0 - real / slots


def streams():
    """The default run's training batches, padded and packed (its data, split, sizes, seed)."""
    from jqlora.app.config import FinetuneConfig
    from jqlora.app.run_args import default_data_path
    from jqlora.hf.smollm2 import smollm2_gguf_path
    from jqlora.train import data
    from jqlora.train.packing import PackedStream

    config = FinetuneConfig()
    d, seed = config.data, config.loop.seed
    tokenizer = data.load_tokenizer(smollm2_gguf_path(fetch=True))
    examples, _ = data.load_examples(default_data_path(), tokenizer, d.seq_len)
    train, _ = data.split_eval(examples, d.eval_fraction, seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return {
        "padded": data.BatchStream(train, d.batch_size, d.seq_len, pad, seed),
        "packed": PackedStream(train, d.batch_size, d.seq_len, pad, seed),
    }


def run(out: str, steps: int, packing: bool) -> dict:
    argv = ["finetune", "--steps", str(steps), "--out", out, "--eval-every", str(10 * steps)]
    if packing:
        argv.append("--packing")
    subprocess.run([sys.executable, "-m", "jqlora", *argv], check=True)
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    timed = [x for x in lines if "step_s" in x][1:]  # after the compiling first step
    return {
        "target_tokens_per_step": statistics.median(x["tokens"] for x in timed),
        "target_tokens_per_s": sum(x["tokens"] for x in timed) / sum(x["step_s"] for x in timed),
        "median_step_s": statistics.median(x["step_s"] for x in timed),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--out", default="/tmp/packing")
    args = p.parse_args()
    for name, stream in streams().items():
        print(
            f"{name}: {stream.batches_per_epoch} micro-batches an epoch, "
            f"padding share {padding_share(stream):.1%}",
            flush=True,
        )
    for packing in (False, True):
        out = os.path.join(args.out, "packed" if packing else "padded")
        r = run(out, args.steps, packing)
        print(
            f"{'packed' if packing else 'padded'}: median {r['target_tokens_per_step']:.0f} "
            f"target tokens and {r['median_step_s']:.2f} s a step, "
            f"{r['target_tokens_per_s']:.0f} target tokens/s",
            flush=True,
        )


if __name__ == "__main__":
    main()
