"""The OpenAI protocol pieces of `cai serve`, without a server: validation and streamed text."""
from __future__ import annotations

import pytest

from cluster.serve import protocol as oa

OK = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_a_valid_request_becomes_a_conversation_and_sampling_params():
    req = oa.parse_chat({**OK, "max_tokens": 7, "temperature": 0, "stop": "END", "seed": 3,
                         "messages": [{"role": "developer", "content": "be brief"},
                                      {"role": "user", "content": [{"type": "text", "text": "h"},
                                                                   {"type": "text", "text": "i"}]}]}, "m", 100)
    assert req.conversation == ({"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"})
    assert (req.params.max_new_tokens, req.params.temperature, req.params.stop, req.params.seed) == (7, 0.0, ("END",), 3)
    assert oa.parse_chat(OK, "m", 100).params.max_new_tokens == oa.DEFAULT_MAX_TOKENS


@pytest.mark.parametrize("body,param,status", [
    ({**OK, "messages": []}, "messages", 400),
    ({**OK, "messages": "hi"}, "messages", 400),
    ({**OK, "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", 400),
    ({**OK, "messages": [{"role": "user"}]}, "messages[0].content", 400),
    ({**OK, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content", 400),
    ({**OK, "messages": [{"role": "assistant", "content": "x"}]}, "messages", 400),
    ({**OK, "max_tokens": 0}, "max_tokens", 400),
    ({**OK, "max_tokens": -5}, "max_tokens", 400),
    ({**OK, "max_completion_tokens": 1.5}, "max_completion_tokens", 400),
    ({**OK, "temperature": 3}, "temperature", 400),
    ({**OK, "top_p": 0}, "top_p", 400),
    ({**OK, "n": 2}, "n", 400),
    ({**OK, "stop": ["a", "b", "c", "d", "e"]}, "stop", 400),
    ({**OK, "stream": "yes"}, "stream", 400),
    ({**OK, "model": "gpt-9"}, "model", 404),
    ({**OK, "model": ["m"]}, "model", 400),
    ({**OK, "stream": True, "stream_options": "x"}, "stream_options", 400),
    ({**OK, "stream_options": {"include_usage": 1}}, "stream_options.include_usage", 400),
    ({**OK, "seed": 2**64}, "seed", 400),
    ({**OK, "seed": 2**63}, "seed", 400),
    ({**OK, "seed": True}, "seed", 400),
    ({**OK, "stop": "x" * (oa.MAX_STOP_CHARS + 1)}, "stop", 400),
    ({**OK, "stop": 0}, "stop", 400),
    ({**OK, "stop": [None]}, "stop", 400),
    ({**OK, "n": True}, "n", 400),
    ({**OK, "n": 1.0}, "n", 400),
    ({**OK, "max_tokens": True}, "max_tokens", 400),
    ({**OK, "temperature": False}, "temperature", 400),
    ({**OK, "frequency_penalty": -2.5}, "frequency_penalty", 400),
    ({**OK, "logprobs": True}, "logprobs", 400),
    ({**OK, "top_logprobs": 2}, "top_logprobs", 400),
    ({**OK, "messages": [{"role": 7, "content": "x"}]}, "messages[0].role", 400),
    ({**OK, "messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content", 400),
    ({**OK, "messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}]}, "messages[0].content",
     400),
    ({**OK, "messages": [{"role": "user", "content": "x"}] * (oa.DEFAULT_MAX_MESSAGES + 1)}, "messages", 400),
    ({**OK, "messages": [{"role": "user", "content": "x" * (oa.PROMPT_CHARS_PER_TOKEN * 100 + 1)}]}, "messages", 400),
])
def test_bad_requests_name_the_field(body, param, status):
    with pytest.raises(oa.RequestError) as e:
        oa.parse_chat(body, "m", 100)
    assert e.value.param == param and e.value.status == status
    assert e.value.body()["error"]["param"] == param and e.value.body()["error"]["message"]


def test_a_prompt_over_the_model_length_is_400():
    req = oa.parse_chat({**OK, "max_tokens": 50}, "m", 100)
    oa.check_length(50, req, 100)
    with pytest.raises(oa.RequestError, match="maximum context length is 100") as e:
        oa.check_length(51, req, 100)
    assert e.value.code == "context_length_exceeded"


def _decode(ids):
    return "".join(chr(i) for i in ids)


def test_streamed_deltas_add_up_to_the_final_text():
    d = oa.TextDeltas(_decode, stop_ids=[0])
    pieces = [d.push([ord(c)]) for c in "  Hello there "]
    pieces.append(d.push([0, ord("x")]))  # end of turn; what follows is padding
    pieces.append(d.finish("Hello there"))
    assert "".join(pieces) == "Hello there" and pieces.count("") < len(pieces) - 2


def test_a_stop_string_is_never_streamed():
    d = oa.TextDeltas(_decode, stop_ids=[], stop=("STOP",))
    out = "".join(d.push([ord(c)]) for c in "ab STOP cd")
    assert "S" not in out and out + d.finish("ab") == "ab"


def test_limits_bound_messages_and_characters_before_tokenizing():
    body = {**OK, "messages": [{"role": "user", "content": "abc"}, {"role": "user", "content": "de"}]}
    req = oa.parse_chat(body, "m", 100, oa.Limits(max_messages=2, max_prompt_chars=5))
    assert req.conversation[1]["content"] == "de"
    for limits, match in [(oa.Limits(max_messages=1), "limit of 1"), (oa.Limits(max_prompt_chars=4), "5 characters")]:
        with pytest.raises(oa.RequestError, match=match) as e:
            oa.parse_chat(body, "m", 100, limits)
        assert e.value.param == "messages"
    assert oa.Limits().prompt_chars(100) == oa.PROMPT_CHARS_PER_TOKEN * 100


def test_valid_edge_values_are_accepted():
    req = oa.parse_chat({**OK, "seed": -2**63, "stop": ["a" * oa.MAX_STOP_CHARS] * oa.MAX_STOP, "n": 1,
                         "stream": None, "stream_options": None, "logprobs": False, "top_logprobs": 0,
                         "max_completion_tokens": 100, "max_tokens": None, "frequency_penalty": 2, "user": "u",
                         "tools": []}, "m", 100)
    assert (req.params.seed, len(req.params.stop), req.params.max_new_tokens, req.stream) == (-2**63, 4, 100, False)
    req = oa.parse_chat({**OK, "seed": 2**63 - 1, "stream": True, "stream_options": {"include_usage": True}}, "m", 100)
    assert req.params.seed == 2**63 - 1 and req.include_usage


def test_an_error_message_never_repeats_a_huge_value():
    with pytest.raises(oa.RequestError) as e:
        oa.parse_chat({**OK, "temperature": "9" * 100_000}, "m", 100)
    assert e.value.param == "temperature" and len(str(e.value)) < 200


@pytest.mark.parametrize("raw,message", [
    (b"{", "not valid JSON"), (b"", "not valid JSON"), (b"\xff", "not valid JSON"), (b'{"a": NaN}', "not valid JSON"),
    (b'{"a": Infinity}', "not valid JSON"), (b"1" * 5000, "not valid JSON"), (b"[" * 100_000, "nests too deeply"),
])
def test_a_body_that_is_not_json_is_a_400(raw, message):
    with pytest.raises(oa.RequestError, match=message) as e:
        oa.parse_json(raw)
    assert e.value.status == 400 and e.value.code == "invalid_json"
    assert oa.parse_json(b'{"a": [1, 2.5, "x"]}') == {"a": [1, 2.5, "x"]}


@pytest.mark.parametrize("value,ok", [
    ("application/json", True), ("application/json; charset=utf-8", True), ("Application/JSON", True),
    (None, False), ("", False), ("text/plain", False), ("application/jsonl", False), ("json", False),
])
def test_the_body_must_be_declared_json(value, ok):
    if ok:
        oa.check_content_type(value)
        return
    with pytest.raises(oa.RequestError) as e:
        oa.check_content_type(value)
    assert (e.value.status, e.value.param) == (415, "Content-Type")
