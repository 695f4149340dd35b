"""Reward-model job: a causal-LM backbone plus a scalar head, trained with the Bradley–Terry
loss on the ``preferences`` dataset (soft labels from ``p_chosen`` or hard ones, optional
margin), on Ray Train + DeepSpeed (``training.core``).

The reward of a sequence is the head applied to the final hidden state of its last real
(non-pad) token. The exported directory is a Hugging Face causal-LM directory (the backbone,
loadable by ``AutoModelForCausalLM``; its LM head is kept frozen during training) plus
``reward_head.pt`` (the head's weight and bias) and ``reward_head.json`` (hidden size, and the
mean/std of the rewards over the training set, used to normalise scores for PPO).

Use it with ``load_reward_model(dir)`` and ``score(model, tokenizer, conversations)``.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from actors.models import load_causal_lm, load_tokenizer
from training import core, runner
from training.config import RewardConfig
from training.data import collate_pairs, pad_right, tokenize_preference
from training.losses import bradley_terry_loss
from training.worker import JobSpec, load_items, setup_worker
from workflows.core.errors import ConfigError
from workflows.core.stage import StageContext

HEAD_WEIGHTS, HEAD_CONFIG = "reward_head.pt", "reward_head.json"


class RewardModel(nn.Module):
    """``backbone`` (a causal LM, optionally LoRA-wrapped) + ``head`` (hidden → 1)."""

    def __init__(self, backbone: nn.Module, head: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head if head is not None else nn.Linear(backbone.config.hidden_size, 1)
        self.mean, self.std, self.normalize = 0.0, 1.0, False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                            use_cache=False, logits_to_keep=1)
        hidden = out.hidden_states[-1]
        positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
        last = (attention_mask * positions).argmax(dim=1)  # the last real token, whatever the padding side
        return self.head(hidden[torch.arange(hidden.size(0), device=hidden.device), last]).squeeze(-1).float()


def freeze_lm_head(backbone: nn.Module) -> None:
    """The LM head takes no part in the reward; freeze it unless it is tied to the embeddings."""
    out, inp = backbone.get_output_embeddings(), backbone.get_input_embeddings()
    if out is not None and out.weight is not inp.weight:
        out.weight.requires_grad_(False)


def check_reward_dir(reward_dir: str, where: str = "reward_model") -> str:
    """``reward_dir`` if it holds a reward model this job exported, else one ``ConfigError`` line."""
    missing = [f for f in ("config.json", HEAD_WEIGHTS, HEAD_CONFIG) if not os.path.isfile(os.path.join(reward_dir, f))]
    if missing:
        raise ConfigError(f"{where} {reward_dir!r}", f"missing {', '.join(missing)}",
                          "pass the reward_model directory the reward stage wrote (<run>/reward/reward_model)")
    return reward_dir


def load_reward_model(path: str, dtype: str | torch.dtype = "auto", device: str = "auto") -> RewardModel:
    """A reward model saved by this job, in eval mode, with its reward statistics attached."""
    with open(os.path.join(path, HEAD_CONFIG)) as f:
        meta = json.load(f)
    backbone = load_causal_lm(path, dtype=dtype, device=device)
    model = RewardModel(backbone, nn.Linear(meta["hidden_size"], 1))
    model.head.load_state_dict(torch.load(os.path.join(path, HEAD_WEIGHTS), map_location="cpu", weights_only=True))
    model.head.to(device=backbone.device, dtype=backbone.dtype)
    model.mean, model.std, model.normalize = meta["mean"], meta["std"], meta["normalize"]
    model.max_length = meta.get("max_length")
    return model.eval()


@torch.no_grad()
def score(model: RewardModel, tokenizer, conversations: list[list[dict]], batch_size: int = 8,
          normalize: bool | None = None) -> list[float]:
    """Rewards of whole conversations (each ending in the assistant answer to judge), tokenized
    exactly as in training; ``(r - mean) / std`` when ``normalize`` (default: as trained)."""
    
    norm = model.normalize if normalize is None else normalize
    device = next(model.parameters()).device
    out: list[float] = []
    for i in range(0, len(conversations), batch_size):
        texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations[i:i + batch_size]]
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"][: getattr(model, "max_length", None)]
               for t in texts]
        batch = pad_right(ids, tokenizer.pad_token_id).to(device)
        mask = pad_right([[1] * len(x) for x in ids], 0).to(device)
        r = model(batch, mask)
        out += ((r - model.mean) / model.std if norm else r).tolist()
    return out


# ---------------------------------------------------------------- the job

def _make_step(cfg: RewardConfig):
    def step(engine, batch):
        r = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        b = r.size(0) // 2
        rc, rr = r[:b], r[b:]
        loss = bradley_terry_loss(rc, rr, batch["p_chosen"] if cfg.use_soft_labels else None, cfg.margin or None)
        d = (rc - rr).detach()
        return loss, {"accuracy": float((d > 0).float().mean()), "margin": float(d.mean())}
    return step


def _make_eval(step):
    def evaluate(engine, batch):
        loss, stats = step(engine, batch)
        n = batch["p_chosen"].numel()
        return {"n": n, "loss": float(loss) * n, "correct": stats["accuracy"] * n, "margin": stats["margin"] * n}
    return evaluate


def _summarize(s):
    return {"eval_loss": s["loss"] / s["n"], "eval_accuracy": s["correct"] / s["n"], "eval_margin": s["margin"] / s["n"]}


def _reward_sums(engine, batch):
    r = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).double()
    return {"n": r.numel(), "sum": float(r.sum()), "sumsq": float((r * r).sum())}


def _make_stats(cfg: RewardConfig):
    def stats(engine, task):
        """Mean and std of the rewards of every training sequence (chosen and rejected)."""
        s = core.evaluate(engine, task, task.train, _reward_sums, cfg.micro_batch_size, sharded=True)
        mean = s["sum"] / s["n"]
        return {"reward_mean": mean, "reward_std": max(s["sumsq"] / s["n"] - mean * mean, 1e-12) ** 0.5}
    return stats


def train_loop(spec: JobSpec) -> None:
    """Ray Train worker entry: tokenize this worker's pairs, then ``core.fit``."""
    cfg: RewardConfig = spec.cfg
    ws = setup_worker(spec)
    tok = load_tokenizer(spec.model)
    train, evals, counts = load_items(tokenize_preference, tok, spec)
    backbone = core.load_lm(spec.model, cfg)
    freeze_lm_head(backbone)
    model = RewardModel(backbone)

    def export(sd, d, module, extra):
        core.save_lm({k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")},
                     d, module.backbone, cfg, tok)
        torch.save({"weight": sd["head.weight"], "bias": sd["head.bias"]}, os.path.join(d, HEAD_WEIGHTS))
        with open(os.path.join(d, HEAD_CONFIG), "w") as f:
            json.dump({"hidden_size": model.head.in_features, "mean": extra["reward_mean"],
                       "std": extra["reward_std"], "normalize": cfg.normalize, "max_length": cfg.max_length}, f)

    step = _make_step(cfg)
    task = core.Task(model=model, train=train, eval=evals, collate=lambda xs: collate_pairs(xs, tok.pad_token_id),
                     step=step, evaluate=_make_eval(step), summarize=_summarize,
                     probe=lambda engine, b: engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).tolist(),
                     export=export, finalize=_make_stats(cfg), counts=counts)
    core.fit(task, spec, ws)


def run(cfg: RewardConfig, ctx: StageContext) -> dict:
    """The ``reward`` stage: train, then write ``_SUCCESS`` (rows, steps, loss, eval accuracy, ...)."""
    return runner.run_job("reward", train_loop, cfg, ctx, runner.supervised("pair_id"), runner.rows_report)
