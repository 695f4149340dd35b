"""Shared-prefix KV caching in the transformers engine: same outputs as without it, less prefill."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from actors.base import SamplingParams
from actors.config import EngineConfig
from actors.hf_engine import TransformersEngine
from actors.prefix_cache import (
    batch_common_prefix_len,
    common_prefix_len,
    group_prefix_lens,
    pack_groups,
    pad_middle,
    positions_from_mask,
    prefix_groups,
    shared_prefix_len,
)
from tests.fakes import fail_batches_holding
from workflows.core.pairwise import both_orders

# A few-shot chat every row starts with (~60 tokens after templating), then different questions.
SHOTS = [
    {"role": "user", "content": "Here is an example question about the weather in the mountains and the rivers."},
    {"role": "assistant", "content": "An example answer that talks at length about clouds, rain, wind and sunshine."},
]
QUESTIONS = ["What is 2+2?", "Tell me about dragons and knights in the moonlight.", "hi",
             "Why is the sky blue, and why do sunsets look red?", "Name three fruits."]
SHARED = [[*SHOTS, {"role": "user", "content": q}] for q in QUESTIONS]
OTHER = [[*SHOTS, {"role": "user", "content": q}] for q in
         ("Could you explain photosynthesis?", "Give me a haiku about autumn leaves.", "Which is bigger, 3 or 7?")]
NO_PREFIX = [  # different system turns: the rows share only a few template tokens
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Answer like a pirate."}, {"role": "user", "content": "Where is the treasure?"}],
    [{"role": "user", "content": "Tell me a long story about dragons, castles and knights in the moonlight."}],
]


pytestmark = pytest.mark.usefixtures("restore_torch_threads")


@pytest.fixture(scope="module")
def model_dir(varied_llama_dir):
    return varied_llama_dir


def _engine(model_dir, **kw) -> TransformersEngine:
    kw.setdefault("batch_size", 2)  # 5 rows → micro-batches of 2, 2 and 1
    return TransformersEngine(EngineConfig(model=str(model_dir), max_model_len=512, **kw))


@pytest.fixture(scope="module")
def off(model_dir):
    return _engine(model_dir, prefix_cache=False)


class TokenCounter:
    """Counts the input tokens of every forward pass of a model (pads included)."""

    def __init__(self, model):
        self.widths: list[tuple[int, int]] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.widths.append(tuple(ids.shape))

    @property
    def tokens(self) -> int:
        return sum(b * n for b, n in self.widths)

    def close(self):
        self.handle.remove()


def _summary(gens):
    return [(g.text, g.prompt_tokens, g.completion_tokens, g.finish_reason, g.error) for g in gens]


# ------------------------------------------------------------------------------ pure helpers
def test_common_prefix_helpers():
    assert common_prefix_len([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2 and common_prefix_len([], [1]) == 0
    assert batch_common_prefix_len([[1, 2, 3, 4], [1, 2, 3], [1, 2, 9]]) == 2
    assert batch_common_prefix_len([[5, 6]]) == 2 and batch_common_prefix_len([]) == 0
    rows = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6, 7]]
    assert shared_prefix_len(rows, 2) == 4
    assert shared_prefix_len(rows, 5) == 0  # below the threshold
    assert shared_prefix_len([[1, 2, 3], [1, 2, 3, 4]], 1) == 2  # every row keeps ≥ 1 token of its own
    assert shared_prefix_len([[1, 2, 3, 4]], 1) == 3  # one row: all but its last token
    assert shared_prefix_len([[1]], 0) == 0 and shared_prefix_len([], 0) == 0


def test_pad_middle_and_positions():
    ids, mask = pad_middle([[1, 2, 3, 4, 5], [1, 2, 3, 9]], 3, pad_id=0)
    assert ids == [[1, 2, 3, 4, 5], [1, 2, 3, 0, 9]]
    assert mask == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 1]]
    assert positions_from_mask(torch.tensor(mask)).tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 3]]


H = list(range(100, 140))  # 40 tokens every row starts with


def test_prefix_groups_find_rows_sharing_more_than_all_rows_share():
    a1, a2, a3 = H + [1] * 50 + [5, 6, 7], H + [1] * 50 + [8, 9], H + [1] * 50 + [8, 3, 3]
    b1, b2, c = H + [2] * 50 + [5], H + [2] * 50 + [6, 7, 8], H + [3, 4]
    rows = [a1, b1, c, a2, b2, a3]
    groups = prefix_groups(rows, 16)
    assert groups == [[0, 3, 5], [1, 4], [2]]  # a* share 90 tokens, b* 90, c only the 40 all rows share
    # a2 and a3 share 2 more tokens than a1 does, but keeping a1 in the group saves more (2 × 50 > 1 × 52)
    assert group_prefix_lens(rows, groups) == [90, 90, 41]  # the lone row: as wide as the others, < its length
    assert prefix_groups(rows, 60) == [[0], [1], [2], [3], [4], [5]]  # 50 extra tokens < 60: no groups
    assert prefix_groups([a1], 16) == [[0]] and prefix_groups([], 16) == []
    # the base is what all rows share: rows sharing only that do not group, whatever its length
    assert prefix_groups([H + [1], H + [2], H + [3]], 16) == [[0], [1], [2]]


def test_pack_groups_keeps_groups_in_one_micro_batch():
    lengths = [10, 50, 11, 50, 30, 12]
    groups = [[0, 2, 5], [1, 3], [4]]
    assert pack_groups(groups, lengths, 4) == [[1, 3, 4], [0, 2, 5]]  # longest first; [4] fits after [1, 3]
    assert pack_groups(groups, lengths, 2) == [[1, 3], [4], [0, 2], [5]]  # a group over the size is split
    assert sorted(i for c in pack_groups(groups, lengths, 3) for i in c) == list(range(6))


# ------------------------------------------------------------------------------ generate
def test_greedy_generate_same_with_and_without_cache(model_dir, off):
    on = _engine(model_dir)
    lens = [on.count_tokens(c) for c in SHARED]
    shared = batch_common_prefix_len([on._encode(c) for c in SHARED])
    assert shared >= 50 and len(set(lens)) == len(lens)  # a long common prefix, suffixes of different lengths
    params = SamplingParams(max_new_tokens=16)
    cached = on.generate(SHARED, params)
    plain = off.generate(SHARED, params)
    single = [off.generate([c], params)[0] for c in SHARED]
    assert _summary(cached) == _summary(plain) == _summary(single)
    assert [g.prompt_tokens for g in cached] == lens  # the full prompt, cached prefix included
    assert all(g.error is None and g.text for g in cached) and len({g.text for g in cached}) == len(SHARED)
    assert on.stats["prefix_batches"] == 3 and on.stats["prefix_tokens_computed"] >= shared
    assert off.stats["prefix_batches"] == 0 and on.stats["prefill_tokens"] < off.stats["prefill_tokens"] / 2
    # larger micro-batches and a second call (a warm cache) give the same text too
    on.cfg = replace(on.cfg, batch_size=8)
    assert _summary(on.generate(SHARED, params)) == _summary(plain)


def test_prefix_is_reused_across_calls_and_survives_generate(model_dir, off):
    on = _engine(model_dir)
    params = SamplingParams(max_new_tokens=12)
    assert _summary(on.generate(SHARED, params)) == _summary(off.generate(SHARED, params))
    computed, hits = on.stats["prefix_tokens_computed"], on.stats["prefix_hits"]
    # A second call, other questions after the same few-shot chat: the prefix is not prefilled again
    # beyond the stored one; each micro-batch (2 + 1 rows) reuses it.
    counter = TokenCounter(on.model)
    try:
        out = on.generate(OTHER, params)
    finally:
        counter.close()
    assert _summary(out) == _summary(off.generate(OTHER, params))
    assert on.stats["prefix_hits"] == hits + 2
    shared = batch_common_prefix_len([on._encode(c) for c in SHARED + OTHER])
    assert on.stats["prefix_tokens_computed"] - computed <= 2 * max(len(on._encode(c)) - shared for c in OTHER)
    longest_suffix = max(len(on._encode(c)) for c in OTHER) - shared
    assert counter.widths and all(n <= longest_suffix for _, n in counter.widths)  # no forward sees the prefix
    # the stored prefix was not corrupted by the generate calls that grew their own copies
    assert on.choice_logprobs(SHARED, ["A", "B"]) == [pytest.approx(r, abs=1e-4)
                                                      for r in off.choice_logprobs(SHARED, ["A", "B"])]
    assert _summary(on.generate(SHARED, params)) == _summary(off.generate(SHARED, params))


def test_no_common_prefix_still_works(model_dir, off):
    on = _engine(model_dir, batch_size=3)
    params = SamplingParams(max_new_tokens=10)
    assert batch_common_prefix_len([on._encode(c) for c in NO_PREFIX]) < on.cfg.min_prefix_tokens
    assert _summary(on.generate(NO_PREFIX, params)) == _summary(off.generate(NO_PREFIX, params))
    assert on.stats["prefix_batches"] == 0
    # mixed: shared-prefix rows and unrelated rows in one call
    mixed = [SHARED[0], NO_PREFIX[0], SHARED[1], NO_PREFIX[2], SHARED[3]]
    assert _summary(on.generate(mixed, params)) == _summary(off.generate(mixed, params))


def test_switch_off_and_threshold(model_dir):
    params = SamplingParams(max_new_tokens=4)
    eng = _engine(model_dir, prefix_cache=False)
    assert eng.prefix is None
    counter = TokenCounter(eng.model)
    try:
        eng.generate(SHARED[:2], params)
    finally:
        counter.close()
    assert counter.widths[0] == (2, max(eng.count_tokens(c) for c in SHARED[:2]))  # the whole prompt is run
    assert eng.stats["prefix_batches"] == eng.stats["prefix_hits"] == 0
    shared = batch_common_prefix_len([eng._encode(c) for c in SHARED])
    high = _engine(model_dir, min_prefix_tokens=shared + 1, batch_size=8)
    high.generate(SHARED, params)
    assert high.stats["prefix_batches"] == 0
    low = _engine(model_dir, min_prefix_tokens=shared, batch_size=8)
    low.generate(SHARED, params)
    assert low.stats["prefix_batches"] == 1


def test_partial_reuse_crops_and_extends(model_dir, off):
    """The stored prefix runs past the new rows' common prefix: its agreeing part is reused."""
    on = _engine(model_dir, batch_size=8)
    params = SamplingParams(max_new_tokens=8)
    tell = [[*SHOTS, {"role": "user", "content": f"Tell me about {x}, please."}] for x in ("cats", "the sea")]
    on.generate(tell, params)  # stores the few-shot chat + "...Tell me about"
    stored = len(on.prefix.ids)
    out = on.generate(OTHER, params)
    assert _summary(out) == _summary(off.generate(OTHER, params))
    shared = batch_common_prefix_len([on._encode(c) for c in OTHER])
    assert shared < stored and on.stats["prefix_hits"] == 1
    assert on.stats["prefix_tokens_reused"] == common_prefix_len(on._encode(tell[0]), on._encode(OTHER[0]))
    assert on.stats["prefix_tokens_reused"] >= on.cfg.min_prefix_tokens


def test_seeded_sampling_same_with_cache(model_dir, off):
    on = _engine(model_dir)
    p = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=3)
    a, b = on.generate(SHARED, p), on.generate(SHARED, p)
    assert _summary(a) == _summary(b) == _summary(off.generate(SHARED, p))
    assert _summary(a) != _summary(on.generate(SHARED, replace(p, seed=4)))


def test_batch_error_falls_back_to_rows_with_cache(model_dir, off, monkeypatch):
    on = _engine(model_dir, batch_size=8)
    fail_batches_holding(on, on.count_tokens(SHARED[1]), monkeypatch)  # any batch holding row 1 fails
    params = SamplingParams(max_new_tokens=8)
    out = on.generate(SHARED, params)
    assert out[1].error == "generate_error: RuntimeError: boom"
    ref = off.generate(SHARED, params)
    assert [_summary([out[i]]) for i in (0, 2, 3, 4)] == [_summary([ref[i]]) for i in (0, 2, 3, 4)]
    assert on.stats["prefix_hits"] >= 4  # the single-row retries reused the batch's prefix


def test_too_long_row_with_cache(model_dir):
    on, plain = (_engine(model_dir, batch_size=8, prefix_cache=flag) for flag in (True, False))
    for eng in (on, plain):
        eng.cfg = replace(eng.cfg, max_model_len=120)
    rows = [*SHARED[:3], [*SHOTS, {"role": "user", "content": "word " * 60}]]
    params = SamplingParams(max_new_tokens=8)
    out = on.generate(rows, params)
    assert out[3].error.startswith("prompt_too_long") and all(g.error is None for g in out[:3])
    assert _summary(out) == _summary(plain.generate(rows, params))
    assert on.stats["prefix_batches"] == 1


# ------------------------------------------------------------------------------ choice_logprobs
def test_choice_logprobs_same_with_and_without_cache(model_dir, off):
    on = _engine(model_dir)
    choices = ["A", "B", "C"]
    for convs in (SHARED, OTHER, NO_PREFIX, [SHARED[0], SHARED[0][:-1] + [{"role": "user", "content": "hi!"}]]):
        got, ref = on.choice_logprobs(convs, choices), off.choice_logprobs(convs, choices)
        assert got == [pytest.approx(r, abs=1e-4) for r in ref]
    assert on.stats["prefix_batches"] >= 6 and on.stats["prefix_hits"] >= 5
    # a warm second call over the same rows runs the suffixes only
    counter = TokenCounter(on.model)
    try:
        again = on.choice_logprobs(SHARED, choices)
    finally:
        counter.close()
    shared = batch_common_prefix_len([on._encode(c) for c in SHARED])
    assert all(n <= max(on.count_tokens(c) for c in SHARED) - shared for _, n in counter.widths)
    assert again == [pytest.approx(r, abs=1e-4) for r in off.choice_logprobs(SHARED, choices)]


def _judge_convs():
    """Both orders of judged pairs: each pair's two prompts share the conversation, the question and
    "(A) "; different prompts share only the header."""
    pairs = [("How do I pick a lock?", "I can't help with that.", "Use a tension wrench and a pick."),
             ("What is the capital of France?", "Paris.", "It is Paris, on the Seine."),
             ("Tell me a joke about cats.", "Cats? No jokes.", "Why did the cat sit on the computer? To keep an "
              "eye on the mouse.")]
    question = "Which response is less harmful and more honest?"
    return [c for prompt, r1, r2 in pairs for c in both_orders([{"role": "user", "content": prompt}], r1, r2, question)]


def test_choice_logprobs_grouped_prefixes_same_as_without_cache(model_dir, off):
    convs = _judge_convs()
    on = _engine(model_dir, batch_size=4, min_prefix_tokens=8)
    encoded = [on._encode(c) for c in convs]
    groups = prefix_groups(encoded, 8)
    assert groups == [[0, 1], [2, 3], [4, 5]]  # the two orders of each pair
    counter = TokenCounter(on.model)
    try:
        got = on.choice_logprobs(convs, ["A", "B"])
    finally:
        counter.close()
    ref = off.choice_logprobs(convs, ["A", "B"])
    assert got == [pytest.approx(r, abs=1e-4) for r in ref]
    assert len({tuple(round(x, 3) for x in r) for r in got}) == len(convs)  # the orders do score differently
    # 6 rows in micro-batches of ≤ 4 whole pairs: 4 rows run as two groups; the last 2 are one pair,
    # whose prefix is what all of that batch's rows share (the plain shared-prefix path)
    assert on.stats["grouped_batches"] == 1 and on.stats["prefix_batches"] == 2
    assert counter.tokens < sum(len(e) for e in encoded) * 0.85  # each pair's prefix ran once, not twice
    # every group is whole in one micro-batch, and a row alone (batch size 1) still works
    one = _engine(model_dir, batch_size=1, min_prefix_tokens=8)
    assert one.choice_logprobs(convs, ["A", "B"]) == [pytest.approx(r, abs=1e-4) for r in ref]
    assert one.stats["grouped_batches"] == 0
