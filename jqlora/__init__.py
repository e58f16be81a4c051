"""jqlora: QLoRA fine-tuning in pure JAX."""

from jqlora import host_malloc, xla_flags

# Before anything here starts JAX's CPU back end: the opt-in XLA flag (JQLORA_XLA_FLAGS=1),
# and a C heap that keeps freed memory (opt out: JQLORA_HOST_MALLOC=system).
xla_flags.configure()
host_malloc.configure()

from jqlora.quant import QuantizedTensor, dequantize, quantize  # noqa: E402

__all__ = ["QuantizedTensor", "dequantize", "quantize"]
__version__ = "0.1.0"

from jqlora.lora import (  # noqa: E402
    LoraConfig,
    LoraSpec,
    check_lora,
    init_lora,
    init_lora_and_residual,
    merge_lora,
)

__all__ += [
    "LoraConfig",
    "LoraSpec",
    "check_lora",
    "init_lora",
    "init_lora_and_residual",
    "merge_lora",
]

from jqlora.hf import QuantConfig, load_hf, save_hf  # noqa: E402

__all__ += ["QuantConfig", "load_hf", "save_hf"]

from jqlora.train.step import (  # noqa: E402
    TrainState,
    init_train_state,
    loss_fn,
    make_optimizer,
    make_train_step,
    next_token_loss,
)

__all__ += [
    "TrainState",
    "init_train_state",
    "loss_fn",
    "make_optimizer",
    "make_train_step",
    "next_token_loss",
]

from jqlora.train.offload import offload  # noqa: E402

__all__ += ["offload"]

from jqlora.kernels import qmatmul  # noqa: E402

__all__ += ["qmatmul"]

from jqlora.quant import from_bnb, to_bnb  # noqa: E402

__all__ += ["from_bnb", "to_bnb"]

from jqlora.memory import estimate_memory  # noqa: E402

__all__ += ["estimate_memory"]

from jqlora import distributed  # noqa: E402
from jqlora.sharding import (  # noqa: E402
    make_mesh,
    parse_mesh,
    placer,
    shard,
    shard_batch,
    shard_train_state,
)

__all__ += [
    "distributed",
    "make_mesh",
    "parse_mesh",
    "placer",
    "shard",
    "shard_batch",
    "shard_train_state",
]

from jqlora.generate import generate, stream_generate  # noqa: E402
from jqlora.hf.peft import load_peft_adapter, save_peft_adapter  # noqa: E402
from jqlora.lora.multi import map_rows, stack_adapters  # noqa: E402

__all__ += [
    "generate",
    "load_peft_adapter",
    "map_rows",
    "save_peft_adapter",
    "stack_adapters",
    "stream_generate",
]

from jqlora.train.loop import FinetuneResult, finetune  # noqa: E402

__all__ += ["FinetuneResult", "finetune"]
