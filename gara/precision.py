"""Mixed precision: bf16 autocast where the hardware runs it natively.

GPUs (Ampere and later) and CPUs with AVX512-BF16 or AMX run bf16 matmuls/convolutions
natively; there, autocast roughly halves LiteMedSAM's time on CPU (measured 2.5x on the
project's 2-core machine) with the same IoU (0.373 vs 0.374 on the VOC photo). Elsewhere
bf16 is emulated and slower, so it is switched off.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Literal

import torch

MixedPrecision = Literal["no", "bf16", "fp16"]


@functools.cache
def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device: torch.device | str, mode: MixedPrecision) -> contextlib.AbstractContextManager:
    """torch.autocast for ``mode`` on ``device``, or a no-op where it would not pay."""
    device = torch.device(device)
    if mode == "no":
        return contextlib.nullcontext()
    if device.type == "cpu":
        if mode != "bf16" or not cpu_has_native_bf16():  # fp16 autocast on CPU is not a win
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast(device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)


def or_nothing(autocast: torch.autocast | None) -> contextlib.AbstractContextManager:
    """The training step's autocast (None: float32) as a context manager."""
    return autocast if autocast is not None else contextlib.nullcontext()
