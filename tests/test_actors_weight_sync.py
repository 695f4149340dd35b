"""RL weight sync into an engine: after ``load_weights`` the engine generates exactly what the
trainer's model generates, later rollouts carry the new policy version, and a rollout from an
older version is refused."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.base import EngineError, SamplingParams, check_policy_version
from actors.config import EngineConfig
from actors.hf_engine import TransformersEngine

pytestmark = pytest.mark.usefixtures("restore_torch_threads")
CONV = [{"role": "user", "content": "Name three colours of the rainbow."}]
GREEDY = SamplingParams(max_new_tokens=8)


def trainer_greedy(model, tok) -> list[int]:
    ids = tok.apply_chat_template(CONV, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             eos_token_id=[-1], pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_pushed_weights_generate_like_the_trainer_and_old_rollouts_are_refused(tiny_llama_dir, varied_llama_dir):
    engine = TransformersEngine(EngineConfig(model=str(tiny_llama_dir), dtype="float32", prefix_cache=True))
    before = engine.generate([CONV], GREEDY)[0]
    assert before.extra["policy_version"] == 0
    trainer = AutoModelForCausalLM.from_pretrained(varied_llama_dir, dtype=torch.float32)  # "the updated policy"
    engine.load_weights(trainer.state_dict(), version=1)
    after = engine.generate([CONV], GREEDY)[0]
    assert after.extra["policy_version"] == 1
    want = trainer_greedy(trainer, AutoTokenizer.from_pretrained(varied_llama_dir))
    assert after.extra["token_ids"] == want[:len(after.extra["token_ids"])] and after.extra["token_ids"]
    assert after.extra["token_ids"] != before.extra["token_ids"]
    logits = engine.model(torch.tensor([want]), use_cache=False).logits
    ref = trainer(torch.tensor([want]), use_cache=False).logits
    assert torch.allclose(logits, ref, atol=1e-5)  # the same log-probs as the trainer's model
    check_policy_version([after], 1)
    with pytest.raises(EngineError, match=r"stale rollout: generated with policy version\(s\) \[0\], the trainer is at 1"):
        check_policy_version([before, after], 1)
    with pytest.raises(EngineError, match="not newer"):
        engine.load_weights(trainer.state_dict(), version=1)
    with pytest.raises(EngineError, match="do not fit"):
        engine.load_weights({"lm_head.weight": torch.zeros(3, 3)}, version=2)
    assert engine.policy_version == 1
