"""4-bit blockwise quantization (NF4/FP4, double quantization) in the bitsandbytes layout."""

from jqlora.quant.blockwise import decode_absmax, dequantize, quantize
from jqlora.quant.bnb_format import from_bnb, to_bnb
from jqlora.quant.codebooks import BLOCKSIZES, FP4, NF4, QUANT_TYPES
from jqlora.quant.tensor import QuantizedTensor

__all__ = [
    "BLOCKSIZES",
    "FP4",
    "NF4",
    "QUANT_TYPES",
    "QuantizedTensor",
    "decode_absmax",
    "dequantize",
    "from_bnb",
    "quantize",
    "to_bnb",
]
