"""Where a model is: a local path, the bundled SmolLM2's name, or a Hugging Face Hub id.

``resolve_model`` is the one place a model argument becomes a local path; ``load_hf``, the
tokenizer loading and every command's ``--model`` go through it. A Hub id (``org/name``)
is fetched with ``huggingface_hub.snapshot_download``, which honours ``HF_HOME`` /
``HF_HUB_CACHE`` (where the cache is), ``HF_HUB_OFFLINE`` (cache only) and the token
(``HF_TOKEN`` or ``hf auth login``); only the files a load reads are fetched.
"""

from __future__ import annotations

import os
import re

from jqlora.hf import smollm2

#: the files ``load_hf`` and the tokenizer read from a Hub snapshot (weights, config,
#: tokenizer, chat template), as ``snapshot_download`` allow patterns
HUB_FILES = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

# ``org/name`` as the Hub spells repository ids (huggingface_hub's validate_repo_id rule)
_REPO_ID = re.compile(r"[\w\-.]{1,96}/[\w\-.]{1,96}")


def is_hub_id(model: str) -> bool:
    """Whether ``model`` is spelled like a Hub model id ``org/name`` (not a ``.gguf`` path)."""
    return (
        bool(_REPO_ID.fullmatch(model))
        and ".." not in model
        and not model.startswith((".", "-"))
        and not model.endswith((".", "-", ".gguf"))
    )


def resolve_model(
    model: str | os.PathLike,
    *,
    revision: str | None = None,
    gguf_file: str | None = None,
) -> str:
    """The local path of ``model``.

    model: an existing file or directory (returned as it is: a local path always wins over a
      Hub id of the same spelling); ``smollm2.MODEL_NAME`` (the GGUF file, fetched once); or
      a Hub id ``org/name``, whose snapshot directory is returned. Anything else is returned
      unchanged, for the reader to report what is missing.
    revision: the branch, tag or commit of a Hub id (default ``main``).
    gguf_file: a GGUF file inside the Hub repository to fetch as well.

    A Hub id that is neither cached nor reachable raises a ValueError naming it.
    """
    path = os.fspath(model)
    if os.path.exists(path):
        return path
    if path.lower() == smollm2.MODEL_NAME:
        return str(smollm2.smollm2_gguf_path(fetch=True))
    if not is_hub_id(path):
        return path
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    patterns = list(HUB_FILES) + ([gguf_file] if gguf_file else [])
    try:
        return snapshot_download(path, revision=revision, allow_patterns=patterns)
    except (LocalEntryNotFoundError, HfHubHTTPError, HFValidationError, OSError) as e:
        at = f" at revision {revision!r}" if revision else ""
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path}: not a local path, and the Hugging Face Hub model {path!r}{at} is neither "
            f"in the cache ({constants.HF_HUB_CACHE}) nor could it be fetched{offline}: {reason}"
        ) from None
