"""The toy GRPO and online DPO of the CPU tests, on a CUDA GPU: one Ray Train worker and the
transformers rollout actor share the GPU (half each), the policy in bfloat16 as `precision: auto`
picks there. Learning is checked as on the CPU (the toy score goes up, the KL stays bounded).
Skipped where no CUDA GPU is visible."""
from __future__ import annotations

import pytest

from test_training_online_dpo import online_config
from test_training_ppo import KL_BOUND, history, mean, ppo_config
from workflows.core.stage import StageContext

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")

ON_GPU = {"num_workers": 1, "gpus_per_worker": 0.5, "zero_stage": 2,
          "rollout": {"batch_size": 16, "backend": "transformers", "device": "cuda", "num_gpus": 0.5}}


def test_grpo_learns_on_cuda(tmp_path, peaked_llama, prompts_dir, ray_local):
    from training import ppo

    cfg = ppo_config(peaked_llama, prompts_dir, "grpo", **ON_GPU)
    info = ppo.run_grpo(cfg, StageContext(str(tmp_path), "grpo", seed=0, config_hash="h"))
    h = history(tmp_path / "grpo")
    print(f"grpo on {torch.cuda.get_device_name(0)}: score {h[0]['score']:.3f} → {h[-1]['score']:.3f}, "
          f"{mean([r['seconds'] for r in h]):.2f} s per iteration, {info['training']['precision']}")
    assert mean([r["score"] for r in h[-3:]]) > mean([r["score"] for r in h[:3]]) + 0.1, [round(r["score"], 3) for r in h]
    assert max(r["kl"] for r in h) < KL_BOUND


def test_online_dpo_learns_on_cuda(tmp_path, peaked_llama, prompts_dir, ray_local):
    from training import online_dpo

    cfg = online_config(peaked_llama, prompts_dir, **ON_GPU)
    online_dpo.run(cfg, StageContext(str(tmp_path), "online_dpo", seed=0, config_hash="h"))
    h = history(tmp_path / "online_dpo")
    print(f"online DPO on {torch.cuda.get_device_name(0)}: score {h[0]['score']:.3f} → {h[-1]['score']:.3f}, "
          f"{mean([r['seconds'] for r in h]):.2f} s per round")
    assert mean([r["score"] for r in h[-3:]]) > mean([r["score"] for r in h[:3]]) + 0.1, [round(r["score"], 3) for r in h]
    assert max(abs(r.get("kl", 0.0)) for r in h) < 12.0
