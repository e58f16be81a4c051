"""Device memory of one QLoRA train step with and without host-offloaded optimizer state,
beside the figure `jqlora.estimate_memory` predicts for the same setup.

For each setting (offload off / on) the script builds a randomly initialised Llama model
of the chosen shape, quantizes every decoder linear layer to NF4 (double quantization),
puts LoRA (r=64, all linear layers) on it, runs ``--steps`` donated AdamW steps and reports:

- the compiled step's ``memory_analysis()``: arguments, temporaries, and (on GPU/TPU) the
  bytes XLA places in host memory;
- on GPU/TPU, ``device.memory_stats()["peak_bytes_in_use"]``, reset between settings by
  running each setting in its own process;
- the estimate's device total for the same setting.

    python benchmarks/offload_memory.py                      # llama-1b shape, batch 4 x 512, bf16
    python benchmarks/offload_memory.py --shape tiny --steps 2   # a smoke run on any machine

On a CPU the host memory kinds are the same RAM, so only the compiled figures mean anything.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

SHAPES = {
    "tiny": dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "llama-1b": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5504,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
    ),
    "llama-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
}


def run_one(
    shape: str, offload: bool, batch: int, seq: int, steps: int, dtype: str, remat: bool
) -> dict:
    import jax
    import jax.numpy as jnp

    import jqlora

    jqlora.runtime.tune_cpu()  # as the jqlora command does (a no-op off the CPU)
    from jqlora.models import model_for_config

    cfg = dict(
        model_type="llama",
        rms_norm_eps=1e-5,
        max_position_embeddings=max(seq, 64),
        tie_word_embeddings=False,
        **SHAPES[shape],
    )
    model = model_for_config(cfg, jnp.dtype(dtype))
    params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))()[
        "params"
    ]
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    lora_config = jqlora.LoraConfig(r=64)
    lora = jqlora.init_lora(jax.random.key(1), params, lora_config)
    params = jqlora.QuantConfig().quantize_params(params)
    optimizer = jqlora.make_optimizer(2e-4)
    if offload:
        optimizer = jqlora.offload(optimizer)
    state = jqlora.init_train_state(lora, optimizer)
    step = jqlora.make_train_step(
        model, optimizer, compute_dtype=dtype, remat="nothing_saveable" if remat else None
    )
    ids = jax.random.randint(jax.random.key(2), (batch, seq), 0, cfg["vocab_size"])
    data = {"input_ids": ids}
    mem = step.lower(state, params, data).compile().memory_analysis()
    for _ in range(steps):
        state, metrics = step(state, params, data)
    float(metrics["loss"])
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    est = jqlora.estimate_memory(
        cfg,
        lora_config,
        batch,
        seq,
        offload=offload,
        remat=remat,
        compute_dtype=dtype,
        backend="kernel" if device.platform in ("gpu", "cuda", "tpu") else "xla",
    )
    return {
        "platform": device.platform,
        "device": str(device.device_kind),
        "offload": offload,
        "argument_bytes": mem.argument_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes,
        "host_argument_bytes": mem.host_argument_size_in_bytes,
        "xla_peak_bytes": mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes,
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
        "estimate_device_bytes": est.qlora.total,
        "estimate_host_bytes": sum(est.qlora.host.values()),
        "final_loss": float(metrics["loss"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--remat", action="store_true")
    p.add_argument("--one", choices=("plain", "offload"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(
            json.dumps(
                run_one(a.shape, a.one == "offload", a.batch, a.seq, a.steps, a.dtype, a.remat)
            )
        )
        return
    rows = []
    for which in ("plain", "offload"):
        cmd = [
            sys.executable,
            __file__,
            "--one",
            which,
            "--shape",
            a.shape,
            "--batch",
            str(a.batch),
            "--seq",
            str(a.seq),
            "--steps",
            str(a.steps),
            "--dtype",
            a.dtype,
        ] + (["--remat"] if a.remat else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    mib = lambda n: "-" if n is None else f"{n / 2**20:.1f}"  # noqa: E731
    print(
        f"{rows[0]['device']} ({rows[0]['platform']}), {a.shape}, batch {a.batch} x {a.seq}, {a.dtype}, "
        f"remat={a.remat}, LoRA r=64 all-linear, NF4-DQ base"
    )
    print(
        "| optimizer state | XLA peak (MiB) | args (MiB) | host args (MiB) | temps (MiB) | "
        "peak_bytes_in_use (MiB) | estimate device (MiB) | estimate host (MiB) | loss |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {'host (offload)' if r['offload'] else 'device'} | {mib(r['xla_peak_bytes'])} | "
            f"{mib(r['argument_bytes'])} | {mib(r['host_argument_bytes'])} | {mib(r['temp_bytes'])} | "
            f"{mib(r['peak_bytes_in_use'])} | {mib(r['estimate_device_bytes'])} | "
            f"{mib(r['estimate_host_bytes'])} | {r['final_loss']:.4f} |"
        )


if __name__ == "__main__":
    main()
