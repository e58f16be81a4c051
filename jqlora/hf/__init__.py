"""Hugging Face checkpoints in and out: safetensors (sharded), bitsandbytes 4-bit, GGUF
(read, and written for llama.cpp)."""

from jqlora.hf.gguf_export import save_gguf, save_gguf_adapter
from jqlora.hf.load import load_hf
from jqlora.hf.quant_config import QuantConfig
from jqlora.hf.save import save_hf

__all__ = ["QuantConfig", "load_hf", "save_gguf", "save_gguf_adapter", "save_hf"]
