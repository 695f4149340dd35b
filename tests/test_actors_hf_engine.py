"""The transformers engine on tiny random Llamas (seconds), plus one slow test on the real model."""
from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from actors.base import Engine, EngineError, Generation, SamplingParams
from actors.config import EngineConfig
from actors.hf_engine import TransformersEngine
from actors.models import (
    EMBEDDED_GGUF,
    ModelSource,
    _load_tokenizer,
    load_causal_lm,
    load_tokenizer,
    plain_source,
    resolve_dtype,
    resolve_model,
)
from tests.fakes import fail_batches_holding

CONVS = [  # four prompts of clearly different lengths
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "Tell me a long story about dragons, castles and knights in the moonlight."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "Hi!"},
     {"role": "user", "content": "How are you doing today, my friend? Tell me everything."}],
]


pytestmark = pytest.mark.usefixtures("restore_torch_threads")


def _engine(model_dir, **kw) -> TransformersEngine:
    return TransformersEngine(EngineConfig(model=str(model_dir), max_model_len=512, **kw))


@pytest.fixture(scope="module")
def engine(varied_llama_dir):
    return _engine(varied_llama_dir, batch_size=3)  # 4 rows → micro-batches of 3 and 1


def _raw_greedy_ids(engine, conv, n):
    """Reference: plain HF generate on one unpadded prompt, stopping only at max length."""
    ids = torch.tensor([engine._encode(conv)])
    with torch.inference_mode():
        out = engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                    do_sample=False, eos_token_id=None, pad_token_id=engine.pad_id)
    return out[0, ids.shape[1]:].tolist()


# ------------------------------------------------------------------------------ generate
def test_is_an_engine(engine):
    assert isinstance(engine, Engine)
    assert engine.name == f"transformers:{engine.source.label}"


def test_batched_greedy_equals_one_at_a_time(engine):
    params = SamplingParams(max_new_tokens=24)
    batched = engine.generate(CONVS, params)
    single = [engine.generate([c], params)[0] for c in CONVS]
    assert [g.text for g in batched] == [g.text for g in single]
    assert [(g.prompt_tokens, g.completion_tokens, g.finish_reason) for g in batched] == \
           [(g.prompt_tokens, g.completion_tokens, g.finish_reason) for g in single]
    # not vacuous: real, distinct texts (the untied head makes outputs context-dependent)
    assert all(g.text and g.error is None for g in batched)
    assert len({g.text for g in batched}) == len(CONVS)
    # batch_size 1 and batch_size ≥ rows give the same greedy text too
    for bs in (1, 8):
        engine.cfg = replace(engine.cfg, batch_size=bs)
        try:
            assert [g.text for g in engine.generate(CONVS, params)] == [g.text for g in batched]
        finally:
            engine.cfg = replace(engine.cfg, batch_size=3)


def test_order_and_token_counts(engine):
    params = SamplingParams(max_new_tokens=12)
    out = engine.generate(CONVS, params)
    rev = engine.generate(CONVS[::-1], params)
    assert [g.text for g in rev] == [g.text for g in out][::-1]
    for conv, g in zip(CONVS, out):
        assert g.prompt_tokens == engine.count_tokens(conv)
        assert 0 < g.completion_tokens <= params.max_new_tokens
        if g.finish_reason == "length":
            assert g.completion_tokens == params.max_new_tokens
    assert len({g.prompt_tokens for g in out}) == len(CONVS)


def test_stops_at_eos_and_excludes_padding(engine):
    """Make a token row 0 emits mid-way an extra stop token: row 0 stops right after it,
    rows that never emit it run to max_new_tokens, padding after EOS is not counted."""
    n = 16
    refs = [_raw_greedy_ids(engine, c, n) for c in CONVS]
    stop_tok = next(t for k, t in enumerate(refs[0]) if k >= 3 and t not in refs[0][:k])
    saved = engine.stop_ids
    engine.stop_ids = saved + [stop_tok]
    try:
        out = engine.generate(CONVS, SamplingParams(max_new_tokens=n))
    finally:
        engine.stop_ids = saved
    for ref, g in zip(refs, out):
        cut = ref.index(stop_tok) + 1 if stop_tok in ref else None
        assert g.completion_tokens == (cut or n)
        assert g.finish_reason == ("stop" if cut else "length")
        assert g.text == engine.tokenizer.decode(ref[:cut or n], skip_special_tokens=True).strip()
    assert out[0].finish_reason == "stop" and out[0].completion_tokens < n


def test_stop_strings_truncate(engine):
    params = SamplingParams(max_new_tokens=24)
    full = engine.generate(CONVS[:1], params)[0]
    stop = full.text.split()[2]  # a word from the middle of the reply
    cut = engine.generate(CONVS[:1], replace(params, stop=("never-appears", stop)))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(stop)].strip()
    assert 0 < cut.completion_tokens < full.completion_tokens


def test_seeded_sampling_is_reproducible(engine):
    p1 = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=1)
    a, b = engine.generate(CONVS, p1), engine.generate(CONVS, p1)
    assert [g.text for g in a] == [g.text for g in b]
    c = engine.generate(CONVS, replace(p1, seed=2))
    assert any(x.text != y.text for x, y in zip(a, c))
    greedy = engine.generate(CONVS, SamplingParams(max_new_tokens=10))
    assert any(x.text != y.text for x, y in zip(a, greedy))


def test_too_long_prompt_fails_only_its_row(varied_llama_dir):
    eng = _engine(varied_llama_dir, batch_size=4)
    eng.cfg = replace(eng.cfg, max_model_len=64)
    long_conv = [{"role": "user", "content": "word " * 100}]
    out = eng.generate([CONVS[0], long_conv, CONVS[2]], SamplingParams(max_new_tokens=8))
    assert out[1].error is not None and out[1].finish_reason == "error" and out[1].text == ""
    assert re.fullmatch(r"prompt_too_long: \d+ tokens > limit 56", out[1].error)
    assert all(g.error is None and g.text for g in (out[0], out[2]))
    assert [g.text for g in (out[0], out[2])] == [g.text for g in eng.generate([CONVS[0], CONVS[2]],
                                                                              SamplingParams(max_new_tokens=8))]


def test_generate_error_falls_back_to_single_rows(varied_llama_dir, monkeypatch):
    eng = _engine(varied_llama_dir, batch_size=4)
    fail_batches_holding(eng, eng.count_tokens(CONVS[1]), monkeypatch)  # any batch holding row 1 fails
    out = eng.generate(CONVS, SamplingParams(max_new_tokens=6))
    assert out[1].error == "generate_error: RuntimeError: boom"
    assert all(out[i].error is None and out[i].text for i in (0, 2, 3))


def test_bad_conversation_is_a_row_error(engine):
    out = engine.generate([CONVS[0], [{"content": "no role"}]], SamplingParams(max_new_tokens=4))
    assert out[0].error is None
    assert isinstance(out[1], Generation) and out[1].error.startswith("bad_conversation")


# ------------------------------------------------------------------------------ choice_logprobs
def test_choice_logprobs_match_manual_forward(engine, varied_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    choices = ["A", "B"]
    batched = engine.choice_logprobs(CONVS, choices)
    tok = AutoTokenizer.from_pretrained(varied_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(varied_llama_dir, dtype=torch.float32).eval()
    ids_ab = [tok.convert_tokens_to_ids(c) for c in choices]
    for conv, row in zip(CONVS, batched):
        assert len(row) == 2 and sum(math.exp(x) for x in row) <= 1 + 1e-5
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            ref = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)[ids_ab].tolist()
        assert row == pytest.approx(ref, abs=1e-4)
    single = [engine.choice_logprobs([c], choices)[0] for c in CONVS]
    assert batched == [pytest.approx(s, abs=1e-4) for s in single]


def test_choice_logprobs_choice_checks_and_long_rows(engine):
    with pytest.raises(EngineError, match="first token"):
        engine.choice_logprobs(CONVS[:1], ["(A)", "(B)"])
    with pytest.raises(EngineError, match="no choices"):
        engine.choice_logprobs(CONVS[:1], [])
    abc = engine.choice_logprobs(CONVS[:1], ["A", "B", "C"])[0]
    assert len(abc) == 3 and sum(math.exp(x) for x in abc) <= 1 + 1e-5
    engine.cfg = replace(engine.cfg, max_model_len=40)
    try:
        out = engine.choice_logprobs(CONVS, ["A", "B"])
    finally:
        engine.cfg = replace(engine.cfg, max_model_len=512)
    lens = [engine.count_tokens(c) for c in CONVS]
    for n, row in zip(lens, out):
        assert all(math.isnan(x) for x in row) == (n > 39)
    assert any(n > 39 for n in lens) and any(n <= 39 for n in lens)


# ------------------------------------------------------------------------------ model sources
def test_resolve_embedded_and_gguf_path(tmp_path):
    for spec in ("embedded", "smollm2", "SmolLM2-135M-Instruct"):
        src = resolve_model(spec)
        assert src.gguf_file == EMBEDDED_GGUF and (Path(src.path) / src.gguf_file).is_file()
    f = tmp_path / "m" / "tiny.Q8_0.gguf"
    f.parent.mkdir()
    f.write_bytes(b"GGUF")
    assert resolve_model(str(f)) == ModelSource(path=str(f.parent.resolve()), gguf_file=f.name, label="tiny.Q8_0")
    with pytest.raises(EngineError, match=r"no \.gguf file"):
        resolve_model(str(tmp_path / "missing.gguf"))


def test_resolve_directories(tmp_path, tiny_llama_dir):
    src = resolve_model(str(tiny_llama_dir))
    assert src.gguf_file is None and src.path == str(tiny_llama_dir.resolve())
    with pytest.raises(EngineError, match="config.json"):
        resolve_model(str(tmp_path))


def test_resolve_unknown_name_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec in ("nobody-here/no-such-model", str(tmp_path / "not" / "there")):
        with pytest.raises(EngineError, match="no local directory or file named") as e:
            resolve_model(spec)
        assert "`embedded`" in str(e.value)


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == torch.float32  # tests run with CAI_RAY_CPU_BF16=0 (conftest)
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(EngineError, match="dtype"):
        resolve_dtype("float8", "cpu")


def test_tied_tiny_model_loads_and_pads_left(tiny_llama_dir):
    eng = _engine(tiny_llama_dir)
    assert eng.tokenizer.padding_side == "left" and eng.pad_id is not None
    assert eng.tokenizer.convert_tokens_to_ids("<|im_end|>") in eng.stop_ids
    g = eng.generate(CONVS[:2], SamplingParams(max_new_tokens=4))
    assert [x.completion_tokens for x in g] == [4, 4] and all(x.error is None for x in g)


# ------------------------------------------------------------------------------ the real model
# GGUF tensor names → the Hugging Face Llama parameter names (``{}``: the layer); attn_q and
# attn_k are stored permuted for llama.cpp's rotary layout, so they are compared by shape only.
_GGUF_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
               "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
               "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
               "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
               "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
               "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
               "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
               "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
               "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
               "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight"}


def _hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return _GGUF_NAMES[".".join(["blk", "{}", *parts[2:]])].format(parts[1])
    return _GGUF_NAMES[gguf_name]


@pytest.mark.slow
def test_embedded_gguf_is_dequantized_once_into_the_cache():
    """The cached copy holds exactly the GGUF file's weights, dequantized by the gguf library
    itself (not by the loader under test), and is made once."""
    import gguf
    import numpy as np

    src = resolve_model("embedded")
    plain = plain_source(src)  # the test run's own cache (conftest): converts, or reuses this run's copy
    root = Path(plain.path)
    assert plain.gguf_file is None and (root / "_CONVERTED").is_file() and (root / "model.safetensors").is_file()
    assert "quantization_config" not in (root / "config.json").read_text()
    stamp = (root / "model.safetensors").stat().st_mtime_ns
    assert plain_source(src) == plain and (root / "model.safetensors").stat().st_mtime_ns == stamp  # not redone
    cached = load_causal_lm("embedded").state_dict()
    tensors = gguf.GGUFReader(Path(src.path) / src.gguf_file).tensors
    assert {t.tensor_type.name for t in tensors} >= {"Q4_1", "Q8_0"}  # quantized: dequantization is tested
    compared = 0
    for t in tensors:
        name = _hf_name(t.name)
        weight = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        assert weight.numel() == cached[name].numel(), name
        if ".attn_q." not in t.name and ".attn_k." not in t.name:
            assert torch.equal(weight.reshape(cached[name].shape), cached[name]), name
            compared += 1
    assert compared > 0.7 * len(tensors) and all(k in {_hf_name(t.name) for t in tensors} or k == "lm_head.weight"
                                                 for k in cached)
    conv = [{"role": "user", "content": "Name a color."}]
    tok, gguf_tok = load_tokenizer("embedded"), _load_tokenizer(src)
    assert tok.apply_chat_template(conv, add_generation_prompt=True) == gguf_tok.apply_chat_template(
        conv, add_generation_prompt=True)
    assert (tok.padding_side, tok.pad_token, tok.eos_token) == ("left", gguf_tok.pad_token, gguf_tok.eos_token)


def test_plain_save_writes_the_model_on_any_distributed_rank(tiny_llama_dir, monkeypatch, tmp_path):
    """Newer transformers skip ``save_pretrained`` silently on torch.distributed ranks other than 0;
    a GGUF conversion run by a Ray Train worker of rank 1 once left a cache copy without a model."""
    from transformers import AutoModelForCausalLM

    from actors.models import save_plain_lm

    mixin = pytest.importorskip("transformers.distributed.mixin")
    if not hasattr(mixin, "_get_torch_distributed_rank"):
        pytest.skip("this transformers does not check the distributed rank when saving")
    monkeypatch.setattr(mixin, "_is_torch_distributed_initialized", lambda: True)
    monkeypatch.setattr(mixin, "_get_torch_distributed_rank", lambda: 1)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.config.use_cache = False  # as training leaves it
    save_plain_lm(model.state_dict(), model.config, tmp_path / "out")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert all(torch.equal(saved.state_dict()[k], v) for k, v in model.state_dict().items())
    assert saved.config.use_cache and saved.generation_config.use_cache  # saved ready for inference


def test_a_broken_cache_copy_is_converted_again(monkeypatch, tmp_path, tiny_llama_dir):
    """A copy with its marker but no model is replaced by a whole one. The dequantization itself is
    the test above's: here the GGUF loader hands back the tiny model, so the conversion takes a second."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors import models
    from actors.models import converted_dir

    monkeypatch.setenv("CAI_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_load_model", lambda src, dtype, dev: AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, dtype=dtype))
    monkeypatch.setattr(models, "_load_tokenizer", lambda src: AutoTokenizer.from_pretrained(tiny_llama_dir))
    src = resolve_model("embedded")
    broken = converted_dir(src)
    broken.mkdir(parents=True)
    (broken / "_CONVERTED").write_text("marker without a model\n")
    plain = plain_source(src)
    assert Path(plain.path) == broken and (broken / "config.json").is_file()
    assert (broken / "_CONVERTED").read_text().strip().endswith(src.gguf_file)  # the new copy's marker
    assert [p.name for p in broken.parent.iterdir()] == [broken.name]  # the broken copy is gone, no temp left
    tiny = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    loaded = load_causal_lm("embedded").state_dict()
    assert loaded.keys() == tiny.keys() and all(torch.equal(loaded[k], tiny[k]) for k in tiny)


def test_model_cache_off_or_unwritable_falls_back_to_the_gguf_file(monkeypatch, tmp_path):
    src = resolve_model("embedded")
    monkeypatch.setenv("CAI_RAY_CACHE", "off")
    assert plain_source(src) == src
    (tmp_path / "a-file").write_text("not a directory")
    monkeypatch.setenv("CAI_RAY_CACHE", str(tmp_path / "a-file" / "cache"))
    with pytest.warns(UserWarning, match="CAI_RAY_CACHE"):
        assert plain_source(src) == src


@pytest.mark.slow
def test_embedded_model_generates_english():
    eng = TransformersEngine(EngineConfig(model="embedded", max_model_len=1024))
    assert eng.name == "transformers:SmolLM2-135M-Instruct"
    out = eng.generate([[{"role": "user", "content": "What is the capital of France?"}],
                        [{"role": "user", "content": "Name a color."}]], SamplingParams(max_new_tokens=8))
    for g in out:
        assert g.error is None and 0 < g.completion_tokens <= 8
        assert re.search(r"[A-Za-z]{2,}", g.text), g.text
    assert "paris" in out[0].text.lower() or len(out[0].text.split()) >= 2


def test_repetition_penalty_discourages_repeats(tiny_llama_dir, tmp_path):
    """A tied-embedding random model repeats its last token forever; the penalty breaks the loop."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_pretrained(tiny_llama_dir)
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(tmp_path)
    eng = _engine(tmp_path)
    conv = [[{"role": "user", "content": "Say something."}]]
    ids = lambda g: eng.tokenizer(g.text, add_special_tokens=False)["input_ids"]  # noqa: E731
    plain = eng.generate(conv, SamplingParams(max_new_tokens=12))[0]
    penalised = eng.generate(conv, SamplingParams(max_new_tokens=12, repetition_penalty=5.0))[0]
    assert len(set(ids(plain))) <= 1  # the loop: one token (or only whitespace) over and over
    assert len(set(ids(penalised))) >= 6


def test_engine_generates_with_a_kv_cache_even_when_the_model_says_use_cache_false(varied_llama_dir, tmp_path,
                                                                                    restore_torch_threads):
    """A model saved with training's leftover ``use_cache: false`` (ours before this was fixed, or
    anyone's): the engine passes the cache explicitly, so each new token runs alone, not the
    whole sequence again."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(varied_llama_dir)
    model.config.use_cache = model.generation_config.use_cache = False
    model.save_pretrained(tmp_path / "no-cache")
    AutoTokenizer.from_pretrained(varied_llama_dir).save_pretrained(tmp_path / "no-cache")
    eng = _engine(tmp_path / "no-cache", prefix_cache=False)
    widths = []
    real = eng.model.forward
    eng.model.forward = lambda *a, **kw: widths.append(kw["input_ids"].shape[1]) or real(*a, **kw)
    out = eng.generate(CONVS[:2], SamplingParams(max_new_tokens=6))
    assert all(g.error is None for g in out) and len(widths) >= 3
    assert widths[0] > 10 and set(widths[1:]) == {1}  # the prompt once, then one token per step
