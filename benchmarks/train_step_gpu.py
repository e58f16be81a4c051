"""The QLoRA train step on a GPU: tokens/s and device memory, jqlora beside PEFT LoRA.

The recipe of ``benchmarks/train_step.py`` (NF4 + double quantization, LoRA r=16 alpha=32
dropout=0.05 on every linear layer but lm_head, AdamW 2e-4, clip 0.3), bfloat16 compute, on
randomly initialised models of two shapes (no checkpoint travels to the GPU machine; the
step's time and memory do not depend on the weights' values):

- ``smollm2-135m``: SmolLM2-135M's config (30 layers, hidden 576, vocab 49152, tied head);
- ``llama-1b``: Llama-3.2-1B's config (16 layers, hidden 2048, vocab 128256, tied head).

Rows (each in its own process, so the peak memory is its own):

- ``jqlora``: the Pallas kernels `qmatmul` routes M to (``JQLORA_QMATMUL=pallas``: a GPU
  not yet in ``gpu_tiles.TUNED`` takes the XLA path unasked);
- ``jqlora-xla``: the same step with ``JQLORA_QMATMUL=xla`` (XLA dequantizes, then ``dot``);
- ``jqlora-scan``: the ``jqlora`` row with ``scan_layers=True`` (one compiled decoder layer);
- ``peft-lora``: PyTorch + PEFT LoRA on the bfloat16 model, not quantized (bitsandbytes is
  not installed on the GPU machine), eager, SDPA attention.

Each row: median step time after warm-up, tokens/s, peak device memory
(``peak_bytes_in_use`` / ``torch.cuda.max_memory_allocated``), the first step's time
(compilation included), the last loss, and the step's model FLOP/s counted as in
train_step.py (forward ``2 N T`` plus backward to the inputs ``2 N T``, N = matmul parameters
incl. the head, T = tokens, plus attention) over this GPU's bf16 ``jnp.dot`` rate measured in
the same process. ``--shape tiny`` runs the script on any machine (its times mean nothing).

    python benchmarks/train_step_gpu.py                       # both shapes, every row
    python benchmarks/train_step_gpu.py --shape smollm2-135m --rows jqlora --batch 4x256
    python benchmarks/train_step_gpu.py --lower --shape smollm2-135m   # any machine

``--lower`` only lowers jqlora's step for CUDA (no GPU needed), layers unrolled and scanned,
and prints its size: Triton calls, all custom calls, StableHLO operations, lowering time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = {
    "tiny": dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    ),
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "llama-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
}
START = time.perf_counter()
ROWS = ("jqlora", "peft-lora", "jqlora-xla", "jqlora-scan")


def hf_config(shape: str, seq: int) -> dict:
    return dict(
        model_type="llama",
        rms_norm_eps=1e-5,
        max_position_embeddings=max(seq, 2048),
        **SHAPES[shape],
    )


def model_flops(cfg: dict, batch: int, seq: int) -> int:
    """``4 N T`` (N = matmul parameters incl. the head) plus attention ``8 L b s^2 h d``."""
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    d, nq, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    per_layer = h * d * (2 * nq + 2 * nkv) + 3 * h * i
    n = layers * per_layer + cfg["vocab_size"] * h
    return 4 * n * batch * seq + 8 * layers * batch * seq * seq * nq * d


def log(message: str) -> None:
    """Progress on stderr, so that a run cut off by a time limit shows how far it got."""
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", file=sys.stderr, flush=True)


def bf16_dot_rate(n: int = 8192, reps: int = 10) -> float:
    import jax
    import jax.numpy as jnp

    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    bs = [jax.random.normal(jax.random.key(i + 1), (n, n), jnp.bfloat16) for i in range(3)]
    jax.block_until_ready(dot(a, bs[0]))
    times = []
    for r in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(dot(a, bs[r % 3]))
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def run_jqlora(
    shape: str, batch: int, seq: int, steps: int, warmup: int, scan_layers: bool = False
) -> dict:
    import jax
    import jax.numpy as jnp

    import jqlora
    from jqlora.models import model_for_config

    log(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    cfg = hf_config(shape, seq)
    model = model_for_config(cfg, jnp.bfloat16)
    init = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), init()["params"])
    params = jqlora.QuantConfig("nf4", double_quant=True).quantize_params(params)
    lora = jqlora.init_lora(
        jax.random.key(1), params, jqlora.LoraConfig(r=16, alpha=32, dropout=0.05)
    )
    optimizer = jqlora.make_optimizer(2e-4, max_grad_norm=0.3)
    state = jqlora.init_train_state(lora, optimizer)
    step = jqlora.make_train_step(
        model, optimizer, compute_dtype="bfloat16", scan_layers=scan_layers
    )
    ids = jax.random.randint(jax.random.key(2), (steps, batch, seq), 0, cfg["vocab_size"])
    log("model built and quantized")
    times, key = [], jax.random.key(3)
    for i in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, params, {"input_ids": ids[i]}, rng=jax.random.fold_in(key, i))
        loss = float(metrics["loss"])  # waits for the step
        times.append(time.perf_counter() - t0)
        log(f"step {i}: {times[-1]:.3f} s, loss {loss:.3f}")
    stats = jax.devices()[0].memory_stats() or {}
    return dict(
        times=times,
        loss=loss,
        peak_bytes=stats.get("peak_bytes_in_use"),
        dot_rate=bf16_dot_rate(8192 if jax.default_backend() == "gpu" else 1024),
        device=jax.devices()[0].device_kind,
        software=f"jax {jax.__version__}",
    )


def run_peft(shape: str, batch: int, seq: int, steps: int, warmup: int) -> dict:
    import torch
    from peft import get_peft_model
    from train_step import peft_lora_config  # the CPU benchmark beside this file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = hf_config(shape, seq)
    cfg.pop("model_type")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa"))
    model = model.to(torch.bfloat16)
    model = get_peft_model(model, peft_lora_config())
    for p in model.parameters():  # adapters in float32, as prepare_model_for_kbit_training does
        if p.requires_grad:
            p.data = p.data.float()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.0)
    gen = torch.Generator(device=dev).manual_seed(2)
    ids = torch.randint(0, cfg["vocab_size"], (steps, batch, seq), device=dev, generator=gen)
    cuda = dev == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = model(input_ids=ids[i], labels=ids[i]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(loss)
        times.append(time.perf_counter() - t0)
    return dict(
        times=times,
        loss=loss,
        peak_bytes=torch.cuda.max_memory_allocated() if cuda else None,
        device=torch.cuda.get_device_name() if cuda else "cpu",
        software=f"torch {torch.__version__}",
    )


def lower_report(shape: str, batch: int, seq: int) -> None:
    """Lower jqlora's step for CUDA, unrolled and scanned, from abstract inputs; print its size."""
    import re

    import jax
    import jax.numpy as jnp

    import jqlora
    from jqlora.kernels.qmatmul import lowering_for_gpu
    from jqlora.models import model_for_config

    cfg = hf_config(shape, seq)
    model = model_for_config(cfg, jnp.bfloat16)

    def build():
        params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
        params = jqlora.QuantConfig("nf4", double_quant=True).quantize_params(params)
        lora = jqlora.init_lora(jax.random.key(1), params, jqlora.LoraConfig(r=16, alpha=32))
        return params, lora

    optimizer = jqlora.make_optimizer(2e-4, max_grad_norm=0.3)
    params, lora = jax.eval_shape(build)
    state = jax.eval_shape(lambda lora: jqlora.init_train_state(lora, optimizer), lora)
    batch = {"input_ids": jax.ShapeDtypeStruct((batch, seq), jnp.int32)}
    for scan in (False, True):
        step = jqlora.make_train_step(
            model, optimizer, compute_dtype="bfloat16", scan_layers=scan, jit=False
        )
        t0 = time.perf_counter()
        with lowering_for_gpu():
            text = jax.jit(step).trace(state, params, batch).lower(lowering_platforms=("cuda",))
            text = text.as_text()
        seconds = time.perf_counter() - t0
        calls = re.findall(r"custom_call @(\S+)\(", text)
        triton = sum(c == "__gpu$xla.gpu.triton" for c in calls)
        ops = len(re.findall(r"= stablehlo\.|^\s*stablehlo\.", text, re.M))
        print(
            f"| {shape} | {batch['input_ids'].shape[0]} x {seq} | {'scanned' if scan else 'unrolled'} "
            f"| {triton} | {len(calls)} | {ops} | {len(text) / 2**20:.1f} | {seconds:.1f} |",
            flush=True,
        )


def worker(row: str, shape: str, batch: int, seq: int, steps: int, warmup: int) -> dict:
    os.environ["JQLORA_QMATMUL"] = "xla" if row == "jqlora-xla" else "pallas"
    if row == "peft-lora":
        out = run_peft(shape, batch, seq, steps, warmup)
    else:
        out = run_jqlora(shape, batch, seq, steps, warmup, scan_layers=row == "jqlora-scan")
    times = out.pop("times")
    median = statistics.median(times[warmup:])
    flops = model_flops(hf_config(shape, seq), batch, seq)
    out.update(
        first_step_s=times[0],
        median_step_s=median,
        tokens_per_s=batch * seq / median,
        model_flops=flops,
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--shape", default="smollm2-135m,llama-1b", help=f"comma-separated: {list(SHAPES)}"
    )
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {ROWS}")
    p.add_argument("--batch", default="8x1024", help="comma-separated BATCHxSEQ, e.g. 4x256")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300, help="seconds per row")
    p.add_argument(
        "--lower", action="store_true", help="only lower the step for CUDA; print its size"
    )
    p.add_argument(
        "--worker", nargs=4, metavar=("ROW", "SHAPE", "BATCH", "SEQ"), help=argparse.SUPPRESS
    )
    a = p.parse_args()
    if a.worker:
        row, shape, batch, seq = a.worker
        result = worker(row, shape, int(batch), int(seq), a.steps, a.warmup)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if a.lower:
        print(
            "| shape | batch x seq | layers | Triton calls | custom calls | StableHLO ops | MiB | lowering s |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for shape in a.shape.split(","):
            batch, seq = (int(v) for v in a.batch.split(",")[0].split("x"))
            lower_report(shape, batch, seq)
        return
    results = []
    # Row-major: under a time limit every shape gets the first row before any gets the next.
    for row in a.rows.split(","):
        for shape in a.shape.split(","):
            for bs in a.batch.split(","):
                batch, seq = (int(v) for v in bs.split("x"))
                cmd = [sys.executable, __file__, "--worker", row, shape, str(batch), str(seq)]
                cmd += ["--steps", str(a.steps), "--warmup", str(a.warmup)]
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
                except subprocess.TimeoutExpired as e:
                    err = e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr or ""
                    print(f"{row} {shape} {bs}: timed out after {a.timeout:.0f} s:\n{err[-2000:]}")
                    continue
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    print(f"{row} {shape} {bs} failed:\n{proc.stderr[-4000:]}", flush=True)
                    continue
                r = dict(json.loads(line[7:]), row=row, shape=shape, batch=batch, seq=seq)
                results.append(r)
                print(json.dumps(r), flush=True)
    print_table(results)


def print_table(results: list[dict]) -> None:
    print(
        "\n| shape | batch x seq | row | median step (ms) | tokens/s | vs peft-lora | "
        "peak device memory (GiB) | model FLOP/s / bf16 dot | first step (s) | last loss |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        peer = next(
            (
                x
                for x in results
                if (x["shape"], x["batch"], x["seq"], x["row"])
                == (r["shape"], r["batch"], r["seq"], "peft-lora")
            ),
            None,
        )
        ratio = f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}x" if peer else "n/a"
        mfu = (
            f"{r['model_flops'] / r['median_step_s'] / r['dot_rate']:.0%} "
            f"({r['model_flops'] / r['median_step_s'] / 1e12:.0f} / {r['dot_rate'] / 1e12:.0f} TFLOP/s)"
            if "dot_rate" in r
            else f"({r['model_flops'] / r['median_step_s'] / 1e12:.0f} TFLOP/s)"
        )
        peak = "-" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**30:.2f}"
        print(
            f"| {r['shape']} | {r['batch']} x {r['seq']} | {r['row']} | {r['median_step_s'] * 1e3:.1f} | "
            f"{r['tokens_per_s']:.0f} | {ratio} | {peak} | {mfu} | "
            f"{r['first_step_s']:.1f} | {r['loss']:.3f} |"
        )


if __name__ == "__main__":
    main()
