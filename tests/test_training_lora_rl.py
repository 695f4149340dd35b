"""LoRA in RL: a weight sync sends the adapters alone, the rollout engine merges them into the
starting weights it read itself and then decodes exactly as the trainer's model; a GRPO run with
LoRA learns the toy reward and exports a plain Hugging Face model."""
from __future__ import annotations

from pathlib import Path

import torch

from test_training_ppo import history, mean, ppo_config
from workflows.core.stage import StageContext


def peft_model(model_dir, r: int = 4):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj", "o_proj"]))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: the adapters would change nothing
            torch.nn.init.normal_(p, std=0.5)
    return model


def test_merged_adapters_equal_peft_own_merge(varied_llama_dir):
    from training.core import is_adapter, merge_adapters, merge_lora

    model = peft_model(varied_llama_dir)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    want = model.merge_and_unload().state_dict()
    merged = merge_lora(sd, 2.0)
    assert set(merged) == set(want) and all(torch.equal(merged[k], want[k]) for k in want)
    base = {k.replace("base_model.model.", "", 1).replace(".base_layer.", "."): v for k, v in sd.items()
            if not is_adapter(k)}
    changed = merge_adapters(base, {k: v for k, v in sd.items() if is_adapter(k)}, 2.0)
    assert sorted(changed) == sorted(k for k in want if k.endswith(("q_proj.weight", "v_proj.weight", "o_proj.weight")))


def test_an_adapter_sync_moves_only_adapters_and_the_engine_decodes_as_the_trainer(varied_llama_dir):
    from actors import EngineConfig, SamplingParams
    from actors.base import check_policy_version
    from actors.models import chat_prompt_ids, load_tokenizer
    from training.core import is_adapter
    from training.rollouts import RolloutActor

    model = peft_model(varied_llama_dir)
    adapters = {k: v.detach().clone() for k, v in model.state_dict().items() if is_adapter(k)}
    full = sum(v.numel() * v.element_size() for k, v in model.get_base_model().state_dict().items())
    sent = sum(v.numel() * v.element_size() for v in adapters.values())
    assert sent < full / 5  # what the object store carries
    actor = RolloutActor(EngineConfig(backend="transformers", model=str(varied_llama_dir), dtype="float32",
                                      device="cpu", batch_size=4))
    conv = [[{"role": "user", "content": f"Question {i}: what comes next?"}] for i in range(3)]
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    before = [g.extra["token_ids"] for g in actor.generate(conv, greedy)]
    actor.receive(adapters)
    assert actor.load_adapter(1, 2.0) == 1
    after = [g.extra["token_ids"] for g in actor.generate(conv, greedy)]
    tok, merged = load_tokenizer(str(varied_llama_dir)), model.merge_and_unload().eval()
    want = []
    for c in conv:
        ids = torch.tensor([chat_prompt_ids(tok, c)])
        out = merged.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              pad_token_id=tok.pad_token_id)
        want.append(out[0, ids.shape[1]:].tolist())
    assert all(after) and after == [w[:len(a)] for w, a in zip(want, after)] and after != before
    check_policy_version(actor.generate(conv, greedy), 1)  # later rollouts carry the new version


def test_grpo_with_lora_learns_syncs_adapters_only_and_exports_a_plain_model(tmp_path, peaked_llama, prompts_dir,
                                                                             ray_local):
    from transformers import AutoModelForCausalLM

    from training import ppo

    cfg = ppo_config(peaked_llama, prompts_dir, "grpo", lr=8e-4,
                     lora={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "o_proj"]})
    info = ppo.run_grpo(cfg, StageContext(str(tmp_path), "grpo", seed=0, config_hash="h"))
    h = history(tmp_path / "grpo")
    assert mean([r["score"] for r in h[-3:]]) > mean([r["score"] for r in h[:3]]) + 0.1, [round(r["score"], 3) for r in h]
    full_mb = info["training"]["full_mb"]
    assert all(0 < r["sync_mb"] < full_mb / 5 for r in h), (full_mb, [r["sync_mb"] for r in h])
    summary = (tmp_path / "grpo" / "summary.md").read_text()
    assert "weight sync: the LoRA adapters only" in summary
    model = AutoModelForCausalLM.from_pretrained(Path(info["model_dir"]))  # plain transformers
    start = AutoModelForCausalLM.from_pretrained(peaked_llama)
    assert not any("lora" in n for n, _ in model.named_parameters())
    q = "model.layers.0.self_attn.q_proj.weight"  # the adapters are merged into the weights they target
    assert not torch.equal(model.state_dict()[q], start.state_dict()[q])
    up = "model.layers.0.mlp.up_proj.weight"  # and nothing else moved
    assert torch.equal(model.state_dict()[up], start.state_dict()[up])
