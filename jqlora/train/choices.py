"""The names of the optimizers and learning-rate schedules jqlora builds, and the default
schedule: a module free of JAX and optax imports, because `jqlora finetune --help` lists them
(`jqlora.train.optimizers`, `jqlora.train.schedules` build them)."""

OPTIMIZERS = ("adamw", "adamw_8bit", "lion", "adafactor", "sgd")
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_min_lr")
DEFAULT_SCHEDULE = "constant_with_warmup"
DEFAULT_WARMUP_RATIO = 0.03
