"""The vLLM backend's pure helpers, and the install and settings checks (no vLLM needed).
The engine itself runs for real in tests/test_vllm_real.py."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from actors.base import EngineError, SamplingParams
from actors.config import EngineConfig, VLLMOptions
from actors.install import choose_backend
from actors.sources import tensor_parallel_problem
from actors.vllm_engine import (
    choice_row,
    choice_token_ids,
    encode_rows,
    llm_kwargs,
    reassemble,
    runtime_settings,
    sampling_kwargs,
    to_generation,
)
from workflows.core.errors import ConfigError


# ---------------------------------------------------------------- pure helpers
def test_encode_rows_flags_bad_and_over_long_rows():
    def encode(conv):
        if conv == "broken":
            raise ValueError("no role")
        return list(range(len(conv)))

    encoded, errors = encode_rows(encode, ["abc", "broken", "abcdefgh", "", "ab"], limit=5)
    assert encoded[0] == [0, 1, 2] and encoded[1] is None
    assert set(errors) == {1, 2, 3}
    assert errors[1].startswith("bad_conversation: ValueError: no role")
    assert errors[2] == "prompt_too_long: 8 tokens > limit 5" and errors[3].startswith("bad_conversation")


def test_reassemble_restores_input_order():
    out = reassemble(5, {1: "r1", 3: "r3"}, [0, 2, 4], ["a", "c", "e"], lambda r: f"ERR {r}")
    assert out == ["a", "ERR r1", "c", "ERR r3", "e"]
    assert reassemble(0, {}, [], [], str) == []
    with pytest.raises(EngineError, match="2 outputs for 3 prompts"):
        reassemble(3, {}, [0, 1, 2], ["a", "b"], str)


def test_choice_token_ids_and_choice_row():
    vocab = {"A": 10, "B": 11, "(": 5}
    enc = lambda s: [vocab[c] for c in s]  # noqa: E731 — one token per character
    assert choice_token_ids(enc, ["A", "B"]) == [10, 11]
    with pytest.raises(EngineError, match="share a first token"):
        choice_token_ids(enc, ["(A", "(B"])
    with pytest.raises(EngineError, match="no choices"):
        choice_token_ids(enc, [])
    with pytest.raises(EngineError, match="no tokens"):
        choice_token_ids(enc, ["A", ""])
    logprob = lambda v: SimpleNamespace(logprob=v, rank=1, decoded_token="?")  # noqa: E731 — like vllm.Logprob
    assert choice_row({10: logprob(-0.2), 11: logprob(-1.5), 3: logprob(-2.0)}, [10, 11]) == [-0.2, -1.5]
    assert choice_row({11: -0.7, 3: -0.1}, [10, 11]) == [-math.inf, -0.7]  # plain floats work too
    assert all(math.isnan(v) for v in choice_row({3: logprob(-0.1)}, [10, 11]))
    assert all(math.isnan(v) for v in choice_row(None, [10, 11]))


def test_sampling_kwargs():
    greedy = sampling_kwargs(SamplingParams(max_new_tokens=7, seed=3), 99, [2])
    assert greedy == {"max_tokens": 7, "stop": None, "stop_token_ids": [2], "temperature": 0.0,
                      "repetition_penalty": 1.0}
    sampled = sampling_kwargs(SamplingParams(max_new_tokens=5, temperature=0.9, top_p=0.8, stop=("END",),
                                             repetition_penalty=1.2), 42, [])
    assert sampled == {"max_tokens": 5, "stop": ["END"], "stop_token_ids": None, "temperature": 0.9,
                       "top_p": 0.8, "seed": 42, "repetition_penalty": 1.2}


def test_to_generation():
    out = lambda text, reason: SimpleNamespace(  # noqa: E731 — a RequestOutput
        prompt_token_ids=[1, 2, 3], outputs=[SimpleNamespace(text=text, token_ids=[7, 8], finish_reason=reason)])
    g = to_generation(out("  hello \n", "length"))
    assert (g.text, g.prompt_tokens, g.completion_tokens, g.finish_reason, g.error) == ("hello", 3, 2, "length", None)
    assert to_generation(out("x", "abort")).error.startswith("generate_error:")


def test_llm_kwargs():
    cfg = EngineConfig(backend="vllm", max_model_len=1024, tokenizer="tok-dir",
                       vllm=VLLMOptions(tensor_parallel_size=2, gpu_memory_utilization=0.5, top_logprobs=30))
    kw = llm_kwargs("/models/m", cfg, "bf16")
    assert kw == dict(model="/models/m", tensor_parallel_size=2, gpu_memory_utilization=0.5,
                      enable_prefix_caching=True, max_model_len=1024, dtype="bfloat16", seed=0, max_logprobs=30,
                      worker_extension_cls="actors.vllm_engine.WeightLoader", tokenizer="tok-dir")


def test_runtime_settings_by_device():
    cpu_env, cpu = runtime_settings(EngineConfig(backend="vllm"), "cpu", threads=3)
    assert cpu_env == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "3"}  # in this process
    assert cpu == {"enforce_eager": True, "kv_cache_memory_bytes": 2**30, "distributed_executor_backend": "uni"}
    gpu_env, gpu = runtime_settings(EngineConfig(backend="vllm"), "cuda", threads=1)
    assert gpu_env == {} and gpu == {"enforce_eager": False}  # compiled; cache sized by gpu_memory_utilization
    set_ = EngineConfig(backend="vllm", vllm=VLLMOptions(enforce_eager=False, kv_cache_gib=0.5, tensor_parallel_size=2))
    env, kw = runtime_settings(set_, "cpu", threads=1)
    assert env == {} and kw == {"enforce_eager": False, "kv_cache_memory_bytes": 2**29}  # vLLM's own processes


def test_auto_backend_choice():
    assert choose_backend("auto", cuda=True, has_vllm=True)[0] == "vllm"
    assert choose_backend("auto", cuda=True, has_vllm=False) == ("transformers", choose_backend(
        "auto", cuda=True, has_vllm=False)[1]) and "not installed" in choose_backend("auto", True, False)[1]
    backend, why = choose_backend("auto", cuda=False, has_vllm=True)
    assert backend == "transformers" and "no CUDA GPU" in why and "engine.backend: vllm" in why
    assert choose_backend("vllm", cuda=False, has_vllm=False) == ("vllm", "engine.backend says so")


def test_tensor_parallel_settings_are_validated(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 12, "num_key_value_heads": 4}))
    assert tensor_parallel_problem(str(tmp_path), 1) is None and tensor_parallel_problem(str(tmp_path), 4) is None
    assert tensor_parallel_problem(str(tmp_path), 12) is None  # 12 ranks: each key/value head on 3 of them
    assert "12 attention heads cannot be split evenly among 5 ranks" in tensor_parallel_problem(str(tmp_path), 5)
    assert "4 key/value heads and 6 ranks" in tensor_parallel_problem(str(tmp_path), 6)
    assert tensor_parallel_problem(str(tmp_path / "missing"), 5) is None  # a hub id: vLLM says it itself
    with pytest.raises(ConfigError, match="num_gpus"):
        EngineConfig(backend="vllm", num_gpus=1, vllm=VLLMOptions(tensor_parallel_size=2)).validate("engine")
    with pytest.raises(ConfigError, match="num_cpus"):
        EngineConfig(backend="vllm", num_cpus=1, vllm=VLLMOptions(tensor_parallel_size=2)).validate("engine")
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        EngineConfig(backend="vllm", vllm=VLLMOptions(tensor_parallel_size=0)).validate("engine")
    with pytest.raises(ConfigError, match="kv_cache_gib"):
        EngineConfig(backend="auto", vllm=VLLMOptions(kv_cache_gib=0)).validate("engine")
    EngineConfig(backend="vllm", num_gpus=2, vllm=VLLMOptions(tensor_parallel_size=2)).validate("engine")
    EngineConfig(backend="vllm", num_gpus=0.5).validate("engine")  # one rank may share a GPU
    EngineConfig(backend="transformers", num_gpus=1, vllm=VLLMOptions(tensor_parallel_size=2)).validate("engine")


def test_a_torchvision_built_for_another_torch_is_one_line_with_the_fix(monkeypatch):
    import actors.install as install
    import actors.vllm_engine as vllm_engine

    def broken(name):
        raise RuntimeError(f"operator {name}::nms does not exist")

    def installed(answer):
        monkeypatch.setattr(install, "importlib", SimpleNamespace(util=SimpleNamespace(find_spec=lambda name: answer)))

    installed(object())
    problem = install.broken_torchvision(broken)
    assert "torchvision::nms" in problem and problem.endswith("pip uninstall -y torchvision torchaudio torchcodec")
    assert install.broken_torchvision(lambda name: None) is None  # one that imports is fine
    installed(None)
    assert install.broken_torchvision(broken) is None  # none installed: nothing to say
    monkeypatch.setattr(vllm_engine, "broken_torchvision", lambda: problem)
    with pytest.raises(EngineError, match="pip uninstall -y torchvision"):
        vllm_engine.import_vllm()
