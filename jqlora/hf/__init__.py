"""Hugging Face checkpoints in and out: safetensors (sharded), bitsandbytes 4-bit, GGUF
(read, and written for llama.cpp)."""

from typing import TYPE_CHECKING

from jqlora._lazy import lazy_names

_EXPORTS = {
    "load_hf": "jqlora.hf.load",
    "QuantConfig": "jqlora.hf.quant_config",
    "save_hf": "jqlora.hf.save",
    "save_gguf": "jqlora.hf.gguf_export",
    "save_gguf_adapter": "jqlora.hf.gguf_export",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_names(__name__, _EXPORTS, globals())

if TYPE_CHECKING:
    from jqlora.hf.gguf_export import save_gguf as save_gguf
    from jqlora.hf.gguf_export import save_gguf_adapter as save_gguf_adapter
    from jqlora.hf.load import load_hf as load_hf
    from jqlora.hf.quant_config import QuantConfig as QuantConfig
    from jqlora.hf.save import save_hf as save_hf
