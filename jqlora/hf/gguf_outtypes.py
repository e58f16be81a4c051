"""The GGUF storage types jqlora writes, by llama.cpp's names. A module of its own, free of
JAX and gguf imports, because `jqlora export --help` lists them."""

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
#: the ones llama.cpp accepts for LoRA tensors
ADAPTER_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
