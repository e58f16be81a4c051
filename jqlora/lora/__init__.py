"""LoRA adapters as a separate pytree: configuration, initialization, the layer, merging."""

from jqlora.lora.check import check_lora
from jqlora.lora.config import ALL_LINEAR, ATTENTION_ONLY, LoraConfig
from jqlora.lora.init import init_lora
from jqlora.lora.linear import Linear, lora_branch
from jqlora.lora.merge import merge_lora
from jqlora.lora.residual import init_lora_and_residual, svd_lowrank
from jqlora.lora.spec import LoraSpec
from jqlora.lora.targets import linear_modules, select_targets

__all__ = [
    "ALL_LINEAR",
    "ATTENTION_ONLY",
    "Linear",
    "LoraConfig",
    "LoraSpec",
    "check_lora",
    "init_lora",
    "init_lora_and_residual",
    "linear_modules",
    "lora_branch",
    "merge_lora",
    "select_targets",
    "svd_lowrank",
]
