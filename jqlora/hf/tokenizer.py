"""The tokenizer of a checkpoint directory or a GGUF file, without PyTorch.

transformers reads a GGUF file's metadata with a reader that imports torch, so
``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` fails where torch is not installed,
and torch is not a dependency of jqlora. Here the metadata comes from the ``gguf`` package
and transformers' own GGUF tokenizer conversion builds the tokenizer from it: the result
encodes, decodes and applies the chat template as ``AutoTokenizer`` would.
"""

from __future__ import annotations

import os

from jqlora.hf.hub import resolve_model

# llama.cpp's special-token ids, as transformers names the tokens they point at.
_SPECIAL_TOKEN_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def load_tokenizer(model_path: str | os.PathLike, *, revision: str | None = None):
    """The transformers tokenizer of a model directory, or the one a ``.gguf`` file carries;
    ``model_path`` may be a Hub id (``jqlora.hf.hub.resolve_model``)."""
    path = resolve_model(model_path, revision=revision)
    if path.endswith(".gguf"):
        return load_gguf_tokenizer(path)
    from transformers import AutoTokenizer

    check_tokenizer_dir(path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:  # transformers' messages span lines and omit the path
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: cannot load the tokenizer ({first})") from None


# files of which a directory needs at least one for transformers to build a tokenizer
_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_tokenizer_dir(path: str | os.PathLike) -> None:
    """A ValueError naming ``path`` if the checkpoint directory holds no tokenizer file."""
    path = os.fspath(path)
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in _FILES):
        raise ValueError(f"{path}: no tokenizer in the directory (none of {', '.join(_FILES)})")


def load_gguf_tokenizer(path: str | os.PathLike):
    """A fast tokenizer built from the ``tokenizer.*`` metadata of a GGUF file."""
    import gguf
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    reader = gguf.GGUFReader(os.fspath(path))
    metadata = {
        key: field.contents()
        for key, field in reader.fields.items()
        if key.startswith("tokenizer.") or key == "general.architecture"
    }
    grouped = {
        group: {
            name: metadata[f"tokenizer.{key}"]
            for key, name in renames.items()
            if f"tokenizer.{key}" in metadata
        }
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    vocabulary, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if "tokens" not in vocabulary:
        raise ValueError(f"{path}: the GGUF file carries no tokenizer (no tokenizer.ggml.tokens)")
    if vocabulary.get("tokenizer_type") == "llama":
        # A sentencepiece vocabulary that does not say otherwise gets BOS (llama.cpp's rule).
        config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKEN_IDS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        config[name] = vocabulary["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], vocabulary)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)
