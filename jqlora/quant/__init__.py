"""4-bit blockwise quantization (NF4/FP4, double quantization) in the bitsandbytes layout."""

from typing import TYPE_CHECKING

from jqlora._lazy import lazy_names

_EXPORTS = {
    "decode_absmax": "jqlora.quant.blockwise",
    "dequantize": "jqlora.quant.blockwise",
    "quantize": "jqlora.quant.blockwise",
    "from_bnb": "jqlora.quant.bnb_format",
    "to_bnb": "jqlora.quant.bnb_format",
    "BLOCKSIZES": "jqlora.quant.codebooks",
    "FP4": "jqlora.quant.codebooks",
    "NF4": "jqlora.quant.codebooks",
    "QUANT_TYPES": "jqlora.quant.codebooks",
    "QuantizedTensor": "jqlora.quant.tensor",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_names(__name__, _EXPORTS, globals())

if TYPE_CHECKING:
    from jqlora.quant.blockwise import (
        decode_absmax as decode_absmax,
    )
    from jqlora.quant.blockwise import (
        dequantize as dequantize,
    )
    from jqlora.quant.blockwise import (
        quantize as quantize,
    )
    from jqlora.quant.bnb_format import from_bnb as from_bnb
    from jqlora.quant.bnb_format import to_bnb as to_bnb
    from jqlora.quant.codebooks import (
        BLOCKSIZES as BLOCKSIZES,
    )
    from jqlora.quant.codebooks import (
        FP4 as FP4,
    )
    from jqlora.quant.codebooks import (
        NF4 as NF4,
    )
    from jqlora.quant.codebooks import (
        QUANT_TYPES as QUANT_TYPES,
    )
    from jqlora.quant.tensor import QuantizedTensor as QuantizedTensor
