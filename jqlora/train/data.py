"""Training data: JSON Lines -> token ids + loss mask -> fixed-shape batches, resumable.

Each line of the file is one example in one of four formats (the first key found decides):

- ``{"text": ...}``: plain text; loss on every token. A text longer than ``seq_len`` is cut
  into consecutive windows, so nothing is thrown away.
- ``{"prompt": ..., "completion": ...}``: loss on the completion (and the EOS after it).
- ``{"instruction": ..., "input"?: ..., "output": ...}`` (Alpaca): rendered with the Alpaca
  prompt; loss on the output (and EOS).
- ``{"messages": [{"role", "content"}, ...]}`` (chat): rendered with the tokenizer's chat
  template; loss on the assistant turns only (content and the end-of-turn token the template
  puts after it). Templates add their own default system prompt when the conversation has
  none (SmolLM2's does); generation renders the same way, so training and use agree.

The loss mask is aligned with the tokens: ``loss_mask[t] = 1`` means token ``t`` is a
target, i.e. the logits at ``t - 1`` are scored against it.

Batches are padded on the right to the smallest *bucket* length that holds their longest
example (two per octave up to ``seq_len``), so a run compiles the step for a handful of
shapes at most. The order of batches is a pure function of ``(seed, index)``: the i-th
micro-batch of a run is the same whether or not the run was interrupted, which is what
makes ``--resume`` bit-exact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Iterator, Sequence

import numpy as np

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. Write a response that "
    "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
FORMATS = ("text", "prompt/completion", "alpaca", "messages")


class DataError(ValueError):
    """A training file that cannot be used; the message names the file and line."""


class DataWarning(UserWarning):
    """Examples of a usable training file that were changed to fit (cut to seq_len)."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized sequence: ``input_ids`` (int32) and ``loss_mask`` (uint8), same length."""

    input_ids: np.ndarray
    loss_mask: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)


def load_tokenizer(model_path: str):
    """The transformers tokenizer of a model directory or a GGUF file (which carries its own);
    no PyTorch needed (``jqlora.hf.tokenizer``)."""
    from jqlora.hf.tokenizer import load_tokenizer as load

    return load(model_path)


def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """``(line_number, record)`` for every non-blank line; a bad line raises ``DataError``.

    Lines are decoded as UTF-8 one by one (a byte-order mark opening the file is allowed), so
    an undecodable byte is reported with its line.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, not a JSON Lines data file")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file")
    records, blank = [], 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})"
                ) from None
            if not line.strip():
                blank += 1
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})"
                ) from None
            except (ValueError, RecursionError) as e:  # huge integers, absurd nesting
                raise DataError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object, got {_json_type(record)}"
                )
            records.append((lineno, record))
    if not records:
        what = f" but for {blank} blank line(s)" if blank else ""
        raise DataError(
            f"{path}: no examples: the file is empty{what}; expected one JSON object per line"
        )
    return records


def _json_type(value) -> str:
    """The JSON name of a decoded value's type, for messages."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"a number ({value!r})"
    return names.get(type(value), type(value).__name__)


def _string(record: dict, key: str, where: str, optional: bool = False) -> str:
    if key not in record:
        if optional:
            return ""
        present = ", ".join(f'"{k}"' for k in sorted(record))
        raise DataError(f'{where}: missing "{key}" (the line has {present})')
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f'{where}: "{key}" must be a string, got {_json_type(value)}')
    return value


#: roles a chat example may use; chat templates render these (others they reject or garble)
CHAT_ROLES = ("system", "user", "assistant", "tool")


def check_record(record: dict, where: str) -> str:
    """The format of one example (one of ``FORMATS``), after checking its fields.

    Needs no tokenizer, so a whole file can be checked before a model is loaded. ``where``
    ("file:line") prefixes every error.
    """
    if "messages" in record:
        _check_messages(record["messages"], where)
        return "messages"
    if "text" in record:
        _string(record, "text", where)
        return "text"
    if "prompt" in record or "completion" in record:
        _string(record, "prompt", where), _string(record, "completion", where)
        return "prompt/completion"
    if "instruction" in record or "output" in record:
        _string(record, "instruction", where), _string(record, "output", where)
        _string(record, "input", where, optional=True)
        return "alpaca"
    raise DataError(
        f"{where}: unknown example format with keys {sorted(record)}; expected one of "
        '{"text"}, {"prompt", "completion"}, {"instruction", "input"?, "output"}, {"messages"}'
    )


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        got = "an empty array" if messages == [] else _json_type(messages)
        raise DataError(f'{where}: "messages" must be a non-empty list, got {got}')
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise DataError(f'{where}: messages[{i}] must be {{"role": str, "content": str}}')
        if m["role"] not in CHAT_ROLES:
            raise DataError(
                f"{where}: messages[{i}] has unknown role {m['role']!r}; expected one of "
                f"{', '.join(CHAT_ROLES)}"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant message to learn from")


def check_data_file(path: str) -> int:
    """Check every line of a JSON Lines data file without tokenizing; the number of examples."""
    records = read_jsonl(path)
    for lineno, record in records:
        check_record(record, f"{path}:{lineno}")
    return len(records)


def render(record: dict, tokenizer, where: str) -> tuple[str, list[tuple[int, int]], bool]:
    """The example as text, the character spans that carry loss, and whether to add BOS.

    ``where`` ("file:line") prefixes every error.
    """
    kind = check_record(record, where)
    eos = tokenizer.eos_token or ""
    if kind == "messages":
        return _render_chat(record["messages"], tokenizer, where) + (False,)
    if kind == "text":
        text = record["text"]
        return text, [(0, len(text))], True
    if kind == "prompt/completion":
        prompt, completion = record["prompt"], record["completion"]
        text = prompt + completion + eos
        return text, [(len(prompt), len(text))], True
    instruction, output, inp = record["instruction"], record["output"], record.get("input", "")
    prompt = ALPACA_PROMPT.format(
        with_input=", paired with an input that provides further context" if inp else "",
        instruction=instruction,
        input_block=f"### Input:\n{inp}\n\n" if inp else "",
    )
    text = prompt + output + eos
    return text, [(len(prompt), len(text))], True


def _render_chat(messages, tokenizer, where: str) -> tuple[str, list[tuple[int, int]]]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            f"{where}: chat examples need a tokenizer with a chat template; this one has none"
        )
    full = apply_chat_template(tokenizer, messages)
    spans = []
    # Each assistant turn is what rendering messages[:i+1] adds to messages[:i] + the
    # generation prompt: its content plus the template's end-of-turn marker.
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = apply_chat_template(tokenizer, messages[:i], add_generation_prompt=True)
        upto = apply_chat_template(tokenizer, messages[: i + 1])
        if not (full.startswith(upto) and upto.startswith(before)):
            raise DataError(
                f"{where}: the chat template does not render turn by turn; cannot find the assistant span"
            )
        end = len(upto)
        while (
            end > len(before) and upto[end - 1].isspace()
        ):  # newline after the end marker: no loss
            end -= 1
        spans.append((len(before), end))
    return full, spans


def apply_chat_template(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    """The conversation rendered as text (transformers 5 returns a dict when tokenizing; we never do)."""
    out = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return out if isinstance(out, str) else out["text"]


def tokenize(text: str, spans: Sequence[tuple[int, int]], tokenizer, add_bos: bool) -> Example:
    """Token ids of ``text`` and a mask marking tokens that fall inside ``spans``."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = list(enc["offset_mapping"])
    mask = [int(any(s <= start < e for s, e in spans)) for start, _ in offsets]
    bos = tokenizer.bos_token_id
    if (
        add_bos
        and bos is not None
        and getattr(tokenizer, "add_bos_token", True)
        and (not ids or ids[0] != bos)
    ):
        ids, mask = [bos] + ids, [0] + mask
    return Example(np.asarray(ids, np.int32), np.asarray(mask, np.uint8))


def load_examples(path: str, tokenizer, seq_len: int) -> tuple[list[Example], dict]:
    """Tokenize every line of ``path``; returns the examples and counts for the report.

    Chat / prompt / Alpaca examples longer than ``seq_len`` are truncated (counted, and one
    ``DataWarning`` names the first such line); those left with no loss token are dropped
    (counted). Texts are windowed. A file with no example left is a ``DataError``.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise DataError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    examples, stats = [], {"lines": 0, "truncated": 0, "dropped": 0}
    first: dict[str, int] = {}  # "truncated" / "dropped" -> first line number
    for lineno, record in read_jsonl(path):
        stats["lines"] += 1
        where = f"{path}:{lineno}"
        text, spans, add_bos = render(record, tokenizer, where)
        ex = tokenize(text, spans, tokenizer, add_bos)
        if "text" in record and "messages" not in record and len(ex) > seq_len:
            for s in range(0, len(ex) - 1, seq_len):  # windows; a 1-token tail has no target
                examples.append(
                    Example(ex.input_ids[s : s + seq_len], ex.loss_mask[s : s + seq_len])
                )
            continue
        if len(ex) > seq_len:
            stats["truncated"] += 1
            first.setdefault("truncated", lineno)
            ex = Example(ex.input_ids[:seq_len], ex.loss_mask[:seq_len])
        if ex.loss_mask[1:].sum() == 0:
            stats["dropped"] += 1
            first.setdefault("dropped", lineno)
            continue
        examples.append(ex)
    if not examples:
        why = (
            f"{stats['truncated']} of {stats['lines']} cut to seq_len left no answer token; "
            "raise --seq-len or shorten the prompts"
            if stats["truncated"]
            else "every example is empty or a single token"
        )
        raise DataError(
            f"{path}: no example has a token to learn from within seq_len={seq_len} ({why})"
        )
    if stats["truncated"]:
        dropped = (
            f"; {stats['dropped']} left without an answer token were dropped "
            f"(first: line {first['dropped']})"
            if stats["dropped"]
            else ""
        )
        warnings.warn(
            f"{path}: {stats['truncated']} example(s) longer than seq_len={seq_len} tokens were "
            f"cut to it (first: line {first['truncated']}){dropped}",
            DataWarning,
            stacklevel=2,
        )
    return examples, stats


def split_eval(
    examples: list[Example], eval_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """A held-out split: ``round(fraction * n)`` examples (at least 1 when fraction > 0 and n > 1)."""
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"eval fraction must be in [0, 1), got {eval_fraction}")
    n = len(examples)
    n_eval = min(n - 1, max(1, round(eval_fraction * n))) if eval_fraction > 0 and n > 1 else 0
    order = np.random.default_rng([seed, 0x5EED]).permutation(n)
    held = set(order[:n_eval].tolist())
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def bucket_lengths(seq_len: int, smallest: int = 32) -> tuple[int, ...]:
    """Lengths ``smallest * {1, 1.5} * 2**k`` below ``seq_len``, then ``seq_len`` itself.

    Two buckets per octave keep padding under a third of a batch while the step compiles
    for at most ``2 * log2(seq_len / smallest) + 1`` shapes.
    """
    out, b = [], smallest
    while b < seq_len:
        out.append(b)
        if b * 3 // 2 < seq_len:
            out.append(b * 3 // 2)
        b *= 2
    return tuple(out) + (seq_len,)


def collate(
    examples: Sequence[Example], batch_size: int, buckets: Sequence[int], pad_id: int
) -> dict:
    """Right-pad ``examples`` into ``[batch_size, bucket]`` arrays; missing rows are all padding.

    Returns ``input_ids`` (int32), ``attention_mask`` (int32, 1 on real tokens) and
    ``loss_mask`` (float32, 1 on target tokens).
    """
    longest = max(len(e) for e in examples)
    length = next((b for b in buckets if b >= longest), None)
    if length is None:
        raise DataError(f"an example of {longest} tokens exceeds the largest bucket {buckets[-1]}")
    ids = np.full((batch_size, length), pad_id, np.int32)
    attn = np.zeros((batch_size, length), np.int32)
    loss = np.zeros((batch_size, length), np.float32)
    for row, e in enumerate(examples):
        ids[row, : len(e)] = e.input_ids
        attn[row, : len(e)] = 1
        loss[row, : len(e)] = e.loss_mask
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


class BatchStream:
    """The run's micro-batches, addressable by index: ``stream[i]`` for i = 0, 1, 2, ...

    Epoch ``e`` visits the examples in the permutation drawn from ``(seed, e)``; the last
    batch of an epoch is filled up with padding rows (they carry no loss), so every example
    is seen once per epoch. The data position saved in a checkpoint is just ``i``.

    Buckets that fewer than ``min_share`` of the first epoch's batches would use are merged
    into the next larger one: compiling a shape for a handful of batches costs more than
    the padding it saves.
    """

    def __init__(
        self,
        examples: list[Example],
        batch_size: int,
        seq_len: int,
        pad_id: int,
        seed: int,
        min_share: float = 0.1,
    ):
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        if not examples:
            raise DataError("no training examples")
        self.examples, self.batch_size, self.pad_id, self.seed = examples, batch_size, pad_id, seed
        self.batches_per_epoch = -(-len(examples) // batch_size)
        self._order: tuple[int, np.ndarray] | None = None
        self.buckets = common_buckets(self._epoch_lengths(0), bucket_lengths(seq_len), min_share)

    def _epoch_lengths(self, epoch: int) -> list[int]:
        """The longest example of each batch of ``epoch``."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        lengths = np.asarray([len(e) for e in self.examples])[order]
        return [
            int(lengths[k : k + self.batch_size].max())
            for k in range(0, len(order), self.batch_size)
        ]

    def __getitem__(self, index: int) -> dict:
        epoch, k = divmod(index, self.batches_per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (
                epoch,
                np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)),
            )
        rows = self._order[1][k * self.batch_size : (k + 1) * self.batch_size]
        return collate([self.examples[r] for r in rows], self.batch_size, self.buckets, self.pad_id)


def common_buckets(
    batch_lengths: Sequence[int], buckets: Sequence[int], min_share: float
) -> tuple[int, ...]:
    """The buckets that at least ``min_share`` of the batches fit best, plus the largest used."""
    best = [next(b for b in buckets if b >= n) for n in batch_lengths]
    used = [b for b in buckets if b in best]
    keep = [b for b in used if best.count(b) >= min_share * len(best)]
    return tuple(sorted(set(keep) | {used[-1]}))


def eval_batches(
    examples: list[Example], batch_size: int, seq_len: int, pad_id: int
) -> Iterator[dict]:
    """The held-out set in fixed order, all padded to one length (one compiled evaluation)."""
    longest = max(len(e) for e in examples)
    bucket = (next(b for b in bucket_lengths(seq_len) if b >= longest),)
    for s in range(0, len(examples), batch_size):
        yield collate(examples[s : s + batch_size], batch_size, bucket, pad_id)


def count_target_tokens(examples: Sequence[Example]) -> int:
    """Tokens that carry loss (the first token of a sequence never does: nothing predicts it)."""
    return int(sum(e.loss_mask[1:].sum() for e in examples))
