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
