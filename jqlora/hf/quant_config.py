"""`QuantConfig`: which linear layers to store in 4 bits, and how (bitsandbytes' options).

It maps one to one onto transformers' ``BitsAndBytesConfig(load_in_4bit=True, ...)``:
``quant_type`` is ``bnb_4bit_quant_type``, ``double_quant`` is
``bnb_4bit_use_double_quant``, ``skip_modules`` is ``llm_int8_skip_modules``; the
blocksize (64 in transformers) may also be set here.
"""

from __future__ import annotations

import dataclasses
import re

from jqlora.quant import BLOCKSIZES, QUANT_TYPES


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """4-bit storage of every linear weight except those matching ``skip_modules``."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    skip_modules: tuple[str, ...] = ("lm_head",)

    def __post_init__(self):
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(
                f"QuantConfig: quant_type {self.quant_type!r} is not one of {QUANT_TYPES}"
            )
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"QuantConfig: blocksize {self.blocksize} is not one of {BLOCKSIZES}")
        if not isinstance(self.double_quant, bool):
            raise ValueError(
                f"QuantConfig: double_quant must be True or False, got {self.double_quant!r}"
            )
        skip = self.skip_modules
        skip = (skip,) if isinstance(skip, str) else tuple(skip)  # one name, not its letters
        if not all(isinstance(m, str) and m for m in skip):
            raise ValueError(f"QuantConfig: skip_modules must be module names, got {skip!r}")
        object.__setattr__(self, "skip_modules", skip)

    def quantizes(self, module_name: str) -> bool:
        """Whether the linear layer ``module_name`` (dotted HF name) is quantized.

        A pattern skips a module when it matches from the start up to a module boundary, as a
        regex with that boundary, or as a suffix (transformers' ``should_convert_module``).
        """
        boundary = r"(?:(?<=\.)|(?=\.|$))"
        return not any(
            re.match(rf"(?:{p}){boundary}", module_name) or module_name.endswith(p)
            for p in self.skip_modules
        )

    def quantize_params(self, params: dict) -> dict:
        """``params`` with the weight of every linear layer this config selects quantized.

        For a model built or initialised in memory (``load_hf`` quantizes as it reads a
        checkpoint). Each weight becomes ``quantize(w, quant_type, blocksize, double_quant)``;
        the other leaves are returned as they are.
        """
        import jax

        from jqlora.lora.targets import dotted, get_in, linear_modules, set_in
        from jqlora.quant import quantize

        q = jax.jit(quantize, static_argnums=(1, 2, 3))
        for path in linear_modules(params):
            if self.quantizes(dotted(path)):
                w = get_in(params, path + ("weight",))
                params = set_in(
                    params,
                    path + ("weight",),
                    q(w, self.quant_type, self.blocksize, self.double_quant),
                )
        return params

    def to_hf(self, compute_dtype: str = "float32") -> dict:
        """The ``quantization_config`` entry of config.json that transformers reads."""
        return {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "load_in_8bit": False,
            "bnb_4bit_quant_type": self.quant_type,
            "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": compute_dtype,
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": list(self.skip_modules),
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_threshold": 6.0,
        }

    @classmethod
    def from_hf(cls, qc: dict, *, source: str = "config.json") -> QuantConfig:
        """The config of a pre-quantized bitsandbytes 4-bit checkpoint; other methods are refused."""
        method = qc.get("quant_method")
        if method != "bitsandbytes":
            raise ValueError(
                f"{source}: quantization_config.quant_method {method!r} is not supported; only bitsandbytes 4-bit checkpoints load"
            )
        if not qc.get("load_in_4bit") or qc.get("load_in_8bit"):
            raise ValueError(
                f"{source}: only 4-bit bitsandbytes checkpoints are supported (load_in_4bit true), not 8-bit"
            )
        storage = qc.get("bnb_4bit_quant_storage", "uint8")
        if storage != "uint8":
            raise ValueError(
                f"{source}: bnb_4bit_quant_storage {storage!r} is not supported; only uint8"
            )
        return cls(
            quant_type=qc.get("bnb_4bit_quant_type", "fp4"),
            blocksize=64,  # per tensor in the checkpoint's quant_state; 64 is transformers' value
            double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)),
            skip_modules=tuple(qc.get("llm_int8_skip_modules") or ("lm_head",)),
        )


def as_quant_config(quantization) -> QuantConfig | None:
    """``quantization`` as a ``QuantConfig``: one already; ``"nf4"`` / ``"fp4"`` (shorthand
    for ``QuantConfig(quant_type)``: blocksize 64, double quantization, ``lm_head`` kept);
    a mapping of its fields; or None (no quantization)."""
    if quantization is None or isinstance(quantization, QuantConfig):
        return quantization
    if isinstance(quantization, str):
        return QuantConfig(quant_type=quantization)
    if isinstance(quantization, dict):
        unknown = set(quantization) - {f.name for f in dataclasses.fields(QuantConfig)}
        if unknown:
            raise ValueError(f"QuantConfig: unknown field(s) {sorted(unknown)}")
        return QuantConfig(**quantization)
    raise ValueError(
        f"quantization must be a QuantConfig, 'nf4', 'fp4' or None, got {quantization!r}"
    )
