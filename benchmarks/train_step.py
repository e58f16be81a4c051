"""The QLoRA train step, jqlora beside PyTorch (PEFT + bitsandbytes, and PEFT LoRA without quantization).

Same model, same data, same recipe in every row: NF4 with double quantization (the LoRA row:
float base), LoRA r=16 alpha=32 dropout=0.05 on every linear layer but lm_head, AdamW at 2e-4
with the gradient norm clipped to 0.3, batch 4 x seq 256 of English text (the licence texts
in /usr/share/common-licenses, tokenized with SmolLM2's tokenizer). Each compute dtype in
``--dtype`` (default float32 and bfloat16) gives one row per implementation: float32 is the
exact path; bfloat16 is QLoRA's recipe (PEFT + bnb: ``bnb_4bit_compute_dtype`` and the model
in bfloat16, ``prepare_model_for_kbit_training`` keeping norms and adapters in float32;
jqlora: ``compute_dtype``, adapters float32), and on CPUs with AMX both frameworks' bfloat16
matmuls run several times their float32 rate.
Each implementation runs in its own process (so peak RSS is its own) for ``--steps`` steps:

- median step time over the steps after ``--warmup`` (compilation, first allocations), tokens/s;
  the first step's time, compilation included;
- peak RSS of the process;
- loss of the last step and eval loss on a held-out batch before and after;
- jqlora only: the step's model FLOP/s as a fraction of this machine's float32 ``jnp.dot``
  rate measured in the same process. Model FLOPs per step: ``4 N T`` (forward ``2 N T`` plus
  backward to the inputs ``2 N T``; N = parameters of every matmul incl. the LM head, T =
  tokens) plus attention ``8 L b s^2 d`` (QK^T and PV, forward and backward to inputs);
  also against the bfloat16 ``jnp.dot`` rate.

    python benchmarks/train_step.py                         # both configs, all three, 50 steps
    python benchmarks/train_step.py --config tiny --steps 20
    python benchmarks/train_step.py --config smollm2 --impl jqlora,peft-bnb --dtype bfloat16
    python benchmarks/train_step.py --config smollm2 --impl jqlora,jqlora-scan,jqlora-remat,jqlora-scan-remat --dtype bfloat16
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

IMPLS = ("jqlora", "peft-bnb", "peft-lora")
# jqlora with train-step options, by name (rows on request: --impl jqlora,jqlora-scan,...).
JQLORA_VARIANTS = {
    "jqlora": {},
    "jqlora-scan": dict(scan_layers=True),
    "jqlora-remat": dict(remat="nothing_saveable"),
    "jqlora-scan-remat": dict(scan_layers=True, remat="nothing_saveable"),
}
BATCH, SEQ = 4, 256
WORK = os.path.join(tempfile.gettempdir(), "jqlora-bench")
TINY = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)


# ----------------------------------------------------------------------------- shared inputs


def model_dir(config: str) -> str:
    """A float safetensors checkpoint every implementation loads (made once, cached)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    out = os.path.join(WORK, config)
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    if config == "tiny":
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**TINY))
    else:
        from jqlora.hf.smollm2 import smollm2_gguf_path

        gguf = smollm2_gguf_path(fetch=True)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        model.hf_quantizer = None  # a GGUF-loaded model refuses to save until these go
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.save_pretrained(out)
    return out


def token_batches(n_batches: int, vocab: int) -> np.ndarray:
    """``[n_batches, BATCH, SEQ]`` token windows of the licence texts (cycled if needed)."""
    cache = os.path.join(WORK, "tokens.npy")
    if not os.path.exists(cache):
        from jqlora.hf.smollm2 import smollm2_gguf_path
        from jqlora.train.data import load_tokenizer

        tok = load_tokenizer(str(smollm2_gguf_path(fetch=True)))
        text = "\n\n".join(
            open(p, errors="replace").read()
            for p in sorted(glob.glob("/usr/share/common-licenses/*"))
            if os.path.isfile(p)
        )
        os.makedirs(WORK, exist_ok=True)
        np.save(cache, np.asarray(tok(text)["input_ids"], np.int32))
    ids = np.load(cache) % vocab
    need = n_batches * BATCH * SEQ
    ids = np.resize(ids, need) if len(ids) < need else ids[:need]
    return ids.reshape(n_batches, BATCH, SEQ)


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------- workers


def run_jqlora(
    directory: str, batches: np.ndarray, steps: int, warmup: int, dtype: str, **options
) -> dict:
    import jax
    import jax.numpy as jnp

    import jqlora

    jqlora.runtime.tune_cpu()  # as the jqlora command does (a no-op off the CPU)
    from jqlora.lora.targets import linear_modules
    from jqlora.train.step import configure_model

    dot_rate, dot_rate_cpu = measure_dot_rate()
    bf16_dot_rate, _ = measure_dot_rate(dtype="bfloat16")
    model, params = jqlora.load_hf(
        directory, quantization=jqlora.QuantConfig("nf4", double_quant=True)
    )
    lora = jqlora.init_lora(
        jax.random.key(0),
        params,
        jqlora.LoraConfig(r=16, alpha=32, dropout=0.05, target_modules="all-linear"),
    )
    optimizer = jqlora.make_optimizer(2e-4, max_grad_norm=0.3)
    state = jqlora.init_train_state(lora, optimizer)
    step = jqlora.make_train_step(model, optimizer, compute_dtype=dtype, **options)
    eval_model = configure_model(model, compute_dtype=dtype, scan_layers=options.get("scan_layers"))
    # params go in as an argument: closed over, they would be constants of the program and
    # XLA would fold the dequantization at compile time (gigabytes of compile memory).
    eval_fn = jax.jit(
        lambda lora, params, b: jqlora.loss_fn(
            lora, params, b, model=eval_model, compute_dtype=dtype
        )[0]
    )
    held = {"input_ids": jnp.asarray(batches[-1])}
    eval_before = float(eval_fn(state.lora, params, held))
    times, cpu, faults, key = [], [], [], jax.random.key(1)
    for i in range(steps):
        t0, c0, f0 = time.perf_counter(), time.process_time(), minor_faults()
        state, m = step(
            state, params, {"input_ids": jnp.asarray(batches[i])}, rng=jax.random.fold_in(key, i)
        )
        loss = float(m["loss"])
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        faults.append(minor_faults() - f0)
    eval_after = float(eval_fn(state.lora, params, held))
    c = model.config
    n_matmul = sum(_size(_get(params, p)["weight"]) for p in linear_modules(params))
    if c.tie_word_embeddings:
        n_matmul += c.vocab_size * c.hidden_size
    tokens = BATCH * SEQ
    flops = (
        4 * n_matmul * tokens
        + 8 * c.num_hidden_layers * BATCH * SEQ * SEQ * c.num_attention_heads * c.head_dim
    )
    out = summary(times, cpu, faults, warmup, loss, eval_before, eval_after)
    out.update(
        model_flops_per_step=flops,
        dot_flops_per_s=dot_rate,
        dot_flops_per_cpu_s=dot_rate_cpu,
        model_flops_per_s=flops / out["median_step_s"],
        fraction_of_dot=flops / out["median_step_s"] / dot_rate,
        fraction_of_dot_cpu=flops / out["median_step_cpu_s"] / dot_rate_cpu,
        bf16_dot_flops_per_s=bf16_dot_rate,
        fraction_of_bf16_dot=flops / out["median_step_s"] / bf16_dot_rate,
    )
    return out


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _size(w) -> int:
    return int(np.prod(w.shape))


def measure_dot_rate(n: int = 2048, reps: int = 10, dtype: str = "float32") -> tuple[float, float]:
    """This machine's ``jnp.dot`` rate in ``dtype``: FLOP per wall second and per CPU second."""
    import jax
    import jax.numpy as jnp

    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    dot(a, b).block_until_ready()
    times, cpu = [], []
    for _ in range(reps):
        b = b + 1.0  # a fresh input each time
        b.block_until_ready()
        t0, c0 = time.perf_counter(), time.process_time()
        dot(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return 2 * n**3 / statistics.median(times), 2 * n**3 / statistics.median(cpu)


def run_torch(
    directory: str, batches: np.ndarray, steps: int, warmup: int, quantized: bool, dtype: str
) -> dict:
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    torch_dtype = getattr(torch, dtype)
    if quantized:
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype,
        )
        model = AutoModelForCausalLM.from_pretrained(
            directory, quantization_config=bnb, device_map="cpu", dtype=torch_dtype
        )
        for (
            m
        ) in model.modules():  # keep exact NF4 with a backward: no bf16 repacking on AVX512 CPUs
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype)
    model = get_peft_model(model, peft_lora_config())
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0
    )
    held = torch.tensor(batches[-1], dtype=torch.long)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            out = float(model(input_ids=held, labels=held).loss)
        model.train()
        return out

    eval_before = eval_loss()
    times, cpu, faults = [], [], []
    for i in range(steps):
        ids = torch.tensor(batches[i], dtype=torch.long)
        t0, c0, f0 = time.perf_counter(), time.process_time(), minor_faults()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(loss)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        faults.append(minor_faults() - f0)
    return summary(times, cpu, faults, warmup, loss, eval_before, eval_loss())


def peft_lora_config():
    """The recipe's adapters in PEFT: r=16, alpha=32, dropout 0.05, every linear layer but lm_head."""
    from peft import LoraConfig

    return LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
    )


def summary(times, cpu, faults, warmup, loss, eval_before, eval_after) -> dict:
    """Wall-clock figures, and CPU-time ones: on a machine shared with other jobs the wall
    clock measures the neighbours too, while the process's CPU seconds per step do not.
    ``faults``: minor page faults per step (memory the kernel maps and zeroes anew)."""
    median = statistics.median(times[warmup:] or times)
    median_cpu = statistics.median(cpu[warmup:] or cpu)
    return dict(
        median_step_s=median,
        first_step_s=times[0],  # compilation included
        tokens_per_s=BATCH * SEQ / median,
        median_step_cpu_s=median_cpu,
        tokens_per_cpu_s=BATCH * SEQ / median_cpu,
        page_faults_per_step=statistics.median(faults[warmup:] or faults),
        peak_rss_bytes=peak_rss(),
        loss_last_step=loss,
        eval_loss_before=eval_before,
        eval_loss_after=eval_after,
        steps=len(times),
    )


def worker(impl: str, config: str, steps: int, warmup: int, dtype: str) -> dict:
    directory = model_dir(config)
    vocab = json.load(open(os.path.join(directory, "config.json")))["vocab_size"]
    batches = token_batches(steps + 1, vocab)  # the last batch is held out
    if impl in JQLORA_VARIANTS:
        return run_jqlora(directory, batches, steps, warmup, dtype, **JQLORA_VARIANTS[impl])
    return run_torch(directory, batches, steps, warmup, quantized=impl == "peft-bnb", dtype=dtype)


# ----------------------------------------------------------------------------- driver


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=("smollm2", "tiny", "both"), default="both")
    p.add_argument(
        "--impl",
        default=",".join(IMPLS),
        help=f"comma-separated subset of {IMPLS + tuple(JQLORA_VARIANTS)[1:]}",
    )
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--dtype",
        default="float32,bfloat16",
        help="comma-separated compute dtypes, each a row per implementation",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(
            "RESULT "
            + json.dumps(worker(args.impl, args.config, args.steps, args.warmup, args.dtype)),
            flush=True,
        )
        return
    configs = ("tiny", "smollm2") if args.config == "both" else (args.config,)
    rows = []
    for config in configs:
        model_dir(config)  # build once, outside the timed processes
        token_batches(1, 2)
        for dtype, impl in [(d, i) for d in args.dtype.split(",") for i in args.impl.split(",")]:
            cmd = [
                sys.executable,
                __file__,
                "--dtype",
                dtype,
                "--worker",
                "--impl",
                impl,
                "--config",
                config,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(
                    f"{impl} ({dtype}) on {config} failed:\n{proc.stderr[-3000:]}", file=sys.stderr
                )
                continue
            row = dict(json.loads(line[7:]), impl=impl, config=config, dtype=dtype)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print_table(rows)


def print_table(rows):
    print(
        "\n| config | compute | implementation | first step (s) | median step (s) | tokens/s | vs PEFT+bnb | CPU s / step | tokens / CPU s | "
        "vs PEFT+bnb | page faults / step | peak RSS (GiB) | eval loss before -> after | last-step loss | model FLOP/s / f32 dot (/ bf16 dot) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = next(
            (
                x
                for x in rows
                if (x["config"], x["dtype"], x["impl"]) == (r["config"], r["dtype"], "peft-bnb")
            ),
            None,
        )
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "n/a"
        cpu_ratio = f"{r['tokens_per_cpu_s'] / ref['tokens_per_cpu_s']:.2f}x" if ref else "n/a"
        frac = (
            (
                f"{r['fraction_of_dot']:.0%} wall ({r['model_flops_per_s'] / 1e9:.0f} / {r['dot_flops_per_s'] / 1e9:.0f}"
                f" GFLOP/s), {r['fraction_of_dot_cpu']:.0%} CPU-time"
                f" ({r['fraction_of_bf16_dot']:.0%} of bf16 dot)"
            )
            if "fraction_of_dot" in r
            else ""
        )
        print(
            f"| {r['config']} | {r['dtype']} | {r['impl']} | {r.get('first_step_s', float('nan')):.1f} | {r['median_step_s']:.3f} | {r['tokens_per_s']:.0f} | {ratio} | "
            f"{r['median_step_cpu_s']:.3f} | {r['tokens_per_cpu_s']:.0f} | {cpu_ratio} | "
            f"{r.get('page_faults_per_step', float('nan')):.0f} | "
            f"{r['peak_rss_bytes'] / 2**30:.2f} | {r['eval_loss_before']:.3f} -> {r['eval_loss_after']:.3f} | "
            f"{r['loss_last_step']:.3f} | {frac} |"
        )


if __name__ == "__main__":
    main()
