"""jqlora: QLoRA fine-tuning in pure JAX.

The everyday path is here; the rest lives in subpackages, imported as namespaces:
``jqlora.quant``, ``jqlora.kernels``, ``jqlora.lora``, ``jqlora.models``, ``jqlora.hf``,
``jqlora.train``, ``jqlora.sharding``, ``jqlora.distributed``, ``jqlora.runtime``.

Importing jqlora changes nothing in the process (no malloc settings, no XLA flags, no
``jax.config`` value): the names below load on first use. The `jqlora` command tunes a
CPU host's runtime at its start (``jqlora.runtime.tune_cpu``); a program of your own may
call that too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jqlora._lazy import lazy_names

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    # 4-bit blockwise quantization, byte-identical to bitsandbytes
    "QuantizedTensor": "jqlora.quant",
    "quantize": "jqlora.quant",
    "dequantize": "jqlora.quant",
    "from_bnb": "jqlora.quant",
    "to_bnb": "jqlora.quant",
    "qmatmul": "jqlora.kernels",
    # Hugging Face checkpoints and PEFT adapters
    "QuantConfig": "jqlora.hf",
    "load_hf": "jqlora.hf",
    "save_hf": "jqlora.hf",
    "load_peft_adapter": "jqlora.hf.peft",
    "save_peft_adapter": "jqlora.hf.peft",
    # LoRA as a separate pytree
    "LoraConfig": "jqlora.lora",
    "init_lora": "jqlora.lora",
    "merge_lora": "jqlora.lora",
    # training
    "TrainState": "jqlora.train.step",
    "init_train_state": "jqlora.train.step",
    "loss_fn": "jqlora.train.step",
    "make_optimizer": "jqlora.train.step",
    "make_train_step": "jqlora.train.step",
    "offload": "jqlora.train.offload",
    "estimate_memory": "jqlora.memory",
    "generate": "jqlora.generation",
    # the whole run, as `jqlora finetune` does it (the application, jqlora.app)
    "FinetuneConfig": "jqlora.app.config",
    "finetune": "jqlora.app.loop",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_names(__name__, _EXPORTS, globals())

if TYPE_CHECKING:
    from jqlora.app.config import FinetuneConfig as FinetuneConfig
    from jqlora.app.loop import finetune as finetune
    from jqlora.generation import generate as generate
    from jqlora.hf import QuantConfig as QuantConfig
    from jqlora.hf import load_hf as load_hf
    from jqlora.hf import save_hf as save_hf
    from jqlora.hf.peft import (
        load_peft_adapter as load_peft_adapter,
    )
    from jqlora.hf.peft import (
        save_peft_adapter as save_peft_adapter,
    )
    from jqlora.kernels import qmatmul as qmatmul
    from jqlora.lora import (
        LoraConfig as LoraConfig,
    )
    from jqlora.lora import (
        init_lora as init_lora,
    )
    from jqlora.lora import (
        merge_lora as merge_lora,
    )
    from jqlora.memory import estimate_memory as estimate_memory
    from jqlora.quant import (
        QuantizedTensor as QuantizedTensor,
    )
    from jqlora.quant import (
        dequantize as dequantize,
    )
    from jqlora.quant import (
        from_bnb as from_bnb,
    )
    from jqlora.quant import (
        quantize as quantize,
    )
    from jqlora.quant import (
        to_bnb as to_bnb,
    )
    from jqlora.train.offload import offload as offload
    from jqlora.train.step import (
        TrainState as TrainState,
    )
    from jqlora.train.step import (
        init_train_state as init_train_state,
    )
    from jqlora.train.step import (
        loss_fn as loss_fn,
    )
    from jqlora.train.step import (
        make_optimizer as make_optimizer,
    )
    from jqlora.train.step import (
        make_train_step as make_train_step,
    )
