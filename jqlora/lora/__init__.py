"""LoRA adapters as a separate pytree: configuration, initialization, the layer, merging."""

from typing import TYPE_CHECKING

from jqlora._lazy import lazy_names

_EXPORTS = {
    "check_lora": "jqlora.lora.check",
    "ALL_LINEAR": "jqlora.lora.config",
    "ATTENTION_ONLY": "jqlora.lora.config",
    "LoraConfig": "jqlora.lora.config",
    "init_lora": "jqlora.lora.init",
    "Linear": "jqlora.lora.linear",
    "lora_branch": "jqlora.lora.linear",
    "merge_lora": "jqlora.lora.merge",
    "init_lora_from_base": "jqlora.lora.residual",
    "svd_lowrank": "jqlora.lora.residual",
    "LoraSpec": "jqlora.lora.spec",
    "linear_modules": "jqlora.lora.targets",
    "select_targets": "jqlora.lora.targets",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_names(__name__, _EXPORTS, globals())

if TYPE_CHECKING:
    from jqlora.lora.check import check_lora as check_lora
    from jqlora.lora.config import (
        ALL_LINEAR as ALL_LINEAR,
    )
    from jqlora.lora.config import (
        ATTENTION_ONLY as ATTENTION_ONLY,
    )
    from jqlora.lora.config import (
        LoraConfig as LoraConfig,
    )
    from jqlora.lora.init import init_lora as init_lora
    from jqlora.lora.linear import Linear as Linear
    from jqlora.lora.linear import lora_branch as lora_branch
    from jqlora.lora.merge import merge_lora as merge_lora
    from jqlora.lora.residual import (
        init_lora_from_base as init_lora_from_base,
    )
    from jqlora.lora.residual import (
        svd_lowrank as svd_lowrank,
    )
    from jqlora.lora.spec import LoraSpec as LoraSpec
    from jqlora.lora.targets import (
        linear_modules as linear_modules,
    )
    from jqlora.lora.targets import (
        select_targets as select_targets,
    )
