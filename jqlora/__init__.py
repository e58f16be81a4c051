"""jqlora: QLoRA fine-tuning in pure JAX."""

from jqlora.quant import QuantizedTensor, dequantize, quantize

__all__ = ["QuantizedTensor", "dequantize", "quantize"]
__version__ = "0.1.0"

from jqlora.lora import LoraConfig, LoraSpec, check_lora, init_lora  # noqa: E402

__all__ += ["LoraConfig", "LoraSpec", "check_lora", "init_lora"]
