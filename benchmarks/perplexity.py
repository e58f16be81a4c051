"""Perplexity of SmolLM2-135M-Instruct in float, NF4 (double quant) and FP4: jqlora beside
transformers + bitsandbytes, on the same tokens in one run.

Text: the regular files of Debian's ``/usr/share/common-licenses`` in name order, joined by
blank lines, tokenized with the model's tokenizer; the first ``--tokens`` tokens are cut
into windows of ``--window`` tokens, each scored on its own (token t predicted from the
tokens before it in its window). Perplexity = exp(mean negative log-likelihood).

    python benchmarks/perplexity.py [--tokens 20480] [--window 1024] [--only float,nf4,fp4]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np

LICENSES = Path("/usr/share/common-licenses")
MODES = {  # name -> (quant_type, double_quant) or None for float
    "float": None,
    "nf4": ("nf4", True),
    "fp4": ("fp4", False),
}


def license_text() -> str:
    files = sorted(p for p in LICENSES.iterdir() if p.is_file() and not p.is_symlink())
    return "\n\n".join(p.read_text(errors="replace") for p in files)


def windows(tokenizer, n_tokens: int, window: int) -> np.ndarray:
    ids = tokenizer(license_text(), return_tensors="np")["input_ids"][0]
    if len(ids) < n_tokens:
        raise SystemExit(f"only {len(ids)} tokens of text, {n_tokens} asked")
    return ids[: n_tokens - n_tokens % window].reshape(-1, window).astype(np.int32)


def perplexity(nll_of_window, batches: np.ndarray) -> float:
    total = count = 0.0
    for w in batches:
        nll, n = nll_of_window(w[None])
        total += nll
        count += n
    return math.exp(total / count)


def jqlora_ppl(gguf: Path, mode: str, batches: np.ndarray) -> float:
    import jax
    import jax.numpy as jnp

    import jqlora

    jqlora.runtime.tune_cpu()  # as the jqlora command does (a no-op off the CPU)

    quant = MODES[mode]
    q = None if quant is None else jqlora.QuantConfig(quant[0], 64, quant[1])
    model, params = jqlora.load_hf(gguf, quantization=q, progress=False)

    @jax.jit
    def nll(params, ids):
        logits = model.apply({"params": params}, ids).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)
        return -jnp.sum(picked)

    return perplexity(lambda w: (float(nll(params, w)), w.shape[1] - 1), batches)


def transformers_ppl(gguf: Path, mode: str, batches: np.ndarray, float_dir: Path) -> float:
    import torch
    import transformers as tf

    quant = MODES[mode]
    if quant is None:
        model = tf.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    else:
        config = tf.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant[0],
            bnb_4bit_use_double_quant=quant[1],
            bnb_4bit_compute_dtype=torch.float32,
        )
        model = tf.AutoModelForCausalLM.from_pretrained(
            float_dir, quantization_config=config, device_map="cpu"
        )
        for m in model.modules():  # keep bitsandbytes on its exact path (no bf16 repacking)
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    model.eval()

    def nll(w):
        ids = torch.as_tensor(w, dtype=torch.long)
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        return float(-logp.gather(-1, ids[:, 1:, None]).sum()), w.shape[1] - 1

    return perplexity(nll, batches)


def save_float_copy(gguf: Path, out: Path) -> None:
    """The GGUF model in float safetensors, for transformers to quantize itself."""
    import torch
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20480)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--only", default="float,nf4,fp4")
    args = parser.parse_args()

    import transformers as tf

    from jqlora.hf.smollm2 import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    tokenizer = tf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    batches = windows(tokenizer, args.tokens, args.window)
    print(f"{batches.size} tokens in {len(batches)} windows of {args.window}")
    with tempfile.TemporaryDirectory() as tmp:
        float_dir = Path(tmp) / "float"
        modes = args.only.split(",")
        if any(MODES[m] for m in modes):
            save_float_copy(gguf, float_dir)
        print("| weights | jqlora | transformers + bitsandbytes | jqlora s | transformers s |")
        print("|---|---|---|---|---|")
        for mode in modes:
            t0 = time.perf_counter()
            ours = jqlora_ppl(gguf, mode, batches)
            t1 = time.perf_counter()
            theirs = transformers_ppl(gguf, mode, batches, float_dir)
            t2 = time.perf_counter()
            print(
                f"| {mode} | {ours:.3f} | {theirs:.3f} | {t1 - t0:.0f} | {t2 - t1:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
