"""Quantized matmul: one `qmatmul`, several back ends (XLA, Pallas GPU, Pallas TPU)."""

from jqlora.kernels.qmatmul import qmatmul

__all__ = ["qmatmul"]
