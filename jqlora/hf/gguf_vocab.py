"""A tokenizer as GGUF ``tokenizer.*`` metadata, the way llama.cpp reads it.

From a GGUF file the fields are copied as they are. From a Hugging Face tokenizer (a
directory, or a transformers tokenizer saved to one) the ``gguf`` package's vocabulary
helpers read the files: ``BpeVocab`` (byte-level BPE: SmolLM2, Llama 3, Qwen2),
``SentencePieceVocab`` (``tokenizer.model``, when sentencepiece is installed) or
``LlamaHfVocab`` (a sentencepiece-style BPE in tokenizer.json), and ``SpecialVocab`` (merges,
special token ids, add-BOS/EOS flags, chat template). Added tokens become CONTROL (special)
or USER_DEFINED tokens, so llama.cpp matches them in text as single tokens; the list is
padded with unused ``[PADn]`` tokens to the model's vocabulary size.

llama.cpp picks its pre-tokenizer regex by the name in ``tokenizer.ggml.pre``; it is read
here off the tokenizer.json pre-tokenizer (``PRE_TOKENIZERS``), "default" when unknown.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import gguf

# llama.cpp's pre-tokenizer names, by the Split regex (Llama 3, Qwen2) or the pre-tokenizer
# sequence (types, and Digits' individual_digits) of tokenizer.json.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    ("Split", _LLAMA3_REGEX): "llama-bpe",
    ("Split", _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")): "qwen2",
    ("Digits:individual", "ByteLevel:regex"): "smollm",
    ("ByteLevel:regex",): "gpt-2",
}


def _pre_tokenizer_key(pre: dict | None) -> tuple:
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    key: list[str] = []
    for step in steps:
        kind = step.get("type")
        if kind == "Split" and isinstance(step.get("pattern"), dict):
            key += ["Split", step["pattern"].get("Regex", "")]
        elif kind == "Digits":
            key.append("Digits:individual" if step.get("individual_digits") else "Digits")
        elif kind == "ByteLevel":
            if step.get("use_regex", True):
                key.append("ByteLevel:regex")
        else:
            key.append(str(kind))
    return tuple(key)


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer.json."""
    key = _pre_tokenizer_key(tokenizer_json.get("pre_tokenizer"))
    name = PRE_TOKENIZERS.get(key)
    if name is None:
        warnings.warn(
            f"GGUF export: llama.cpp has no known pre-tokenizer for {key!r}; writing 'default' "
            "(llama.cpp may split text differently from the Hugging Face tokenizer)",
            UserWarning,
            stacklevel=3,
        )
        return "default"
    return name


def add_tokenizer(writer: gguf.GGUFWriter, source, n_vocab: int) -> None:
    """Write the tokenizer of ``source`` (a .gguf path, a tokenizer directory, or a
    transformers tokenizer) into ``writer`` for a model with ``n_vocab`` embedding rows."""
    if hasattr(source, "save_pretrained"):
        with tempfile.TemporaryDirectory() as tmp:
            source.save_pretrained(tmp)
            return _add_hf_tokenizer(writer, Path(tmp), n_vocab)
    path = Path(os.fspath(source))
    if path.suffix == ".gguf":
        return _copy_gguf_tokenizer(writer, path, n_vocab)
    if not path.is_dir():
        raise ValueError(f"{path}: not a tokenizer directory or .gguf file")
    return _add_hf_tokenizer(writer, path, n_vocab)


def _copy_gguf_tokenizer(writer: gguf.GGUFWriter, path: Path, n_vocab: int) -> None:
    reader = gguf.GGUFReader(str(path))
    fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in fields:
        raise ValueError(f"{path}: the GGUF file carries no tokenizer (no tokenizer.ggml.tokens)")
    n_tokens = len(fields["tokenizer.ggml.tokens"].data)
    if n_tokens != n_vocab:
        raise ValueError(f"{path}: the tokenizer has {n_tokens} tokens, the model {n_vocab} rows")
    for key, field in fields.items():
        sub_type = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)


def _hf_vocab(directory: Path):
    if (directory / "tokenizer.model").is_file():
        try:
            return gguf.vocab.SentencePieceVocab(directory)
        except RuntimeError:  # sentencepiece is not installed: read tokenizer.json instead
            pass
    try:
        return gguf.vocab.BpeVocab(directory)
    except FileNotFoundError:
        pass
    try:
        return gguf.vocab.LlamaHfVocab(directory)
    except (FileNotFoundError, TypeError) as e:
        raise ValueError(f"{directory}: no tokenizer llama.cpp can read ({e})") from None


def _add_hf_tokenizer(writer: gguf.GGUFWriter, directory: Path, n_vocab: int) -> None:
    vocab = _hf_vocab(directory)
    tokens, scores, types = (list(x) for x in zip(*vocab.all_tokens(), strict=True))
    tokenizer_json = directory / "tokenizer.json"
    spec = json.loads(tokenizer_json.read_text("utf-8")) if tokenizer_json.is_file() else {}
    for added in spec.get("added_tokens", []):
        if added["id"] < len(types):
            special = added.get("special", False)
            types[added["id"]] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    if len(tokens) > n_vocab:
        raise ValueError(
            f"{directory}: the tokenizer has {len(tokens)} tokens, the model {n_vocab} rows"
        )
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    if vocab.tokenizer_model == "gpt2":
        writer.add_tokenizer_pre(pre_tokenizer_name(spec))
    else:
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(
        directory, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=n_vocab
    )
    special.add_to_gguf(writer, quiet=True)
