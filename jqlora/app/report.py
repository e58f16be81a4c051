"""What a run shows its user: sample answers, the loss-curve plot, the end-of-run report."""

from __future__ import annotations

import json
import os
import resource
import sys

import jax
import numpy as np


def sample_answer(model, params, lora, tokenizer, prompt_ids, *, max_new_tokens: int = 48) -> str:
    """The model's greedy answer to ``prompt_ids`` as text (special tokens dropped)."""
    from jqlora.generation import generate

    stop = [t for t in (tokenizer.eos_token_id,) if t is not None]
    ids = generate(
        model,
        params,
        np.asarray(prompt_ids)[None],
        lora=lora,
        max_new_tokens=max_new_tokens,
        eos_token_id=stop or None,
    )
    return tokenizer.decode(ids[0, len(prompt_ids) :], skip_special_tokens=True).strip()


def peak_memory_bytes() -> dict:
    """Peak host RSS of this process, and the accelerator's peak where the backend reports one."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_bytes": rss * (1 if sys.platform == "darwin" else 1024)}
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # backends without memory statistics
        stats = {}
    if "peak_bytes_in_use" in stats:
        out["peak_device_bytes"] = int(stats["peak_bytes_in_use"])
    return out


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss(metrics: list[dict], path: str, eval_loss_before: float | None = None) -> str:
    """Training loss per step and eval loss where measured (``eval_loss_before``: at step
    0, before training), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    if eval_loss_before is not None:
        evals.insert(0, (0, eval_loss_before))
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    if train:
        ax.plot(*zip(*train, strict=True), lw=1, label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_report(result) -> str:
    """A short Markdown report of a finished run (``result`` is a ``FinetuneResult``)."""
    lines = [
        f"# Fine-tuning report: {result.model}",
        "",
        f"- data: {result.data} ({result.n_train} train / {result.n_eval} held-out examples)",
        f"- steps: {result.steps} (batch {result.batch_size} x grad-accum {result.grad_accum}, seq <= {result.seq_len})",
        f"- eval loss: {format_loss(result.eval_loss_before)} before -> {format_loss(result.eval_loss_after)} after",
        *([f"- recipe: {describe_recipe(result.config)}"] if result.config is not None else []),
        f"- throughput: {result.tokens_per_s:.0f} tokens/s (steps without compilation)",
        f"- train time: {result.train_time_s:.0f} s",
    ]
    mem = result.memory
    lines.append(f"- peak host memory (RSS): {_gib(mem['peak_rss_bytes'])}")
    if "peak_device_bytes" in mem:
        lines.append(f"- peak device memory: {_gib(mem['peak_device_bytes'])}")
    if result.sample_prompt is not None:
        lines += [
            "",
            "## Sample (greedy)",
            "",
            f"Prompt: {result.sample_prompt!r}",
            "",
            "Before:",
            "",
            _quote(result.sample_before),
            "",
            "After:",
            "",
            _quote(result.sample_after),
        ]
    return "\n".join(lines) + "\n"


def describe_recipe(config) -> str:
    """The recipe in a line, for the report: optimizer, schedule, clipping, packing."""
    o, s = config.optim, config.schedule
    schedule = f"{s.lr_scheduler}, warm-up {s.warmup_steps} steps" + (
        f", min lr ratio {s.min_lr_ratio:g}" if s.lr_scheduler == "cosine_with_min_lr" else ""
    )
    clip = f"max grad norm {o.max_grad_norm:g}" if o.max_grad_norm else "no clipping"
    return (
        f"{o.optimizer} (lr {o.lr:g}, weight decay {o.weight_decay:g}, betas "
        f"{o.adam_beta1:g}/{o.adam_beta2:g}, eps {o.adam_epsilon:g}, {clip}"
        + (", state in host memory" if o.offload else "")
        + f"); schedule {schedule}; packing {'on' if config.data.packing else 'off'}"
    )


def format_loss(x: float | None) -> str:
    """A loss to four decimals, or n/a."""
    return "n/a" if x is None else f"{x:.4f}"


def _quote(text) -> str:
    return "\n".join("> " + line for line in str(text).splitlines()) or "> (empty)"
