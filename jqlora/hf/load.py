"""`load_hf`: a Hugging Face checkpoint (safetensors or GGUF) -> ``(model, params)``.

Tensors are read one at a time; a linear weight that is to be quantized is quantized as soon
as it is read, so a float copy of the whole model never exists. Which modules are quantized
is transformers + bitsandbytes' rule: every linear layer except those ``skip_modules``
names (``lm_head`` by default); embeddings and norms stay in ``dtype``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jqlora.hf import names as names_lib
from jqlora.hf import safetensors_io
from jqlora.hf.quant_config import QuantConfig, as_quant_config
from jqlora.models import checkpoint_map, model_for_config
from jqlora.quant import quantize

#: show a progress bar for checkpoints with more tensors than this
PROGRESS_MIN_TENSORS = 16


def progress_bar(total: int, desc: str, enabled: bool | None):
    from tqdm.auto import tqdm

    show = total > PROGRESS_MIN_TENSORS if enabled is None else enabled
    return tqdm(total=total, desc=desc, unit="tensor", disable=not show, leave=False)


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc only; elsewhere a no-op).

    Loading interleaves large short-lived float tensors with small long-lived quantized
    ones; without this, glibc keeps the holes the float tensors leave and the resident size
    grows with them instead of with what is kept.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Callable[[int], int] | Literal[False] | None = None


def read_config(directory: Path) -> dict:
    """The config.json of a checkpoint directory, as a dict; a ValueError naming the path if
    the directory or file is missing or is not a JSON object."""
    directory = Path(directory)
    if not directory.exists():
        raise ValueError(f"{directory}: no such file or directory")
    if not directory.is_dir():
        raise ValueError(
            f"{directory}: not a checkpoint: expected a Hugging Face checkpoint directory "
            "(config.json + *.safetensors) or a .gguf file"
        )
    path = directory / "config.json"
    if not path.is_file():
        raise ValueError(
            f"{directory}: no config.json (expected a Hugging Face checkpoint directory or a .gguf file)"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(config).__name__}")
    return config


def check_checkpoint_path(path, gguf_file: str | None = None) -> dict | None:
    """Check, without reading any weights, that ``load_hf(path, gguf_file=...)`` can start.

    A directory needs a config.json (a JSON object) that ``model_for_config`` accepts; a
    ``.gguf`` file must exist and start with the GGUF magic. Returns the config dict of a
    directory, None for a GGUF file; a ValueError naming the path otherwise. Commands call
    it first, so a wrong path is reported in a moment, not after loading a tokenizer.
    """
    path = Path(path)
    if gguf_file is not None or path.suffix == ".gguf":
        from jqlora.hf.gguf_io import check_gguf_file

        check_gguf_file(path / gguf_file if gguf_file else path)
        return None
    config = read_config(path)
    model_for_config(config, source=str(path / "config.json"))
    return config


def linear_layers(hf_config: dict, source: str = "config.json") -> list[tuple[str, ...]]:
    """The paths of the linear layers of the model ``hf_config`` describes (no weights read),
    for checking LoRA target names before loading."""
    model = model_for_config(hf_config, source=source)
    return sorted(tuple(m.split(".")) for m in names_lib.expected_params(model).linear_modules)


def load_hf(
    path,
    quantization: QuantConfig | str | None = None,
    dtype=jnp.float32,
    *,
    compute_dtype=None,
    gguf_file: str | None = None,
    progress: bool | None = None,
    place=None,
):
    """Load a causal LM checkpoint: ``model, params = load_hf(path, quantization, dtype)``.

    path: a directory with config.json and ``model.safetensors`` (or shards with
      ``model.safetensors.index.json``), or a ``.gguf`` file (or a directory plus ``gguf_file``).
    quantization: quantize linear weights as they load (bitsandbytes-identical bytes): a
      ``QuantConfig``, or ``"nf4"`` / ``"fp4"`` for ``QuantConfig(quant_type)``. A
      checkpoint that is already bitsandbytes 4-bit loads as it is stored; passing a
      different ``quantization`` for it is an error.
    dtype: the dtype of every float param (embeddings, norms, unquantized weights).
    compute_dtype: the model's activation dtype (default ``dtype``).
    place: ``place(param name, leaf) -> leaf``, called on each float-checkpoint tensor as
      soon as it is converted (``jqlora.sharding.placer(mesh)`` puts it straight onto its
      shards); pre-quantized and GGUF checkpoints are placed after loading.
    """
    path = Path(path)
    quantization = as_quant_config(quantization)
    dtype = _float_dtype(dtype, "dtype")
    compute_dtype = _float_dtype(compute_dtype or dtype, "compute_dtype")
    if gguf_file is not None or path.suffix == ".gguf":
        from jqlora.hf.gguf_io import load_gguf

        model, params = load_gguf(
            path / gguf_file if gguf_file else path, quantization, dtype, compute_dtype, progress
        )
        return model, place_all(params, place)
    hf_config = read_config(path)
    model = model_for_config(hf_config, compute_dtype, source=str(path / "config.json"))
    stored = hf_config.get("quantization_config")
    if stored is not None:
        stored = QuantConfig.from_hf(stored, source=str(path / "config.json"))
        if quantization is not None and quantization != stored:
            raise ValueError(
                f"{path}: the checkpoint is already quantized ({stored}); cannot load it as {quantization}"
            )
        from jqlora.hf.bnb_io import load_prequantized

        return model, place_all(load_prequantized(path, model, dtype, progress), place)
    params = load_float_tensors(path, model, quantization, dtype, progress, place)
    return model, params


def _float_dtype(dtype, what: str):
    """``jnp.dtype(dtype)`` if it is a floating-point dtype; a ValueError otherwise."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"load_hf: {what} {dtype!r} is not a dtype") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"load_hf: {what} must be a floating-point dtype, got {dt.name}")
    return dt


def checkpoint_plan(path: Path, model):
    """``(files, {checkpoint name: param name}, expected, checkpoint map)`` of a float checkpoint,
    after checking that its tensors are exactly the ones the model needs."""
    files = safetensors_io.checkpoint_files(path)
    infos = safetensors_io.tensor_infos(files)
    expected = names_lib.expected_params(model)
    model_type = model.config.hf["model_type"]
    ckpt = checkpoint_map(model_type)
    wanted = {}
    for name in infos:
        if ckpt.is_ignored(name) or (
            name == "lm_head.weight" and "lm_head.weight" not in expected.shapes
        ):
            continue  # buffers, and the copy of a tied embedding some checkpoints carry
        pname = ckpt.param_name(name, expected.shapes)
        if pname not in expected.shapes:
            raise ValueError(
                f"{infos[name][0]}: unexpected tensor {name!r} for model_type {model_type!r}"
            )
        wanted[name] = pname
    missing = sorted(set(expected.shapes) - set(wanted.values()))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(
            f"{path}: missing tensor(s) {', '.join(repr(m) for m in missing[:5])}{more}"
        )
    return files, wanted, expected, ckpt


def place_all(params: dict, place) -> dict:
    """Every leaf through ``place(param name, leaf)`` (see ``load_hf``), one at a time."""
    if place is None:
        return params
    flat = names_lib.flatten(params)
    return names_lib.unflatten({k: place(k, flat.pop(k)) for k in list(flat)})


def load_float_tensors(
    path: Path, model, quantization: QuantConfig | None, dtype, progress=None, place=None
) -> dict:
    """The params tree from a float safetensors checkpoint, quantizing linear weights if asked."""
    files, wanted, expected, ckpt = checkpoint_plan(path, model)
    flat = {}
    with progress_bar(len(wanted), f"loading {path.name}", progress) as bar:
        for name, file, array in safetensors_io.iter_tensors(files, list(wanted)):
            pname = wanted[name]
            flat[pname] = convert_tensor(
                array,
                pname,
                expected,
                quantization,
                dtype,
                transpose=ckpt.is_transposed(pname),
                source=f"{file}: tensor {name!r}",
            )
            if place is not None:
                flat[pname] = place(pname, flat[pname])
            # wait for the (asynchronous) conversion so that at most one float tensor is alive
            jax.block_until_ready(flat[pname])
            del array
            release_freed_memory()
            bar.update()
    return names_lib.unflatten(flat)


def convert_tensor(array, pname: str, expected, quantization, dtype, *, transpose=False, source=""):
    """One checkpoint tensor -> its params leaf: transposed if stored ``[in, out]``, checked
    against the shape the config implies, cast to ``dtype`` and quantized if it is a linear
    weight that ``quantization`` covers."""
    if transpose:
        array = array.T
    want = expected.shapes[pname]
    if tuple(array.shape) != want:
        raise ValueError(f"{source} has shape {tuple(array.shape)}, but config.json implies {want}")
    if not jnp.issubdtype(array.dtype, jnp.floating):
        # transformers would cast an integer or boolean weight silently: it is a broken file.
        raise ValueError(
            f"{source} has dtype {np.dtype(array.dtype).name}; a weight must be floating-point"
        )
    array = jnp.asarray(array).astype(dtype or array.dtype)
    module = pname.rpartition(".")[0]
    if (
        quantization is not None
        and expected.is_linear_weight(pname)
        and quantization.quantizes(module)
    ):
        return quantize(
            array,
            quantization.quant_type,
            quantization.blocksize,
            quantization.double_quant,
            name=pname,
        )
    return array
