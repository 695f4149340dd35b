"""The one function that picks a number format (actors.precision), with the processor's
answer faked both ways, the warning for slow bfloat16, and how engines report the choice."""
from __future__ import annotations

import pytest
import torch

from actors import precision
from actors.base import EngineError, describe
from actors.precision import DtypeError, choose_dtype, cpu_native_bf16


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(precision, "_warned", set())


def test_auto_on_cpu_follows_native_bf16(capsys):
    native = choose_dtype("auto", "cpu", native_bf16=True)
    assert native.dtype == torch.bfloat16 and "native bfloat16" in native.reason
    emulated = choose_dtype("auto", "cpu", native_bf16=False)
    assert emulated.dtype == torch.float32 and "no native bfloat16" in emulated.reason
    assert capsys.readouterr().err == ""  # auto never warns: it avoids the slow path


def test_auto_on_cuda_is_bf16_where_the_gpu_has_it():
    assert choose_dtype("auto", "cuda", cuda_bf16=True).dtype == torch.bfloat16
    assert choose_dtype("auto", "cuda", cuda_bf16=False).dtype == torch.float16
    assert choose_dtype("auto", "cuda", native_bf16=False, cuda_bf16=True).dtype == torch.bfloat16


def test_forced_bf16_on_a_cpu_without_native_support_warns_once_in_one_line(capsys):
    slow = choose_dtype("bfloat16", "cpu", native_bf16=False)
    assert slow.dtype == torch.bfloat16 and "slow" in slow.reason
    choose_dtype("bf16", "cpu", native_bf16=False)  # the same setting again: no second warning
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: engine.dtype: bfloat16 on a CPU without native")
    assert "many times slower than float32" in err and "auto or float32" in err
    fast = choose_dtype("bfloat16", "cpu", native_bf16=True)
    assert fast.dtype == torch.bfloat16 and fast.reason == "as configured"
    assert capsys.readouterr().err == ""


def test_explicit_and_unknown_dtypes():
    assert choose_dtype("fp32", "cpu", native_bf16=True).dtype == torch.float32
    assert choose_dtype(torch.float16, "cpu").reason == "as given"
    with pytest.raises(DtypeError, match="engine.dtype: unknown dtype 'float8'"):
        choose_dtype("float8", "cpu")


def test_the_processor_check_and_its_override(monkeypatch):
    monkeypatch.delenv(precision.CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert cpu_native_bf16() is True
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert cpu_native_bf16() is False and choose_dtype("auto", "cpu").dtype == torch.float32
    assert "this CPU: no native bfloat16" in choose_dtype("auto", "cpu").reason
    monkeypatch.setenv(precision.CPU_BF16_ENV, "1")
    assert choose_dtype("auto", "cpu").dtype == torch.bfloat16
    monkeypatch.setenv(precision.CPU_BF16_ENV, "0")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    choice = choose_dtype("auto", "cpu")
    assert choice.dtype == torch.float32 and choice.reason.startswith("auto: CAI_RAY_CPU_BF16=0")


def test_engine_logs_and_describes_its_choice(tiny_llama_dir, restore_torch_threads, capsys):
    from actors import EngineConfig
    from actors.hf_engine import TransformersEngine
    from actors.models import resolve_dtype

    eng = TransformersEngine(EngineConfig(model=str(tiny_llama_dir), dtype="auto"))
    assert eng.model.dtype == torch.float32  # CAI_RAY_CPU_BF16=0 in tests (conftest)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("[engine] transformers:") and "on cpu, float32 (auto: CAI_RAY_CPU_BF16=0" in line
    d = describe(eng)
    assert d["device"] == "cpu" and d["dtype"] == "float32" and "no native bfloat16" in d["dtype_reason"]
    with pytest.raises(EngineError, match="engine.dtype"):
        resolve_dtype("int3", "cpu")
