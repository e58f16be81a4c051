"""How much memory a fine-tuning run needs, counted before the run.

``estimate_memory(config, lora_config, batch_size, seq_len)`` counts, for one train step:

* **base weights**: every linear layer that ``quantization`` quantizes at its exact stored
  size (4-bit codes, 0.5 byte per parameter, plus its block constants: one absmax per
  block of 64, as a uint8 code with double quantization plus an f32 per 256 blocks and
  one f32 offset, else as f32), everything else (embeddings, norms, biases, ``lm_head``)
  in the compute dtype;
* **LoRA parameters, their gradients and the optimizer state**: float32, 4 bytes each, and
  AdamW's two moments, 8 bytes per LoRA parameter (in host memory with ``offload``);
* **activations** saved for the backward pass, in the compute dtype (see
  ``activation_bytes``), and the logits with the float32 loss computation (one chunk of
  tokens at a time where the loss applies the output head itself);

and sets beside it the same model fine-tuned in full (16 bytes per parameter: 2 bf16 weight
+ 2 bf16 gradient + 4 f32 master weight + 8 AdamW moments, plus the same activations) and
with plain 16-bit LoRA (2-byte base, the same adapters). Parameter shapes come from the
model jqlora builds for the config (``jax.eval_shape``, nothing is allocated) and from
``init_lora``, so every count is exact; only the activations are a model of what XLA keeps.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp

from jqlora.hf.quant_config import QuantConfig
from jqlora.kernels.xla import CHUNK_ELEMENTS
from jqlora.lora import LoraConfig, init_lora
from jqlora.lora.targets import dotted, get_in, linear_modules
from jqlora.models import model_for_config
from jqlora.quant.codebooks import NESTED_BLOCKSIZE
from jqlora.train.head_loss import chunk_tokens

GB = 1e9


def load_config(config) -> dict:
    """A Hugging Face config as a dict: from a dict, a transformers config object, a
    ``config.json`` file, a directory holding one, or a llama ``.gguf`` file."""
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if path.endswith(".gguf") and os.path.isfile(path):
            import gguf

            from jqlora.hf.gguf_io import check_gguf_file, gguf_config

            check_gguf_file(Path(path))
            return gguf_config(gguf.GGUFReader(path), Path(path))
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ValueError(
                f"{path}: no such config file (give a model directory, its config.json "
                "or a .gguf file)"
            )
        try:
            with open(path, encoding="utf-8") as f:
                loaded = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a JSON object, got a {type(loaded).__name__}")
        return loaded
    raise ValueError(
        f"config must be a dict, a transformers config, or a path; got {type(config).__name__}"
    )


def quantized_bytes(n: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes ``jqlora.quantize`` (and bitsandbytes) store for ``n`` weights.

    ``ceil(n / 2)`` bytes of codes + ``n_blocks`` absmax values (uint8 with double
    quantization, plus ``ceil(n_blocks / 256)`` f32 nested absmax and one f32 offset;
    else f32), ``n_blocks = ceil(n / blocksize)``.
    """
    n_blocks = -(-n // blocksize)
    if double_quant:
        return -(-n // 2) + n_blocks + 4 * -(-n_blocks // NESTED_BLOCKSIZE) + 4
    return -(-n // 2) + 4 * n_blocks


def _optional(c: Mapping, *keys: str) -> int | None:
    """The first of ``keys`` that the config sets (to a non-zero value), else None."""
    return next((c[key] for key in keys if c.get(key)), None)


def _required(c: Mapping, *keys: str) -> int:
    """The first of ``keys`` that the config sets; ValueError when it sets none of them."""
    value = _optional(c, *keys)
    if value is None:
        raise ValueError(f"model config sets none of {list(keys)}")
    return value


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What the activation count needs to know of an architecture."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated_mlp: bool  # SwiGLU (gate, up, down) vs two-layer MLP

    @classmethod
    def from_hf(cls, c: dict) -> Shapes:
        hidden = _required(c, "hidden_size", "n_embd")
        heads = _required(c, "num_attention_heads", "n_head")
        inter = _optional(c, "intermediate_size", "ffn_dim", "n_inner") or 4 * hidden
        return cls(
            layers=_required(c, "num_hidden_layers", "n_layer"),
            hidden=hidden,
            intermediate=inter,
            heads=heads,
            kv_heads=_optional(c, "num_key_value_heads") or heads,
            head_dim=_optional(c, "head_dim") or hidden // heads,
            vocab=c["vocab_size"],
            gated_mlp=c.get("model_type") not in ("opt", "gpt2"),
        )


def layer_activation_elements(s: Shapes, seq_len: int) -> tuple[int, int]:
    """``(per_token, attention_f32_per_token)``: values one decoder layer keeps for the
    backward pass, per token, in the compute dtype and (attention scores) in float32.

    Counted, per token: the layer input and the residual between the blocks (2 h); each
    norm's input in float32 and output (4 h); q and k before and after the rotary
    embedding and v (2 q + 1.5 kv); the attention output (q); the MLP's hidden values
    (SwiGLU: gate, its sigmoid, silu, up, silu * up = 5 i; two-layer MLP: fc1 output,
    activation, and its derivative = 3 i); the attention probabilities ``[heads, seq]`` in
    the compute dtype and their float32 softmax. LoRA's rank-r intermediates are
    negligible beside these.
    """
    q = s.heads * s.head_dim
    kv = 2 * s.kv_heads * s.head_dim
    mlp = (5 if s.gated_mlp else 3) * s.intermediate
    per_token = 6 * s.hidden + 3 * q + (3 * kv) // 2 + mlp + s.heads * seq_len
    return per_token, s.heads * seq_len


def activation_bytes(
    s: Shapes, batch_size: int, seq_len: int, dtype_bytes: int, remat: bool
) -> int:
    """Bytes of activations live at the peak of the backward pass.

    Without remat every layer's saved values (``layer_activation_elements``) are live at
    once. With remat (``nothing_saveable`` per layer) only each layer's input is kept,
    and one layer's values are recomputed at a time (on XLA's CPU back end only when the
    layers run as one loop, ``scan_layers``: unrolled, it recomputes them all early).
    """
    tokens = batch_size * seq_len
    per_token, attn_f32 = layer_activation_elements(s, seq_len)
    one_layer = tokens * (per_token * dtype_bytes + attn_f32 * 4)
    if remat:
        return s.layers * tokens * s.hidden * dtype_bytes + one_layer
    return s.layers * one_layer


def logits_bytes(
    s: Shapes, batch_size: int, seq_len: int, dtype_bytes: int, fused: bool = True
) -> int:
    """The logits in the compute dtype, their float32 copy and the float32 gradient.

    ``fused``: the loss applies a plain output head itself (``jqlora.train.head_loss``):
    one chunk of tokens has float32 logits at a time, and their gradient is written over
    them (float32 compute) or beside them in the compute dtype.
    """
    tokens = batch_size * seq_len
    if fused:
        per_element = 4 + (dtype_bytes if dtype_bytes != 4 else 0)
        return chunk_tokens(tokens, s.vocab) * s.vocab * per_element
    return tokens * s.vocab * (dtype_bytes + 8)


def dequantize_scratch_bytes(sizes: list[int], dtype_bytes: int) -> int:
    """Dequantized weights the XLA back end holds (``jqlora.kernels.xla``).

    A weight larger than one chunk (``CHUNK_ELEMENTS``) is dequantized a chunk at a time
    inside a loop: one chunk of scratch, reused. A smaller one is dequantized whole, and
    XLA's CPU scheduler computes these (they depend on the weights alone) ahead of their
    use, so all of them are live together.
    """
    small = sum(n for n in sizes if n <= CHUNK_ELEMENTS)
    large = any(n > CHUNK_ELEMENTS for n in sizes)
    return (small + (CHUNK_ELEMENTS if large else 0)) * dtype_bytes


@dataclasses.dataclass(frozen=True)
class Breakdown:
    """One way of fine-tuning: device bytes per component, and bytes kept in host memory."""

    name: str
    device: dict[str, int]
    host: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.device.values())

    @property
    def total_without_activations(self) -> int:
        return self.total - self.device["activations"] - self.device["logits + loss"]


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """The estimate: parameter counts and three side-by-side breakdowns (this setup first)."""

    model_type: str
    base_params: int
    quantized_params: int
    quantized_bytes: int  # stored bytes of the quantized weights, constants included
    lora_params: int
    batch_size: int
    seq_len: int
    columns: tuple[Breakdown, ...]

    @property
    def qlora(self) -> Breakdown:
        return self.columns[0]

    def column(self, name: str) -> Breakdown:
        return next(c for c in self.columns if c.name == name)

    def table(self) -> str:
        """The breakdown as a text table in GB (1e9 bytes)."""
        rows = list(dict.fromkeys(k for c in self.columns for k in c.device))
        width = max(map(len, rows + ["total (device)", "  without activations"])) + 2
        head = "".ljust(width) + "".join(c.name.rjust(18) for c in self.columns)
        lines = [head, "-" * len(head)]
        for r in rows:
            lines.append(
                r.ljust(width) + "".join(_gb(c.device.get(r)).rjust(18) for c in self.columns)
            )
        lines.append("-" * len(head))
        lines.append(
            "total (device)".ljust(width) + "".join(_gb(c.total).rjust(18) for c in self.columns)
        )
        lines.append(
            "  without activations".ljust(width)
            + "".join(_gb(c.total_without_activations).rjust(18) for c in self.columns)
        )
        hosts = [sum(c.host.values()) for c in self.columns]
        if any(hosts):
            lines.append("host memory".ljust(width) + "".join(_gb(h).rjust(18) for h in hosts))
        return "\n".join(lines)

    def summary(self) -> str:
        pct = 100.0 * self.lora_params / self.base_params
        q = self.qlora.device["base weights"]
        lines = [
            f"{self.model_type}: {self.base_params:,} parameters, {self.quantized_params:,} of them quantized",
            f"LoRA: {self.lora_params:,} trainable parameters ({pct:.2f} % of the base)",
            f"base weights: {q / self.base_params:.3f} bytes per parameter overall"
            + (
                f", {self.quantized_bytes / self.quantized_params:.4f} per quantized parameter"
                if self.quantized_params
                else ""
            ),
            f"batch {self.batch_size} x seq {self.seq_len}; GB = 1e9 bytes",
        ]
        return "\n".join(lines)


def _gb(n) -> str:
    return "-" if n is None else f"{n / GB:.3f}"


def _quantization(q) -> QuantConfig | None:
    if q is None or isinstance(q, QuantConfig):
        return q
    if isinstance(q, str):
        return QuantConfig(quant_type=q)
    raise ValueError(f"quantization must be None, 'nf4', 'fp4' or a QuantConfig; got {q!r}")


def abstract_params(hf_config: dict, dtype=jnp.float32):
    """The model's params as ``ShapeDtypeStruct`` leaves (nothing allocated)."""
    return _abstract_params(
        json.dumps(hf_config, sort_keys=True, default=str), jnp.dtype(dtype).name
    )


@functools.lru_cache(maxsize=8)
def _abstract_params(config_json: str, dtype: str):
    model = model_for_config(json.loads(config_json), dtype)
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), ids))["params"]


def estimate_memory(
    config,
    lora_config: LoraConfig | None = None,
    batch_size: int = 1,
    seq_len: int = 512,
    *,
    quantization: QuantConfig | str | None = "nf4",
    offload: bool = False,
    remat: bool = False,
    compute_dtype="bfloat16",
    optimizer_bytes_per_param: int = 8,
    backend: str = "kernel",
) -> MemoryEstimate:
    """Device (and host) memory of one train step; see the module doc for what is counted.

    ``config``: a Hugging Face config (dict, transformers config object, config.json path
    or model directory). ``lora_config`` defaults to ``LoraConfig()``. ``quantization``:
    ``"nf4"`` / ``"fp4"`` / a ``QuantConfig`` (default NF4, double quantization, blocksize
    64, ``lm_head`` skipped) or ``None`` (16-bit base). ``optimizer_bytes_per_param``: 8
    for AdamW's two f32 moments. ``backend``: ``"kernel"`` (the Pallas kernels read the
    4-bit codes directly: the TPU default; on a GPU, whose default XLA path dequantizes one
    weight of up to 2^24 elements per matmul, it leaves that one weight out, at most 32 MiB
    in bfloat16, if XLA's GPU scheduler does not run the dequantizations early, which has
    not been measured) or ``"xla"`` (the CPU's path), which adds ``dequantize_scratch_bytes``.
    """
    if backend not in ("kernel", "xla"):
        raise ValueError(f"backend must be 'kernel' or 'xla', got {backend!r}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
    hf = load_config(config)
    quant = _quantization(quantization)
    lora_config = lora_config or LoraConfig()
    if lora_config.changes_base:  # PiSSA / LoftQ: the same adapter shapes as the default init
        lora_config = dataclasses.replace(lora_config, init="default")
    dbytes = jnp.dtype(compute_dtype).itemsize

    params = abstract_params(hf)
    base_params = sum(x.size for x in jax.tree.leaves(params))
    lora = jax.eval_shape(lambda: init_lora(jax.random.key(0), params, lora_config))
    lora_params = sum(x.size for x in jax.tree.leaves(lora))

    sizes: list[int] = []  # element counts of the quantized weights
    quant_bytes = 0
    if quant is not None:
        sizes = [
            get_in(params, p + ("weight",)).size
            for p in linear_modules(params)
            if quant.quantizes(dotted(p))
        ]
        quant_bytes = sum(quantized_bytes(n, quant.blocksize, quant.double_quant) for n in sizes)
    quantized = sum(sizes)
    scratch = dequantize_scratch_bytes(sizes, dbytes) if backend == "xla" else 0
    base_bytes = quant_bytes + (base_params - quantized) * dbytes

    s = Shapes.from_hf(hf)
    acts = activation_bytes(s, batch_size, seq_len, dbytes, remat)
    # The fused head loss applies unless the head is quantized or carries an adapter.
    head_quantized = "lm_head" in params and quant is not None and quant.quantizes("lm_head")
    fused = "lm_head" not in lora and not head_quantized
    logits = logits_bytes(s, batch_size, seq_len, dbytes, fused)
    opt = optimizer_bytes_per_param * lora_params

    def lora_column(name, base):
        device = {
            "base weights": base,
            "LoRA parameters": 4 * lora_params,
            "LoRA gradients": 4 * lora_params,
            "optimizer state": 0 if offload else opt,
            "activations": acts,
            "logits + loss": logits,
        }
        if scratch and name != "16-bit LoRA":
            device["dequantize scratch (XLA)"] = scratch
        return Breakdown(name, device, {"optimizer state": opt} if offload else {})

    columns = (
        lora_column("QLoRA" if quant else "LoRA", base_bytes),
        lora_column("16-bit LoRA", base_params * 2),
        Breakdown(
            "full fine-tuning",
            {
                "base weights": 2 * base_params,
                "weight gradients": 2 * base_params,
                "f32 master weights": 4 * base_params,
                "optimizer state": 8 * base_params,
                "activations": acts,
                "logits + loss": logits,
            },
            {},
        ),
    )
    return MemoryEstimate(
        hf.get("model_type", "?"),
        base_params,
        quantized,
        quant_bytes,
        lora_params,
        batch_size,
        seq_len,
        columns,
    )
