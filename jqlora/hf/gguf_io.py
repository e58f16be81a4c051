"""GGUF files (llama.cpp's format) -> ``(model, params)``, for the architectures
``jqlora.hf.gguf_arch`` lists (llama, qwen2, qwen3, gemma2, gemma3, phi3).

The metadata becomes a transformers config; each tensor is dequantized with
``gguf.quants.dequantize`` (every type it reads, k-quants included), turned into the Hugging
Face tensor as transformers' GGUF loader does (llama's q/k row order restored, Gemma's
stored ``1 + w`` norms shifted back), and then treated like a safetensors tensor (cast,
maybe quantized to NF4/FP4). The result equals transformers' GGUF loader bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np

from jqlora.hf import names as names_lib
from jqlora.hf.convert import convert_tensor, progress_bar, release_freed_memory
from jqlora.hf.gguf_hparams import architecture_of, gguf_config
from jqlora.models import model_for_config

GGUF_MAGIC = b"GGUF"


def check_gguf_file(path: Path) -> None:
    """A ValueError naming ``path`` unless it is a file that starts with the GGUF magic."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such GGUF file")
    if not path.is_file():
        raise ValueError(f"{path}: a directory, not a GGUF file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        found = "the file is empty" if not head else f"it starts with {head!r}"
        raise ValueError(f"{path}: not a GGUF file (no {GGUF_MAGIC!r} magic: {found})")


def open_gguf(path: Path):
    """A ``gguf.GGUFReader`` of ``path``; a ValueError naming the file if it is not readable GGUF."""
    import gguf

    path = Path(path)
    check_gguf_file(path)
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises bare ValueError/struct/numpy errors
        raise ValueError(f"{path}: cannot read GGUF file: {e}") from None


@contextlib.contextmanager
def _naming(path: Path):
    """Any error from interpreting a file's metadata (a corrupt byte can make a head count
    zero, a name undecodable, a shape not fit) as one ValueError that names the file."""
    try:
        yield
    except ValueError as e:  # UnicodeDecodeError too
        if str(path) in str(e):
            raise
        raise ValueError(f"{path}: inconsistent GGUF metadata ({e})") from None
    except (TypeError, ArithmeticError, KeyError, IndexError, AttributeError) as e:
        raise ValueError(f"{path}: inconsistent GGUF metadata ({type(e).__name__}: {e})") from None


def read_gguf(path: Path) -> tuple[dict, list, Iterator[tuple[str, str, np.ndarray]]]:
    """``(config, tensors, stream)``: the transformers config of a GGUF file, its tensor
    entries, and ``(gguf name, Hugging Face name, array)`` for each tensor, dequantized one
    at a time (float32, or the dtype ``gguf.quants.dequantize`` returns for float tensors)."""
    from gguf.quants import dequantize

    path = Path(path)
    reader = open_gguf(path)
    with _naming(path):
        config = gguf_config(reader, path)
        arch = architecture_of(reader, path)
        hf_names = arch.hf_names(config["num_hidden_layers"])

    def stream():
        for tensor in reader.tensors:
            name = hf_names.get(tensor.name)
            if name is None:
                raise ValueError(
                    f"{path}: unexpected tensor {tensor.name!r} for a {config['model_type']} model"
                )
            try:
                array = dequantize(tensor.data, tensor.tensor_type)
            except Exception as e:  # a block count that does not fit the data, an unknown type
                raise ValueError(
                    f"{path}: tensor {tensor.name!r}: cannot dequantize ({e})"
                ) from None
            with _naming(path):
                array = arch.to_hf(array, name, config)
            yield tensor.name, name, array

    return config, list(reader.tensors), stream()


def load_gguf(path: Path, quantization, dtype, compute_dtype, progress=None):
    """``(model, params)`` from a GGUF file (see the module doc)."""
    path = Path(path)
    config, tensors, stream = read_gguf(path)
    with _naming(path):  # sizes that disagree fail only when the model traces them
        model = model_for_config(config, compute_dtype, source=str(path))
        expected = names_lib.expected_params(model)
    flat = {}
    with progress_bar(len(tensors), f"loading {path.name}", progress) as bar:
        for gguf_name, name, w in stream:
            if name not in expected.shapes:
                raise ValueError(
                    f"{path}: unexpected tensor {gguf_name!r} for a {config['model_type']} model"
                )
            flat[name] = convert_tensor(
                w.astype(np.float32), name, expected, quantization, dtype,
                source=f"{path}: tensor {gguf_name!r}",
            )  # fmt: skip
            jax.block_until_ready(flat[name])
            del w
            release_freed_memory()
            bar.update()
    missing = sorted(set(expected.shapes) - set(flat))
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {missing[:5]} ({len(missing)} in all)")
    return model, names_lib.unflatten(flat)
