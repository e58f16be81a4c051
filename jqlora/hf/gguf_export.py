"""`save_gguf` and `save_gguf_adapter`: a model, or its LoRA adapter alone, as a GGUF file
that llama.cpp (and Ollama, LM Studio, transformers) loads.

The merged model: each weight is computed in float32, one tensor at a time (a
``QuantizedTensor`` dequantized; an adapted weight ``W + s B A``, DoRA
``m / ||W + s B A||_row * (W + s B A)``, through ``jqlora.lora.merge_lora``), given
llama.cpp's name and q/k row order (``gguf_arch``), and stored as ``outtype``: f32, f16,
bf16, q8_0 or q4_0 (``gguf.quants``; norms and biases stay f32, and a matrix whose rows
do not split into the 32-wide blocks of q8_0/q4_0 is stored f16). The hyperparameters and
the tokenizer (``gguf_vocab``) go into the metadata.

The adapter alone is llama.cpp's LoRA format (what ``llama-cli --lora`` and Ollama's
``ADAPTER`` read): ``general.type = adapter``, ``adapter.type = lora``,
``adapter.lora.alpha``, and per adapted weight ``<name>.lora_a`` = A [r, in] and
``<name>.lora_b`` = B [out, r] (rows reordered like the weight's). llama.cpp applies
``W x + (alpha / r) B A x`` with one alpha for the file; an adapter whose modules have
other scales (rank_pattern, alpha_pattern, rsLoRA) gets each B multiplied by
``s_m r_m / alpha``, which gives every module its own scale exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np

from jqlora.hf import names as names_lib
from jqlora.hf.gguf_arch import GGUFArch, arch_for_export
from jqlora.hf.gguf_hparams import gguf_hparams
from jqlora.hf.gguf_outtypes import ADAPTER_OUTTYPES, OUTTYPES
from jqlora.hf.gguf_vocab import add_tokenizer
from jqlora.lora.check import adapters, check_lora
from jqlora.lora.merge import merge_lora
from jqlora.lora.targets import dotted
from jqlora.quant import QuantizedTensor, dequantize

Q = gguf.GGMLQuantizationType
#: outtype -> the tensor type and the file type llama.cpp records for it (gguf's own names)
_QTYPES = {name: gguf.GGMLQuantizationType[name.upper()] for name in OUTTYPES}
_FILE_TYPES = {
    name: gguf.LlamaFileType["ALL_F32" if name == "f32" else "MOSTLY_" + name.upper()]
    for name in OUTTYPES
}


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One tensor to write: its GGUF name, logical shape, type, and how to compute it (float32)."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    compute: Callable[[], np.ndarray]

    def byte_layout(self) -> tuple[tuple[int, ...], np.dtype, int]:
        """(shape, numpy dtype, bytes) as ``GGUFWriter.add_tensor_info`` wants them."""
        if self.qtype == Q.F32:
            return self.shape, np.dtype(np.float32), 4 * int(np.prod(self.shape))
        if self.qtype == Q.F16:
            return self.shape, np.dtype(np.float16), 2 * int(np.prod(self.shape))
        shape = gguf.quant_shape_to_byte_shape(self.shape, self.qtype)
        return shape, np.dtype(np.uint8), int(np.prod(shape))

    def data(self) -> np.ndarray:
        return gguf.quants.quantize(np.ascontiguousarray(self.compute()), self.qtype)


def _storage_type(shape: tuple[int, ...], outtype: str) -> gguf.GGMLQuantizationType:
    qtype = _QTYPES[outtype]
    if len(shape) < 2:
        return Q.F32  # norms and biases: llama.cpp keeps them f32
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else Q.F16


def _check_outtype(outtype: str, allowed) -> None:
    if outtype not in allowed:
        raise ValueError(
            f"GGUF export: outtype must be one of {', '.join(allowed)}, got {outtype!r}"
        )


def _float32(leaf) -> np.ndarray:
    if isinstance(leaf, QuantizedTensor):
        leaf = dequantize(leaf, jnp.float32)
    return np.asarray(jnp.asarray(leaf, jnp.float32))


def _gguf_name(arch: GGUFArch, hf_name: str, hf: dict) -> str:
    """llama.cpp's name of a Hugging Face parameter, or a ValueError."""
    name = arch.gguf_name(hf_name, hf["num_hidden_layers"])
    if name is None:
        raise ValueError(f"GGUF export: no llama.cpp {arch.name} tensor for {hf_name!r}")
    return name


def _order(gguf_name: str) -> tuple:
    """token_embd, then the blocks in order, then the output tensors (llama.cpp's order)."""
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return (1, int(parts[1]), gguf_name)
    return (0 if parts[0] in ("token_embd", "rope_freqs") else 2, 0, gguf_name)


def _model_tensors(model, params, lora, outtype, extra) -> Iterator[_Tensor]:
    hf = model.config.hf
    arch = arch_for_export(hf)
    entries = {dotted(path) + ".weight": entry for path, entry in adapters(lora or {})}
    for name, leaf in names_lib.flatten(params).items():
        entry = entries.get(name)

        def compute(name=name, leaf=leaf, entry=entry) -> np.ndarray:
            if entry is None:
                w = _float32(leaf)
            else:  # merge_lora on this one module keeps a single float copy alive at a time
                one = merge_lora({"m": {"weight": leaf}}, {"m": entry}, dtype=jnp.float32)
                w = np.asarray(one["m"]["weight"])
            return arch.from_hf(w, name, hf)

        shape = tuple(leaf.shape)
        yield _Tensor(_gguf_name(arch, name, hf), shape, _storage_type(shape, outtype), compute)
    for name, value in extra.items():
        yield _Tensor(name, value.shape, Q.F32, functools.partial(np.asarray, value))


def _write_file(path: Path, arch: str, name: str | None, metadata, tensors, progress) -> Path:
    """Write a GGUF file: ``metadata(writer)`` adds the keys, then the tensors in llama.cpp's
    order, each computed as it is written. The file appears at ``path`` only when complete."""
    from jqlora.hf.convert import progress_bar

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tensors = sorted(tensors, key=lambda t: _order(t.name))
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(name or path.stem)
        metadata(writer)
        for t in tensors:
            shape, dtype, nbytes = t.byte_layout()
            raw = None if t.qtype in (Q.F32, Q.F16) else t.qtype
            writer.add_tensor_info(t.name, shape, dtype, nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with progress_bar(len(tensors), f"writing {path.name}", progress) as bar:
            for t in tensors:
                writer.write_tensor_data(t.data())
                bar.update()
        writer.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def save_gguf(
    path,
    model,
    params: Mapping,
    lora: Mapping | None = None,
    *,
    tokenizer,
    outtype: str = "f16",
    name: str | None = None,
    progress: bool | None = None,
) -> Path:
    """Write ``params`` (with ``lora`` merged in float32, if given) as a llama.cpp GGUF file.

    tokenizer: a ``.gguf`` file (its tokenizer fields are copied), a Hugging Face tokenizer
      directory, or a transformers tokenizer; written with its chat template.
    outtype: f32 | f16 | bf16 | q8_0 | q4_0, the storage of the matrices (see the module doc).
    name: ``general.name`` (default: the file name). progress: a tqdm bar (default: for
      models with many tensors).
    """
    _check_outtype(outtype, OUTTYPES)
    path = Path(os.fspath(path))
    hf = model.config.hf
    arch = arch_for_export(hf)
    if lora:
        check_lora(params, lora)
    keys, extra = gguf_hparams(arch, hf)  # once: it may warn
    tensors = list(_model_tensors(model, params, lora, outtype, extra))

    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_file_type(_FILE_TYPES[outtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value, vtype in keys:
            writer.add_key_value(key.format(arch=arch.name), value, vtype)
        add_tokenizer(writer, tokenizer, hf["vocab_size"])

    return _write_file(path, arch.name, name, metadata, tensors, progress)


def _adapter_tensors(model, lora: Mapping, outtype: str) -> tuple[float, list[_Tensor]]:
    hf = model.config.hf
    arch = arch_for_export(hf)
    found = adapters(lora)
    if not found:
        raise ValueError("GGUF adapter export: the lora tree holds no adapter")
    alphas = {}
    for path, entry in found:
        if "magnitude" in entry:
            raise ValueError(
                f"GGUF adapter export: {dotted(path)} is a DoRA adapter, which llama.cpp's LoRA "
                "format cannot hold; export the merged model instead"
            )
        alphas[path] = entry["spec"].scale * entry["a"].shape[-2]  # s r = alpha for llama.cpp
    alpha = alphas[found[0][0]]
    tensors = []
    for path, entry in found:
        weight = dotted(path) + ".weight"
        base = _gguf_name(arch, weight, hf)
        a, b = entry["a"], entry["b"]

        def lora_a(a=a) -> np.ndarray:
            return _float32(a)

        def lora_b(b=b, factor=alphas[path] / alpha, weight=weight) -> np.ndarray:
            # B's rows are the weight's rows, stored in the same order
            return arch.from_hf(_float32(b) * np.float32(factor), weight, hf)

        for suffix, shape, compute in ((".lora_a", a.shape, lora_a), (".lora_b", b.shape, lora_b)):
            shape = tuple(shape)
            tensors.append(_Tensor(base + suffix, shape, _storage_type(shape, outtype), compute))
    return float(alpha), tensors


def save_gguf_adapter(
    path,
    model,
    lora: Mapping,
    *,
    outtype: str = "f32",
    name: str | None = None,
    progress: bool | None = None,
) -> Path:
    """Write the adapters of ``lora`` alone as a llama.cpp LoRA GGUF for ``model``'s architecture
    (see the module doc); the base stays a separate GGUF file (``save_gguf`` without ``lora``)."""
    _check_outtype(outtype, ADAPTER_OUTTYPES)
    path = Path(os.fspath(path))
    arch = arch_for_export(model.config.hf)
    alpha, tensors = _adapter_tensors(model, lora, outtype)

    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_file_type(_FILE_TYPES[outtype])

    return _write_file(path, arch.name, name, metadata, tensors, progress)
