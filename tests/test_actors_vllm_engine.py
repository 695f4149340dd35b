"""The vLLM backend: pure helpers and the engine's bookkeeping on CPU (against a fake ``vllm``
module that behaves like the real offline API: it aborts the whole batch on an over-long
prompt), the install hint where vLLM is absent, and one real run on a GPU."""
from __future__ import annotations

import importlib.util
import math
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

from actors.base import EngineError, Generation, SamplingParams
from actors.config import EngineConfig, VLLMOptions
from actors.models import ModelSource
from actors.vllm_engine import (
    INSTALL_HINT,
    VLLMEngine,
    choice_row,
    choice_token_ids,
    encode_rows,
    llm_kwargs,
    reassemble,
    sampling_kwargs,
    to_generation,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None


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


def test_llm_kwargs(tmp_path):
    cfg = EngineConfig(backend="vllm", max_model_len=1024, dtype="bf16",
                       vllm=VLLMOptions(tensor_parallel_size=2, gpu_memory_utilization=0.5))
    kw = llm_kwargs(ModelSource(path="/models/m", gguf_file=None, label="m"), cfg)
    assert kw == dict(model="/models/m", tensor_parallel_size=2, gpu_memory_utilization=0.5,
                      enable_prefix_caching=True, max_model_len=1024, dtype="bfloat16", seed=0, max_logprobs=20,
                      worker_extension_cls="actors.vllm_engine.WeightLoader")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    gguf = ModelSource(path=str(tmp_path), gguf_file="m.gguf", label="m")
    assert llm_kwargs(gguf, cfg)["model"] == str(tmp_path / "m.gguf")
    assert llm_kwargs(gguf, cfg)["tokenizer"] == str(tmp_path / "m.gguf")  # tokenizer from the GGUF itself
    (tmp_path / "tokenizer.json").write_text("{}")
    assert llm_kwargs(gguf, cfg)["tokenizer"] == str(tmp_path)  # ... unless the directory has one
    assert llm_kwargs(gguf, EngineConfig(tokenizer="tok-dir"))["tokenizer"] == "tok-dir"


# ---------------------------------------------------------------- the engine on a fake vllm
class FakeTokenizer:
    """Word-level; the chat template wraps turns in <|im_start|> ... <|im_end|>."""

    chat_template = "{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}<|im_end|>{% endfor %}"

    def __init__(self):
        self.vocab = {"<|im_end|>": 0, "<|im_start|>": 1, "A": 2, "B": 3}

    def get_vocab(self):
        return dict(self.vocab)

    def apply_chat_template(self, conv, tokenize=False, add_generation_prompt=True):
        turns = "".join(f"<|im_start|> {m['role']} {m['content']} <|im_end|> " for m in conv)
        return turns + ("<|im_start|> assistant" if add_generation_prompt else "")

    def encode(self, text, add_special_tokens=False):
        return [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]


class FakeLLM:
    """Mimics ``vllm.LLM``: rejects the WHOLE batch if one prompt exceeds max_model_len or
    contains the word BOOM; answers "reply to <n> tokens"; logprob requests favour A or B."""

    def __init__(self, **kwargs):
        self.kwargs, self.calls, self.tok = kwargs, [], FakeTokenizer()
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=kwargs["max_model_len"]))

    def get_tokenizer(self):
        return self.tok

    def collective_rpc(self, method, args=()):
        """Runs the worker extension's method by name, as vLLM does in each worker."""
        from actors.vllm_engine import WeightLoader

        self.loaded = getattr(self, "loaded", [])
        worker = type("Worker", (WeightLoader,), {})()
        worker.model_runner = SimpleNamespace(model=SimpleNamespace(load_weights=lambda weights: self.loaded.extend(weights)))
        return [getattr(worker, method)(*args)]

    def reset_prefix_cache(self):
        self.resets = getattr(self, "resets", 0) + 1

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append((prompts, sampling_params))
        boom = self.tok.vocab.get("BOOM")
        for p in prompts:
            if len(p["prompt_token_ids"]) > self.kwargs["max_model_len"] or boom in p["prompt_token_ids"]:
                raise ValueError("The decoder prompt is longer than the maximum model length")
        return [self._answer(p["prompt_token_ids"], sp) for p, sp in zip(prompts, sampling_params)]

    def _answer(self, ids, sp):
        words = {w for w, i in self.tok.vocab.items() if i in ids}
        if getattr(sp, "logprobs", None):
            lp = {2: -0.1, 3: -2.0} if "preferA" in words else {3: -0.3, 9999: -1.0} if "preferB" in words else {}
            top = {t: SimpleNamespace(logprob=v) for t, v in lp.items()} or {9999: SimpleNamespace(logprob=-0.1)}
            return SimpleNamespace(prompt_token_ids=ids, outputs=[SimpleNamespace(
                text="?", token_ids=[9999], finish_reason="length", logprobs=[top])])
        text = f" reply to {len(ids)} tokens seed={getattr(sp, 'seed', None)} "
        return SimpleNamespace(prompt_token_ids=ids, outputs=[SimpleNamespace(
            text=text, token_ids=[5] * min(sp.max_tokens, 4), finish_reason="stop", logprobs=None)])


@pytest.fixture
def fake_vllm(monkeypatch, tmp_path):
    mod = types.ModuleType("vllm")
    mod.LLM = FakeLLM
    mod.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", mod)
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def _user(text):
    return [{"role": "user", "content": text}]


def test_generate_validates_before_vllm_and_keeps_order(fake_vllm):
    eng = VLLMEngine(EngineConfig(backend="vllm", model=str(fake_vllm), max_model_len=20))
    assert eng.name == f"vllm:{fake_vllm.name}" and eng.stop_ids == [0]
    assert eng.llm.kwargs["enable_prefix_caching"] is True and eng.llm.kwargs["model"] == str(fake_vllm)
    convs = [_user("hi"), _user("word " * 30), [{"content": "no role"}], _user("hello there"), _user("hi")]
    gens = eng.generate(convs, SamplingParams(max_new_tokens=4, temperature=1.0, seed=7))
    assert len(eng.llm.calls) == 1 and len(eng.llm.calls[0][0]) == 3  # only valid rows reached vLLM
    assert gens[1].error.startswith("prompt_too_long:") and gens[2].error.startswith("bad_conversation:")
    assert gens[0].text.startswith("reply to 6 tokens") and gens[3].text.startswith("reply to 7 tokens")
    assert gens[0].prompt_tokens == 6 and gens[0].completion_tokens == 4 and gens[0].finish_reason == "stop"
    assert gens[0].text != gens[4].text  # identical prompts, distinct per-row seeds
    sp = eng.llm.calls[0][1][0]
    assert sp.temperature == 1.0 and sp.max_tokens == 4 and sp.stop_token_ids == [0] and isinstance(sp.seed, int)


def test_one_bad_row_inside_vllm_is_isolated(fake_vllm):
    eng = VLLMEngine(EngineConfig(backend="vllm", model=str(fake_vllm), max_model_len=64))
    gens = eng.generate([_user("fine"), _user("BOOM"), _user("also fine")], SamplingParams(max_new_tokens=2))
    assert gens[0].error is None and gens[2].error is None
    assert gens[1].error.startswith("generate_error: ValueError")
    assert eng.generate([], SamplingParams()) == []


def test_choice_logprobs_on_fake_vllm(fake_vllm):
    eng = VLLMEngine(EngineConfig(backend="vllm", model=str(fake_vllm), max_model_len=12,
                                  vllm=VLLMOptions(top_logprobs=5)))
    rows = eng.choice_logprobs([_user("preferA"), _user("preferB"), _user("neither"), _user("x " * 20)], ["A", "B"])
    assert rows[0] == [-0.1, -2.0] and rows[1] == [-math.inf, -0.3]
    assert all(math.isnan(v) for v in rows[2]) and all(math.isnan(v) for v in rows[3])  # no choice / too long
    sp = eng.llm.calls[0][1][0]
    assert (sp.max_tokens, sp.temperature, sp.logprobs) == (1, 0.0, 5)


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here")
def test_missing_vllm_raises_engine_error_with_install_hint():
    with pytest.raises(EngineError, match=r"needs a CUDA GPU and `pip install cai-ray\[vllm\]`") as e:
        VLLMEngine(EngineConfig(backend="vllm"))
    assert INSTALL_HINT in str(e.value)


# ---------------------------------------------------------------- real vLLM on a GPU
def _gpu_ready() -> bool:
    try:
        import torch

        return HAS_VLLM and torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason="needs a CUDA GPU and vllm")
@pytest.mark.skipif(not os.environ.get("CAI_TEST_MODEL_DIR"), reason="set CAI_TEST_MODEL_DIR to a small model dir")
def test_real_vllm_generate_and_choice_logprobs():
    model = str(Path(os.environ["CAI_TEST_MODEL_DIR"]))
    eng = VLLMEngine(EngineConfig(backend="vllm", model=model, max_model_len=512,
                                  vllm=VLLMOptions(gpu_memory_utilization=0.4)))
    convs = [_user("Say hello."), _user("word " * 2000), _user("What is 2+2? Answer briefly.")]
    gens = eng.generate(convs, SamplingParams(max_new_tokens=16))
    assert isinstance(gens[0], Generation) and gens[0].error is None and gens[2].error is None
    assert gens[1].error.startswith("prompt_too_long:")
    assert 0 < gens[0].completion_tokens <= 16 and gens[0].finish_reason in ("stop", "length")
    again = eng.generate(convs[:1], SamplingParams(max_new_tokens=16))
    assert again[0].text == gens[0].text  # greedy is deterministic
    sampled = eng.generate(convs[:1] * 2, SamplingParams(max_new_tokens=16, temperature=1.0, seed=1))
    assert sampled == eng.generate(convs[:1] * 2, SamplingParams(max_new_tokens=16, temperature=1.0, seed=1))
    judge = _user("Which letter comes first in the alphabet? Answer with A or B.\n(A) A\n(B) Z")
    rows = eng.choice_logprobs([judge, convs[1]], ["A", "B"])
    assert all(math.isnan(v) for v in rows[1])
    assert all(math.isnan(v) or v <= 0 for v in rows[0])
    if not any(math.isnan(v) for v in rows[0]):
        assert math.log(sum(math.exp(v) for v in rows[0])) <= 1e-4


def test_weights_load_by_name_through_the_worker_extension_and_reset_the_prefix_cache(fake_vllm):
    eng = VLLMEngine(EngineConfig(backend="vllm", model=str(fake_vllm), max_model_len=20))
    assert eng.generate([_user("hi")], SamplingParams(max_new_tokens=2))[0].extra["policy_version"] == 0
    eng.load_weights({"a.weight": 1, "b.bias": 2}, version=1)
    assert eng.llm.loaded == [("a.weight", 1), ("b.bias", 2)] and eng.llm.resets == 1
    g = eng.generate([_user("hi")], SamplingParams(max_new_tokens=2))[0]
    assert g.extra["policy_version"] == 1 and g.extra["token_ids"] == [5, 5]
    with pytest.raises(EngineError, match="not newer"):
        eng.load_weights({}, version=1)
