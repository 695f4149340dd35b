"""Pure training helpers: assistant-only labels, preference tokenization, truncation accounting,
collation, length grouping, the held-out split, configs and LoRA merging. No Ray."""
from __future__ import annotations

import math

import pytest
import torch

from training.config import DPOConfig, RewardConfig, SFTConfig
from training.data import (
    Example,
    Pair,
    collate_pairs,
    collate_sft,
    is_eval,
    length_grouped_batches,
    tokenize_conversation,
    tokenize_preference,
    tokenize_rows,
    tokenize_sft,
)
from training.losses import IGNORE_INDEX
from training.worker import choose_precision, deepspeed_config, lr_lambda
from workflows.core.errors import ConfigError, RowError
from workflows.core.typed import from_dict


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def labeled_runs(ids, labels) -> list[list[int]]:
    """Contiguous runs of labeled tokens."""
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == i, "a label must be the token itself"
            cur.append(i)
    return runs + ([cur] if cur else [])


CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "tell me more"},
        {"role": "assistant", "content": " more, with a leading space\n\n"}]


def test_labels_cover_exactly_the_assistant_turns(tok):
    ids, labels, cut = tokenize_conversation(tok, CONV, 512)
    assert not cut and len(ids) == len(labels)
    # the full sequence is the chat template, untouched
    assert tok.decode(ids) == tok.apply_chat_template(CONV, tokenize=False)
    runs = [tok.decode(r) for r in labeled_runs(ids, labels)]
    # each assistant answer plus its end-of-turn token; the newline after it is not trained
    assert runs == ["Hello! How can I help?<|im_end|>", " more, with a leading space\n\n<|im_end|>"]
    masked = tok.decode([i for i, lab in zip(ids, labels) if lab == IGNORE_INDEX])
    for text in ("Be brief.", "hi there", "tell me more", "<|im_start|>assistant\n"):
        assert text in masked


def test_first_skips_earlier_assistant_turns(tok):
    ids, labels, _ = tokenize_conversation(tok, CONV, 512, first=3)
    assert [tok.decode(r) for r in labeled_runs(ids, labels)] == [" more, with a leading space\n\n<|im_end|>"]


def test_sft_rows_without_an_answer_or_cut_off_are_dropped_and_counted(tok):
    good = {"prompt_id": "a", "messages": CONV[1:3]}
    no_answer = {"prompt_id": "b", "messages": [{"role": "user", "content": "only a question"}]}
    long_prompt = {"prompt_id": "c", "messages": [{"role": "user", "content": "word " * 200},
                                                  {"role": "assistant", "content": "ok"}]}
    long_answer = {"prompt_id": "d", "messages": [{"role": "user", "content": "q"},
                                                  {"role": "assistant", "content": "answer " * 200}]}
    bad = {"prompt_id": "e", "messages": None}
    items, counts = tokenize_rows(tokenize_sft, tok, [good, no_answer, long_prompt, long_answer, bad], 64)
    assert [x.id for x in items] == ["a", "d"]
    assert counts == {"truncated": 1, "dropped:no_assistant_turn": 1, "dropped:response_truncated": 1,
                      "dropped:bad_messages": 1}
    d = items[1]
    assert d.truncated and len(d.input_ids) == 64 and d.labels[-1] != IGNORE_INDEX
    with pytest.raises(RowError) as e:
        tokenize_sft(tok, long_prompt, 64)
    assert e.value.reason == "response_truncated"


def test_preference_rows_label_only_the_answer(tok):
    prompt = [{"role": "user", "content": "Which fruit?"}]
    row = {"pair_id": "p1", "prompt": prompt, "chosen": "a banana",
           "rejected": [{"role": "assistant", "content": "a rock"}], "p_chosen": 0.8}
    pair = tokenize_preference(tok, row, 128)
    assert pair.id == "p1" and pair.p_chosen == pytest.approx(0.8) and not pair.truncated
    assert [tok.decode(r) for r in labeled_runs(pair.chosen_ids, pair.chosen_labels)] == ["a banana<|im_end|>"]
    assert [tok.decode(r) for r in labeled_runs(pair.rejected_ids, pair.rejected_labels)] == ["a rock<|im_end|>"]
    n_prompt = len(tok(tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"])
    assert pair.chosen_ids[:n_prompt] == pair.rejected_ids[:n_prompt]
    assert all(x == IGNORE_INDEX for x in pair.chosen_labels[:n_prompt])
    # a prompt string works too, and a missing p_chosen is a hard label
    hard = tokenize_preference(tok, {"pair_id": "p2", "prompt": "Which fruit?", "chosen": "x", "rejected": "y"}, 128)
    assert hard.p_chosen == 1.0 and hard.chosen_ids[:n_prompt] == pair.chosen_ids[:n_prompt]


def test_preference_truncation_and_bad_rows(tok):
    long = {"pair_id": "p", "prompt": [{"role": "user", "content": "w " * 300}], "chosen": "a", "rejected": "b"}
    empty = {"pair_id": "q", "prompt": "hi", "chosen": "  ", "rejected": "b"}
    bad_p = {"pair_id": "r", "prompt": "hi", "chosen": "a", "rejected": "b", "p_chosen": 1.5}
    items, counts = tokenize_rows(tokenize_preference, tok, [long, empty, bad_p], 64)
    assert items == [] and counts == {"truncated": 0, "dropped:response_truncated": 1,
                                      "dropped:empty_response": 1, "dropped:bad_label": 1}


def test_collate_pads_right():
    a, b = Example("a", [5, 6, 7], [IGNORE_INDEX, 6, 7]), Example("b", [8], [8])
    batch = collate_sft([a, b], pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    p = Pair("p", [1, 2], [IGNORE_INDEX, 2], [1, 3, 4], [IGNORE_INDEX, 3, 4], 0.7, extra={"ref_chosen": -1.0})
    q = Pair("q", [9], [9], [9, 9], [9, 9], 1.0, extra={"ref_chosen": -2.0})
    pb = collate_pairs([p, q], pad_id=0)
    assert pb["input_ids"].tolist() == [[1, 2, 0], [9, 0, 0], [1, 3, 4], [9, 9, 0]]  # chosen rows, then rejected
    assert pb["attention_mask"].sum(1).tolist() == [2, 1, 3, 2]
    assert pb["labels"][1].tolist() == [9, IGNORE_INDEX, IGNORE_INDEX]
    assert pb["p_chosen"].tolist() == pytest.approx([0.7, 1.0]) and pb["ref_chosen"].tolist() == [-1.0, -2.0]


def test_length_grouped_batches_cover_everything_and_cut_padding():
    lengths = [(i * 37) % 101 + 1 for i in range(300)]
    batches = length_grouped_batches(lengths, 8, seed=3)
    assert len(batches) == math.ceil(300 / 8)
    assert sorted(i for b in batches for i in b) == list(range(300))
    assert batches == length_grouped_batches(lengths, 8, seed=3)
    assert batches != length_grouped_batches(lengths, 8, seed=4)

    def padding(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)

    plain = length_grouped_batches(lengths, 8, seed=3, group=False)
    assert len(plain) == len(batches) and padding(batches) < padding(plain) / 3


def test_eval_split_is_stable_and_roughly_the_fraction():
    ids = [f"row-{i}" for i in range(4000)]
    picked = [i for i in ids if is_eval(i, 0.1, seed=0)]
    assert 300 < len(picked) < 500
    assert picked == [i for i in ids if is_eval(i, 0.1, seed=0)]
    assert picked != [i for i in ids if is_eval(i, 0.1, seed=1)]
    assert not any(is_eval(i, 0.0) for i in ids)


@pytest.mark.parametrize("cls, data, where", [
    (SFTConfig, {"zero_stage": 4}, "sft.zero_stage"),
    (SFTConfig, {"micro_batch_size": 0}, "sft.micro_batch_size"),
    (SFTConfig, {"eval_fraction": 1.0}, "sft.eval_fraction"),
    (SFTConfig, {"output": "a/b"}, "sft.output"),
    (SFTConfig, {"lora": {"r": 0}}, "sft.lora.r"),  # an optional nested config reports its inner field
    (SFTConfig, {"precision": "fp16"}, "sft.precision"),
    (RewardConfig, {"margin": -1}, "reward.margin"),
    (DPOConfig, {"beta": 0}, "dpo.beta"),
    (DPOConfig, {"reference": "frozen"}, "dpo.reference"),
    (DPOConfig, {"loss_typ": "ipo"}, "dpo.loss_typ"),
])
def test_configs_reject_bad_values(cls, data, where):
    with pytest.raises(ConfigError) as e:
        from_dict(cls, data, where.split(".")[0])
    assert e.value.where == where


def test_config_defaults_and_derived_settings():
    sft = from_dict(SFTConfig, {"lora": {"r": 8}, "zero_stage": 3, "grad_accum": 2, "max_grad_norm": 0.5})
    assert sft.input == "sft" and sft.output == "sft_model" and sft.lora.alpha == 32.0
    assert from_dict(DPOConfig, {}).input == "preferences" and from_dict(RewardConfig, {}).use_soft_labels
    assert choose_precision(sft, native_bf16=False).short == "fp32"
    assert choose_precision(sft, native_bf16=True).short == "bf16"  # the engines' rule: native bf16 on this CPU
    gpu = from_dict(SFTConfig, {"gpus_per_worker": 1})
    assert choose_precision(gpu, cuda_bf16=True).short == "bf16"
    assert choose_precision(gpu, cuda_bf16=False).short == "fp32"  # no fp16 training without loss scaling
    ds = deepspeed_config(sft, "fp32")
    assert ds["zero_optimization"]["stage"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5 and not ds["bf16"]["enabled"]
    assert ds["optimizer"]["params"]["torch_adam"] is True
    cos = lr_lambda("cosine", warmup=2, total=10)
    assert [cos(0), cos(1), cos(2)] == [0.5, 1.0, 1.0] and cos(6) == pytest.approx(0.5) and cos(9) < 0.05
    assert lr_lambda("linear", 0, 10)(5) == pytest.approx(0.5) and lr_lambda("constant", 0, 10)(9) == 1.0


def test_merge_lora_matches_peft(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from training.core import merge_lora

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # LoRA starts as a no-op; make it do something
    merged = merge_lora({k: v.clone() for k, v in model.state_dict().items()}, scale=8 / 4)
    expected = model.merge_and_unload().state_dict()
    assert sorted(merged) == sorted(expected)
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], rtol=1e-5, atol=1e-6)


def test_exported_model_drops_the_gguf_quantization_setting(tiny_llama_dir, tmp_path):
    """A model trained from a GGUF source is saved as plain tensors; its config.json must not
    send loaders back to a GGUF file, and the directory must reload with the same weights."""
    import json

    from transformers import AutoModelForCausalLM

    from training.core import save_lm

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "model.Q4_1.gguf", "dequantize": False}
    save_lm({k: v.clone() for k, v in model.state_dict().items()}, str(tmp_path), model, SFTConfig())
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    assert hasattr(model.config, "quantization_config")  # the live model's config is left alone
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, p in again.state_dict().items():
        assert torch.equal(p, model.state_dict()[name]), name


def test_dpo_steps_rpo_term_is_the_chosen_answers_nll_per_token(tok, tiny_llama_dir):
    """The DPO job's step with ``rpo_alpha``: its loss exceeds plain DPO's by alpha × the chosen
    answers' mean NLL per *answer* token, the same figure the model's own loss gives."""
    from transformers import AutoModelForCausalLM

    from training.dpo import _make_step

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    rows = [{"prompt": "Say hi", "chosen": "Hello there, friend.", "rejected": "No."},
            {"prompt": "Count", "chosen": "one two", "rejected": "I won't count for you at all."}]
    batch = collate_pairs([tokenize_preference(tok, r, 64) for r in rows], tok.pad_token_id)
    batch.update(ref_chosen=torch.zeros(2), ref_rejected=torch.zeros(2))
    with torch.no_grad():
        plain = _make_step(from_dict(DPOConfig, {}), None)(model, batch)[0]
        rpo = _make_step(from_dict(DPOConfig, {"rpo_alpha": 0.5}), None)(model, batch)[0]
        nll = [model(input_ids=batch["input_ids"][i:i + 1], labels=batch["labels"][i:i + 1]).loss for i in (0, 1)]
    assert float(rpo - plain) == pytest.approx(0.5 * float(sum(nll)) / 2, rel=1e-4)
    with pytest.raises(ConfigError, match="rpo_alpha"):
        from_dict(DPOConfig, {"rpo_alpha": -1})
