"""Scripted engines for fast, exact tests of stage logic (no model, no Ray)."""
from __future__ import annotations

from actors.base import Generation


class ScriptedEngine:
    """Answers by rule so tests can check exactly what the stage sent:
    - a conversation whose last user turn contains ``FAIL`` fails with ``fail_reason``;
    - the initial answer echoes the prompt, a critique/revision names the request it answers."""

    name = "scripted"

    def __init__(self, fail_reason: str = "boom: scripted failure", empty_on: str | None = None):
        self.calls: list[list[list[dict]]] = []
        self.params: list = []  # the SamplingParams of each call
        self.fail_reason, self.empty_on = fail_reason, empty_on

    def generate(self, conversations, params):
        self.calls.append(conversations)
        self.params.append(params)
        out = []
        for conv in conversations:
            last = conv[-1]["content"]
            if "FAIL" in last:
                out.append(Generation.failed(self.fail_reason))
            elif self.empty_on and self.empty_on in last:
                out.append(Generation(text="   ", completion_tokens=1))
            else:
                n_assist = sum(m["role"] == "assistant" for m in conv)
                out.append(Generation(text=f"reply#{n_assist} to [{last[:40]}]", prompt_tokens=len(conv),
                                      completion_tokens=5))
        return out

    def choice_logprobs(self, conversations, choices):
        return [[-0.5] * len(choices) for _ in conversations]


def option(conv: list[dict], letter: str) -> str:
    """The text shown as option (A) or (B) in a preference-judge conversation."""
    body = next(m["content"] for m in conv if "Options:\n(A) " in m["content"])
    a, b = body.split("Options:\n(A) ", 1)[1].split("\n(B) ", 1)
    return a if letter == "A" else b.split("\n\n", 1)[0]


def fail_batches_holding(engine, n_tokens: int, monkeypatch) -> None:
    """Make ``engine.model.generate`` raise ``RuntimeError("boom")`` on any batch holding a row
    of ``n_tokens`` prompt tokens (count them with ``engine.count_tokens``); others run normally."""
    real = engine.model.generate

    def flaky(input_ids, attention_mask, **kw):
        if bool((attention_mask.sum(-1) == n_tokens).any()):
            raise RuntimeError("boom")
        return real(input_ids=input_ids, attention_mask=attention_mask, **kw)

    monkeypatch.setattr(engine.model, "generate", flaky)


# ---------------------------------------------------------------- evaluate: policies and judges by name

def _red_team_prompts() -> set[str]:
    import json
    from pathlib import Path

    import workflows.evaluate as ev

    path = Path(ev.__file__).parent / "data" / "eval_red_team.jsonl"
    return {json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()}


COMPLY, REFUSE = "Sure, here is exactly how to do it, step by step: first", "I can't help with that."


class ScriptedPolicy:
    """``complier`` answers everything; ``refuser`` refuses everything; ``good`` refuses the
    shipped red-team prompts and answers the rest. A prompt containing FAIL fails."""

    def __init__(self, behaviour: str):
        self.name, self.behaviour, self.red = f"scripted:{behaviour}", behaviour, _red_team_prompts()

    def generate(self, conversations, params):
        out = []
        for conv in conversations:
            last = conv[-1]["content"]
            refuse = self.behaviour == "refuser" or (self.behaviour == "good" and last in self.red)
            out.append(Generation.failed("boom: scripted failure") if "FAIL" in last else
                       Generation(text=REFUSE if refuse else f"{COMPLY} ({last[:30]})", completion_tokens=9))
        return out

    def choice_logprobs(self, conversations, choices):
        raise AssertionError("a policy is never asked to judge")


class ScriptedJudge:
    """``fair``: says an answer helps with harm when it complies with a red-team prompt, classes
    refusals by their text, and prefers the refusal on red-team prompts and the compliant answer
    elsewhere — whatever the option order. ``always-a``: P(A) = 0.9 for everything."""

    def __init__(self, behaviour: str):
        self.name, self.behaviour, self.red = f"judge:{behaviour}", behaviour, _red_team_prompts()

    def generate(self, conversations, params):
        raise AssertionError("the evaluation judge only reads choice log-probs")

    def _pick(self, text: str, choices) -> int:
        body, opts = text.split("\n\nOptions:\n", 1)
        options = [o[4:] for o in opts.split("\n\n")[0].split("\n")]
        red = any(p in body for p in self.red)
        if "meaningful help" in body:  # harmful compliance: yes when a red-team request got compliance
            answer = body.split("Assistant: ", 1)[1]
            want = "Yes" if red and answer.startswith("Sure") else "No"
            return next(i for i, o in enumerate(options) if o.startswith(want))
        if "How does the assistant" in body:
            answer = body.split("Assistant: ", 1)[1]
            want = "It fully refuses" if answer.startswith("I can't") else "It fully complies"
            return next(i for i, o in enumerate(options) if o.startswith(want))
        refusal = [o.startswith("I can't") for o in options]
        return refusal.index(red) if refusal.count(red) else 0

    def choice_logprobs(self, conversations, choices):
        import math

        rows = []
        for conv in conversations:
            i = 0 if self.behaviour == "always-a" else self._pick(conv[-1]["content"], choices)
            rows.append([math.log(0.9) if j == i else math.log(0.1 / (len(choices) - 1)) for j in range(len(choices))])
        return rows


def eval_engine(cfg):
    """``engine_factory`` for evaluate tests: the model name picks the scripted behaviour."""
    name = str(cfg.model).rsplit("/", 1)[-1]
    return ScriptedJudge(name.split("judge-", 1)[1]) if name.startswith("judge-") else ScriptedPolicy(name)


# ---------------------------------------------------------------- RL: a judge of the toy task

class ToyJudge:
    """The PPO tests' toy reward as a pairwise judge: it reads the two options of a judge
    conversation, re-tokenizes them with the policy's tokenizer, and prefers the one with more
    tokens from the lower half of the vocabulary — P(A) = sigmoid(8 × the difference of the shares),
    whatever the order they are shown in. Asked about one answer (a pointwise judgment: the options
    are the two verdicts), P("meets") = sigmoid(8 × (its share − 0.5)), in either order."""

    name = "judge:toy"

    def __init__(self, model_dir: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.calls = 0

    def share(self, text: str) -> float:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return sum(t < len(self.tok) // 2 for t in ids) / max(1, len(ids))

    def generate(self, conversations, params):
        raise AssertionError("the judge only reads choice log-probs")

    def choice_logprobs(self, conversations, choices):
        import math

        assert list(choices) == ["A", "B"]
        rows = []
        for conv in conversations:
            self.calls += 1
            a = option(conv, "A")
            if a.startswith("The response "):  # pointwise: the answer is the conversation's last turn
                said = conv[-1]["content"].split("\nJudge the assistant's last response on its own", 1)[0]
                d = self.share(said.rsplit("\n\n", 1)[0].rsplit("Assistant: ", 1)[1]) - 0.5
                d = d if "meets" in a else -d
            else:
                d = self.share(a) - self.share(option(conv, "B"))
            p = 1.0 / (1.0 + math.exp(-8.0 * d))
            rows.append([math.log(max(p, 1e-12)), math.log(max(1.0 - p, 1e-12))])
        return rows


def toy_judge(cfg):
    """``judge.engine_factory`` of the RL tests: ``ToyJudge`` over ``judge.engine.model``'s tokenizer."""
    return ToyJudge(str(cfg.model))
