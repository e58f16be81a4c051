"""`jqlora generate` and `jqlora chat`: talk to a model (and its adapter) from the terminal.

    jqlora generate --model DIR_OR_GGUF [--adapter DIR] --prompt TEXT [--prompt TEXT ...]
    jqlora chat     --model DIR_OR_GGUF [--adapter DIR] [--system TEXT]

``generate`` runs all prompts as one left-padded batch through ``jqlora.generation.generate`` and
prints each continuation; ``chat`` applies the tokenizer's chat template to the
conversation so far and streams the reply token by token. The tokenizer is the model's
own (transformers' ``AutoTokenizer``; from a GGUF file, ``jqlora.hf.tokenizer``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jqlora.app.argtypes import non_empty, non_negative_float, positive_int, probability
from jqlora.app.parsing import HelpFormatter, InputError

DTYPES = ("bfloat16", "float32")


def eos_ids(model_path: str, tokenizer) -> list[int]:
    """The tokenizer's eos plus any listed in the checkpoint's generation_config.json."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    config = os.path.join(model_path, "generation_config.json")
    if os.path.isfile(config):
        listed = json.loads(open(config).read()).get("eos_token_id")
        ids += [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
    return list(dict.fromkeys(ids))


def load_for_inference(args):
    """``(model, params, lora, tokenizer)`` from the command line's model options."""
    from jqlora.hf import QuantConfig, load_hf
    from jqlora.hf.hub import resolve_model
    from jqlora.hf.load import check_checkpoint_path
    from jqlora.hf.peft import check_adapter, load_peft_adapter
    from jqlora.hf.tokenizer import check_tokenizer_dir, load_tokenizer

    try:
        args.model = resolve_model(args.model)
    except ValueError as e:
        raise InputError(f"--model {e}") from None
    if not os.path.exists(args.model):
        raise InputError(f"--model {args.model}: no such file or directory")
    if args.adapter and not os.path.isdir(args.adapter):
        raise InputError(f"--adapter {args.adapter}: no such directory")
    try:  # both paths checked before the (slow) loading starts
        check_checkpoint_path(args.model)
        check_tokenizer_dir(args.model)
        if args.adapter:
            check_adapter(args.adapter)
    except ValueError as e:
        raise InputError(str(e)) from None
    quantization = QuantConfig(quant_type=args.quantize) if args.quantize else None
    try:
        model, params = load_hf(args.model, quantization, dtype=args.dtype)
        lora = load_peft_adapter(args.adapter, params)[0] if args.adapter else None
        tokenizer = load_tokenizer(args.model)
    except ValueError as e:
        raise InputError(str(e)) from None
    return model, params, lora, tokenizer


def _sampling(args) -> dict:
    import jax

    key = jax.random.PRNGKey(args.seed)
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, key=key)


def run_generate(args: argparse.Namespace) -> int:
    import numpy as np

    from jqlora.generation import generate

    model, params, lora, tokenizer = load_for_inference(args)
    encoded = [tokenizer(p)["input_ids"] for p in args.prompt]
    width = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.array([[pad] * (width - len(e)) + list(e) for e in encoded])
    mask = np.array([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    # One jitted call does all the decoding; its compilation is most of the wait on a CPU.
    print(
        f"compiling the decode loop, then generating up to {args.max_new_tokens} tokens...",
        file=sys.stderr,
        flush=True,
    )
    out = generate(
        model, params, ids, lora=lora, attention_mask=mask, max_new_tokens=args.max_new_tokens,
        eos_token_id=eos_ids(args.model, tokenizer) or None, pad_token_id=pad, **_sampling(args),
    )  # fmt: skip
    for i, row in enumerate(out[:, width:]):
        if len(args.prompt) > 1:
            print(f"--- {i}")
        print(tokenizer.decode(row, skip_special_tokens=True))
    return 0


def stream_reply(model, params, lora, tokenizer, ids, eos, args, out=None) -> str:
    """Streams the reply to ``ids`` to ``out`` (stdout) as it is produced; returns its text."""
    from jqlora.generation import stream_generate

    out = out or sys.stdout
    tokens, shown = [], ""
    for token in stream_generate(
        model,
        params,
        ids,
        lora=lora,
        max_new_tokens=args.max_new_tokens,
        eos_token_id=eos or None,
        **_sampling(args),
    ):
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        # A token may end inside a multi-byte character: wait for the rest of it.
        if not text.endswith("\ufffd"):
            out.write(text[len(shown) :])
            out.flush()
            shown = text
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    out.write(text[len(shown) :] + "\n")
    out.flush()
    return text


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def run_chat(args: argparse.Namespace) -> int:
    model, params, lora, tokenizer = load_for_inference(args)
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"--model {args.model}: the tokenizer has no chat template; use `jqlora generate`"
        )
    eos = eos_ids(args.model, tokenizer)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    print(
        "ready: the first reply waits while XLA compiles the decode loop (later replies reuse "
        "it until the conversation outgrows its length bucket)"
        + ("; /exit ends the chat" if interactive else ""),
        file=sys.stderr,
        flush=True,
    )
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        reply = stream_reply(
            model, params, lora, tokenizer, chat_ids(tokenizer, messages), eos, args
        )
        messages.append({"role": "assistant", "content": reply})


def _common(p: argparse.ArgumentParser, default_new_tokens: int) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="a Hugging Face checkpoint directory or Hub id (org/name), a .gguf file, or "
        "smollm2-135m-instruct "
        "(the model `jqlora finetune` trains by default)",
    )
    p.add_argument(
        "--adapter",
        help="a PEFT LoRA adapter directory to apply (e.g. runs/smollm2-house-style); "
        "without it, the base model alone",
    )
    p.add_argument(
        "--quantize",
        choices=("nf4", "fp4"),
        help="quantize the linear weights to 4 bits as they load, as in training; "
        "without it, they stay in --dtype",
    )
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="compute and weight dtype")
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=default_new_tokens,
        help="most tokens generated per reply (fewer if the model ends it)",
    )
    p.add_argument(
        "--temperature",
        type=non_negative_float,
        default=0.0,
        help="sampling temperature; 0: greedy decoding",
    )
    p.add_argument(
        "--top-k",
        type=positive_int,
        default=None,
        help="sample among the k most likely tokens only",
    )
    p.add_argument(
        "--top-p",
        type=probability,
        default=None,
        help="sample among the most likely tokens whose probabilities add up to p only",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")


def register(subparsers) -> None:
    g = subparsers.add_parser(
        "generate",
        help="continue prompts with a model (and adapter)",
        description="Continue one or more prompts (batched, left-padded) with a KV-cached, jitted "
        "decode loop. The prompt is used as it is (no chat template: see `jqlora chat`).",
        epilog="example:\n  jqlora generate --model smollm2-135m-instruct "
        '--prompt "The capital of France is" --prompt "def fibonacci(n):"',
        formatter_class=HelpFormatter,
    )
    _common(g, 128)
    g.add_argument(
        "--prompt",
        type=non_empty,
        action="append",
        required=True,
        help="prompt text; repeat for a batch",
    )
    g.set_defaults(func=run_generate)

    c = subparsers.add_parser(
        "chat",
        help="chat with a model (and adapter) in the terminal",
        description="Chat using the tokenizer's chat template; replies stream token by token. "
        "One line of standard input is one user turn; /exit or end of input ends the chat.",
        epilog="examples:\n"
        "  jqlora chat --model smollm2-135m-instruct --adapter runs/smollm2-house-style\n"
        '  echo "What is 17 + 25?" | jqlora chat --model smollm2-135m-instruct '
        "--adapter runs/smollm2-house-style",
        formatter_class=HelpFormatter,
    )
    _common(c, 512)
    c.add_argument(
        "--system", help="system prompt; without it, the chat template's default (if any)"
    )
    c.set_defaults(func=run_chat)
