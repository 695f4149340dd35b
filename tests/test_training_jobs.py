"""SFT, reward-model and DPO jobs end to end on a local Ray cluster: Ray Train with 2 workers
(gloo), DeepSpeed ZeRO 0/2/3 in fp32 on CPU, a tiny random Llama, tiny learnable datasets.

Each job must lower its loss, change the parameters and export a directory that reloads and
gives the same outputs as the model had before saving; an SFT run whose rank 0 dies mid-run
must resume from its checkpoint and end with the same losses as an uninterrupted run; the
reward model must rank chosen above rejected on held-out pairs of a separable task."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from training import dpo, reward, sft
from training.config import DPOConfig, RewardConfig, SFTConfig
from training.data import collate_pairs, collate_sft, is_eval, tokenize_preference, tokenize_sft
from training.losses import sequence_logprobs
from workflows.core.errors import DataError
from workflows.core.stage import StageContext, read_success
from workflows.core.typed import from_dict

WORKERS = {"num_workers": 2, "cpus_per_worker": 0.5, "max_length": 48, "micro_batch_size": 4, "lr": 2e-3,
           "warmup_steps": 2, "epochs": 20}
FRUITS = ["apple", "cherry", "grape", "lemon", "mango", "peach", "plum", "kiwi"]


def write(path: Path, rows: list[dict]) -> str:
    path.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), path / "part-00000.parquet")
    return str(path)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> str:
    rows = [{"prompt_id": f"s{i}", "messages": [{"role": "user", "content": f"Name fruit number {i % 4}."},
                                                {"role": "assistant", "content": f"{FRUITS[i % 4]} {FRUITS[i % 4]}"}]}
            for i in range(40)]
    rows.append({"prompt_id": "too-long", "messages": [{"role": "user", "content": "word " * 80},
                                                       {"role": "assistant", "content": "ok"}]})
    rows.append({"prompt_id": "no-answer", "messages": [{"role": "user", "content": "a question only"}]})
    return write(tmp_path_factory.mktemp("sft") / "sft", rows)


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory) -> str:
    """Chosen answers contain the marker word "banana", rejected ones do not."""
    rng = random.Random(0)
    rows = []
    for i in range(96):
        a, b = rng.sample(FRUITS, 2)
        rows.append({"pair_id": f"x{i}", "prompt": [{"role": "user", "content": f"Name two fruits ({i})."}],
                     "chosen": [{"role": "assistant", "content": f"{a} banana {b}"}],
                     "rejected": [{"role": "assistant", "content": f"{a} {b}"}], "p_chosen": 0.9})
    return write(tmp_path_factory.mktemp("prefs") / "preferences", rows)


def train(module, cls, tmp_path: Path, name: str, **cfg) -> tuple[dict, Path]:
    config = from_dict(cls, {**WORKERS, **cfg}, name)
    info = module.run(config, StageContext(str(tmp_path / "run"), name, seed=0))
    stage_dir = tmp_path / "run" / name
    assert read_success(str(stage_dir)) == json.loads(json.dumps(info))
    return info, stage_dir


def losses(stage_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def assert_learned(stage_dir: Path, info: dict, steps: int) -> None:
    curve = losses(stage_dir)
    assert len(curve) == steps == info["steps"] and all(map(torch.isfinite, torch.tensor(curve)))
    assert sum(curve[-4:]) / 4 < 0.85 * sum(curve[:2]) / 2, curve
    assert (stage_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def changed(model_dir: Path, start_dir: Path) -> float:
    """Fraction of the starting model's tensors that training changed."""
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(start_dir).state_dict()
    return sum(not torch.equal(a[k], b[k]) for k in b) / len(b)


def assert_ready_for_inference(model_dir: Path) -> None:
    """Exported for inference whatever training set: the KV cache is on in config.json and
    generation_config.json, and a plain ``generate`` with the saved settings uses it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("config.json", "generation_config.json"):
        assert json.loads((model_dir / name).read_text())["use_cache"] is True, name
    model, tok = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    out = model.generate(**tok("Name a fruit.", return_tensors="pt"), max_new_tokens=3, do_sample=False,
                         return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    assert out.past_key_values is not None and out.past_key_values.get_seq_length() > 0


def rows_by_id(uri: str, col: str) -> dict[str, dict]:
    return {r[col]: r for r in pq.read_table(uri).to_pylist()}


@pytest.fixture(scope="module")
def sft_run(ray_local, tiny_llama_dir, sft_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft-run")
    return train(sft, SFTConfig, tmp, "sft", model=str(tiny_llama_dir), input=sft_data, zero_stage=2, lr=5e-3,
                 max_steps=16, checkpoint_every=6, eval_fraction=0.1)


def test_sft_zero2_learns_and_exports_a_reloadable_model(sft_run, sft_data, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info, stage_dir = sft_run
    assert_learned(stage_dir, info, 16)
    assert info["errors_by_reason"] == {"response_truncated": 1, "no_assistant_turn": 1}  # counted, not lost
    rows = info["rows"]
    assert rows["input"] == 42 and rows["train"] + rows["eval"] == 42 and rows["trained"] > 30
    assert info["eval"]["eval_loss"] < 0.8 * losses(stage_dir)[0]
    model_dir = Path(info["model_dir"])
    assert model_dir == stage_dir / "sft_model" and changed(model_dir, tiny_llama_dir) > 0.9
    assert_ready_for_inference(model_dir)
    assert info["training"]["precision"] == "fp32"  # auto on a CPU without native bf16 (faked: conftest)
    assert "CAI_RAY_CPU_BF16=0" in info["training"]["precision_reason"]
    model, tok = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    summary = info["training"]
    src = rows_by_id(sft_data, "prompt_id")
    batch = collate_sft([tokenize_sft(tok, src[i], 48) for i in summary["probe_ids"]], tok.pad_token_id)
    with torch.no_grad():
        logps = sequence_logprobs(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                  batch["labels"])
    torch.testing.assert_close(logps, torch.tensor(summary["probe"]), rtol=1e-4, atol=1e-4)


def test_sft_resumes_from_checkpoint_after_a_worker_failure(sft_run, ray_local, tiny_llama_dir, sft_data, tmp_path):
    ref_info, ref_dir = sft_run
    info, stage_dir = train(sft, SFTConfig, tmp_path, "sft", model=str(tiny_llama_dir), input=sft_data,
                            zero_stage=2, lr=5e-3, max_steps=16, checkpoint_every=6, eval_fraction=0.1,
                            fail_at_step=9, max_failures=1)
    assert (stage_dir / "_fault_injected").is_file()
    assert info["training"]["resumes"] == 1 and info["training"]["resumed_from_steps"] == [6]
    torch.testing.assert_close(torch.tensor(losses(stage_dir)), torch.tensor(losses(ref_dir)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(info["training"]["probe"]), torch.tensor(ref_info["training"]["probe"]),
                               rtol=1e-4, atol=1e-4)


def test_reward_model_zero3_ranks_held_out_pairs(ray_local, tiny_llama_dir, pref_data, tmp_path):
    from actors.models import load_tokenizer

    info, stage_dir = train(reward, RewardConfig, tmp_path, "reward", model=str(tiny_llama_dir), input=pref_data,
                            zero_stage=3, max_steps=16, checkpoint_every=0, eval_fraction=0.25)
    assert_learned(stage_dir, info, 16)
    assert info["eval"]["eval_accuracy"] >= 0.9 and info["rows"]["eval"] >= 15
    summary = info["training"]
    model_dir = stage_dir / "reward_model"
    assert changed(model_dir, tiny_llama_dir) > 0.5
    assert_ready_for_inference(model_dir)
    model, tok = reward.load_reward_model(str(model_dir)), load_tokenizer(str(model_dir))
    assert model.normalize and model.mean == pytest.approx(summary["reward_mean"]) and model.std > 0
    src = rows_by_id(pref_data, "pair_id")
    probe = [src[i]["prompt"] + src[i]["chosen"] for i in summary["probe_ids"]]
    probe += [src[i]["prompt"] + src[i]["rejected"] for i in summary["probe_ids"]]
    torch.testing.assert_close(torch.tensor(reward.score(model, tok, probe, normalize=False)),
                               torch.tensor(summary["probe"]), rtol=1e-4, atol=1e-4)
    held_out = [r for i, r in src.items() if is_eval(i, 0.25, 0)]
    chosen = reward.score(model, tok, [r["prompt"] + r["chosen"] for r in held_out])
    rejected = reward.score(model, tok, [r["prompt"] + r["rejected"] for r in held_out])
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(held_out) >= 0.9


def test_dpo_zero0_learns_and_exports_a_reloadable_model(ray_local, tiny_llama_dir, pref_data, tmp_path, monkeypatch):
    """Also the way of big inputs: read by Ray Data's tasks and split across workers."""
    import signal

    from training import inputs

    monkeypatch.setattr(inputs, "IN_MEMORY_INPUT_BYTES", 0)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    before = signal.getsignal(signal.SIGINT)
    info, stage_dir = train(dpo, DPOConfig, tmp_path, "dpo", model=str(tiny_llama_dir), input=pref_data,
                            zero_stage=0, max_steps=16, checkpoint_every=0, eval_fraction=0.25, beta=0.5)
    # Ray Train's own Ctrl-C handler is gone with the job: Ctrl-C in a later stage still stops the run
    assert signal.getsignal(signal.SIGINT) is before
    curve = losses(stage_dir)
    assert curve[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the first step
    assert_learned(stage_dir, info, 16)
    assert info["eval"]["eval_reward_accuracy"] >= 0.9 and info["eval"]["eval_reward_margin"] > 0
    model_dir = stage_dir / "dpo_model"
    assert changed(model_dir, tiny_llama_dir) > 0.9
    assert_ready_for_inference(model_dir)
    model, tok = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    src, summary = rows_by_id(pref_data, "pair_id"), info["training"]
    batch = collate_pairs([tokenize_preference(tok, src[i], 48) for i in summary["probe_ids"]], tok.pad_token_id)
    with torch.no_grad():
        logps = sequence_logprobs(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                  batch["labels"])
    torch.testing.assert_close(logps, torch.tensor(summary["probe"]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_bf16_training_exports_the_fp32_master_weights(ray_local, tiny_llama_dir, sft_data, tmp_path, zero_stage):
    """precision: bf16 (what ``auto`` picks on CPUs with native bf16): the model computes in bf16,
    the optimizer keeps fp32 master weights, and the export is those masters — not the bf16
    copies, which would drop every update below bf16's resolution."""
    from safetensors.torch import load_file

    info, stage_dir = train(sft, SFTConfig, tmp_path, "sft", model=str(tiny_llama_dir), input=sft_data,
                            zero_stage=zero_stage, lr=5e-3, max_steps=8, checkpoint_every=0, eval_fraction=0.0,
                            precision="bf16")
    assert info["training"]["precision"] == "bf16" and info["training"]["precision_reason"].startswith("as configured")
    assert_learned(stage_dir, info, 8)
    weights = load_file(stage_dir / "sft_model" / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}
    off_grid = sum(int((w != w.bfloat16().float()).sum()) for w in weights.values())
    assert off_grid > 0.5 * sum(w.numel() for w in weights.values())  # full fp32 precision, not bf16 copies
    assert changed(stage_dir / "sft_model", tiny_llama_dir) > 0.9
    assert_ready_for_inference(stage_dir / "sft_model")


def test_unusable_input_fails_before_training(ray_local, tiny_llama_dir, pref_data, tmp_path):
    with pytest.raises(DataError, match="pair_id"):
        train(reward, RewardConfig, tmp_path, "reward", model=str(tiny_llama_dir),
              input=write(tmp_path / "no_ids", [{"prompt": "q", "chosen": "a", "rejected": "b"}]))
    with pytest.raises(DataError, match="one optimizer step needs"):
        train(dpo, DPOConfig, tmp_path, "dpo", model=str(tiny_llama_dir), input=pref_data, micro_batch_size=64)


def test_workers_leave_a_cpu_for_the_data_read(ray_local):
    from training.runner import worker_cpus

    assert worker_cpus(from_dict(SFTConfig, {"num_workers": 2, "cpus_per_worker": 1.0})) == pytest.approx(0.5)
    assert worker_cpus(from_dict(SFTConfig, {"num_workers": 1, "cpus_per_worker": 1.0})) == 1.0
