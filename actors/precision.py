"""Which number format a model runs in: the one place that decides (docs/engines.md, docs/training.md).

``auto`` means bfloat16 on a CUDA GPU that supports it (float16 on older GPUs), and on a CPU
bfloat16 only where the processor computes it natively (AVX512-BF16 or AMX), float32 otherwise.
The gap is large both ways: on a CPU with native bfloat16 a bf16 matmul runs about 2x faster
than fp32; on one without (e.g. an AVX2-only AMD EPYC) it runs about 60x *slower*, because
every bf16 operation is emulated. Asking for bfloat16 explicitly on such a CPU is allowed but
prints a one-line warning.

``CAI_RAY_CPU_BF16=0`` (or ``1``) overrides the processor check: ``0`` makes ``auto`` choose
float32 on any CPU (to reproduce the float32 path on a machine that has native bfloat16).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from actors.config import DTYPE_NAMES

CPU_BF16_ENV = "CAI_RAY_CPU_BF16"
_DTYPES = {name: getattr(torch, full) for name, full in DTYPE_NAMES.items()}
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class DtypeError(ValueError):
    """An unknown dtype name; the message names the setting and the fix."""


@dataclass(frozen=True)
class DtypeChoice:
    """A resolved number format and, in a few words, why."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def short(self) -> str:
        return SHORT.get(self.dtype, self.name)

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's check for AVX512-BF16/AMX), unless
    ``CAI_RAY_CPU_BF16`` says otherwise."""
    return _cpu_bf16()[0]


def _cpu_bf16() -> tuple[bool, str]:
    """(native bfloat16?, what said so)."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip().lower()
    if forced in ("0", "1", "false", "true", "off", "on", "no", "yes"):
        native = forced in ("1", "true", "on", "yes")
        return native, f"{CPU_BF16_ENV}={forced}: {'native' if native else 'no native'} bfloat16 assumed"
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN: assume the slow path
        native = False
    return native, _detected(native)


def _detected(native: bool) -> str:
    return ("this CPU: native bfloat16 (AVX512-BF16/AMX)" if native
            else "this CPU: no native bfloat16 (no AVX512-BF16/AMX), where bfloat16 is many times slower")


def _cpu_answer(native_bf16: bool | None) -> tuple[bool, str]:
    return _cpu_bf16() if native_bf16 is None else (native_bf16, _detected(native_bf16))


def choose_dtype(requested: str | torch.dtype | None = "auto", device: str | torch.device = "cpu",
                 native_bf16: bool | None = None, cuda_bf16: bool | None = None,
                 setting: str = "engine.dtype") -> DtypeChoice:
    """The number format for a model on ``device`` (see the module docstring). ``native_bf16`` and
    ``cuda_bf16`` default to this machine's answers; tests pass them to fake either kind."""
    kind = torch.device(device).type if not isinstance(device, torch.device) else device.type
    if isinstance(requested, torch.dtype):
        choice = DtypeChoice(requested, "as given")
    elif requested in (None, "", "auto"):
        if kind == "cuda":
            ok = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
            return (DtypeChoice(torch.bfloat16, "auto: CUDA GPU") if ok
                    else DtypeChoice(torch.float16, "auto: CUDA GPU without bfloat16"))
        if kind != "cpu":
            return DtypeChoice(torch.float32, f"auto: {kind} device")
        native, why = _cpu_answer(native_bf16)
        return DtypeChoice(torch.bfloat16 if native else torch.float32, "auto: " + why)
    else:
        key = str(requested).lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise DtypeError(f"{setting}: unknown dtype {requested!r} — use auto, float32, bfloat16 or float16")
        choice = DtypeChoice(_DTYPES[key], "as configured")
    if choice.dtype == torch.bfloat16 and kind == "cpu":
        native, _ = _cpu_answer(native_bf16)
        if not native:
            warn_slow_bf16(setting)
            return DtypeChoice(choice.dtype, "as configured, on a CPU without native bfloat16: slow")
    return choice


_warned: set[str] = set()


def warn_slow_bf16(setting: str) -> None:
    """One line on stderr, once per process and setting."""
    if setting in _warned:
        return
    _warned.add(setting)
    print(f"warning: {setting}: bfloat16 on a CPU without native bfloat16 support (no AVX512-BF16/AMX) "
          f"runs many times slower than float32 (about 60x on an AVX2-only CPU) — set {setting} to auto "
          "or float32", file=sys.stderr, flush=True)
