"""The precision policy: which dtype forwards autocast to. Log-probs, losses and master
weights stay fp32 whatever it is."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    dtype: str = "float32"
    """`float32` (no autocast) or `bfloat16` (forwards under bf16 autocast)."""

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype: expected 'float32' or 'bfloat16', got {self.dtype!r}")

    @property
    def bf16(self) -> bool:
        return self.dtype == "bfloat16"

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the matmuls run in."""
        return torch.bfloat16 if self.bf16 else torch.float32

    def autocast(self, device: torch.device | str = "cpu"):
        """bf16 autocast on `device`'s type when asked; nothing otherwise."""
        if self.bf16:
            return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
        return nullcontext()


FP32 = Precision()
BF16 = Precision("bfloat16")


def as_precision(value: Precision | str) -> Precision:
    return value if isinstance(value, Precision) else Precision(value)
