"""QLoRA fine-tuning written out with jqlora's public pieces: a starting point for your own loop.

`jqlora finetune` does the same with progress bars, checkpoints and resume. This script
keeps only the training itself:

    python scripts/finetune.py                                 # SmolLM2-135M-Instruct, house-style set
    python scripts/finetune.py --model DIR_OR_GGUF --data my.jsonl --steps 200 --out my-adapter
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import jqlora
from jqlora.app.run_args import default_data_path
from jqlora.generation import generate
from jqlora.hf.peft import save_peft_adapter
from jqlora.hf.smollm2 import smollm2_gguf_path
from jqlora.train import data as jdata
from jqlora.train.schedules import make_schedule


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        default=None,
        help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct)",
    )
    p.add_argument("--data", default=default_data_path())
    p.add_argument("--out", default="runs/script-adapter")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    args = p.parse_args()
    jqlora.runtime.tune_cpu()  # before the first computation, as `jqlora finetune` does
    model_path = args.model or str(smollm2_gguf_path(fetch=True))

    # 1. Data: tokenize with the model's own tokenizer, hold out 10 %, batch by index.
    tokenizer = jdata.load_tokenizer(model_path)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    examples, _ = jdata.load_examples(args.data, tokenizer, args.seq_len)
    train, held_out = jdata.split_eval(examples, 0.1, seed=0)
    batches = jdata.BatchStream(train, args.batch_size, args.seq_len, pad_id, seed=0)

    # 2. The frozen base in NF4 with double quantization, and LoRA adapters on every linear layer.
    model, params = jqlora.load_hf(
        model_path, quantization=jqlora.QuantConfig("nf4", double_quant=True)
    )
    lora_config = jqlora.LoraConfig(r=16, alpha=32, dropout=0.05, target_modules="all-linear")
    lora = jqlora.init_lora(jax.random.key(0), params, lora_config)

    # 3. Clip to 0.3 + AdamW, constant learning rate after a short warm-up; the jitted step.
    optimizer = jqlora.make_optimizer(
        make_schedule("constant_with_warmup", args.lr, args.steps, max(1, args.steps // 30)),
        max_grad_norm=0.3,
    )
    state = jqlora.init_train_state(lora, optimizer)
    step = jqlora.make_train_step(model, optimizer)

    @jax.jit
    def eval_sums(lora, batch):
        loss, aux = jqlora.loss_fn(lora, params, batch, model=model)
        return loss * aux["tokens"], aux["tokens"]

    def eval_loss(lora):
        sums = [
            eval_sums(lora, b)
            for b in jdata.eval_batches(held_out, args.batch_size, args.seq_len, pad_id)
        ]
        return float(sum(s for s, _ in sums) / sum(n for _, n in sums))

    def answer(lora, example):
        first = int(np.argmax(example.loss_mask[1:])) + 1  # the prompt ends where the loss begins
        out = generate(
            model,
            params,
            example.input_ids[None, :first],
            lora=lora,
            max_new_tokens=40,
            eos_token_id=tokenizer.eos_token_id,
        )
        return tokenizer.decode(out[0, first:], skip_special_tokens=True).strip()

    print(f"eval loss before: {eval_loss(state.lora):.4f}")
    print(f"sample before: {answer(None, held_out[0])!r}")

    # 4. Train. `state` is donated to the step: always use the returned one.
    key = jax.random.key(1)
    t0, tokens = time.perf_counter(), 0
    for i in range(args.steps):
        batch = batches[i]
        state, metrics = step(state, params, batch, rng=jax.random.fold_in(key, i))
        tokens += int(batch["attention_mask"].sum())
        if (i + 1) % 10 == 0 or i + 1 == args.steps:
            rate = tokens / (time.perf_counter() - t0)
            print(f"step {i + 1:4d}  loss {float(metrics['loss']):.4f}  {rate:.0f} tokens/s")

    print(f"eval loss after: {eval_loss(state.lora):.4f}")
    print(f"sample after: {answer(state.lora, held_out[0])!r}")

    # 5. The adapter in PEFT format: PeftModel.from_pretrained(base, args.out) loads it.
    save_peft_adapter(
        args.out, jax.device_get(state.lora), lora_config, base_model_name_or_path=model_path
    )
    print(f"adapter written to {args.out}")


if __name__ == "__main__":
    main()
