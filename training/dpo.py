"""DPO job: direct preference optimisation (sigmoid/cDPO or IPO, soft labels from ``p_chosen``)
of a policy against a frozen reference = the starting model, on Ray Train + DeepSpeed.

``reference: precompute`` (default) runs the starting model once over this worker's pairs
(and the eval pairs), before DeepSpeed takes the model, and keeps only the two sequence
log-probabilities per pair; ``reference: model`` keeps a frozen copy of the starting model
on every worker instead (not ZeRO-partitioned) and scores each batch with it.

Per step it reports the implicit rewards ``beta * (log pi - log ref)`` of chosen and rejected
answers, their margin, and the implicit-reward accuracy (chosen above rejected); the same on
the held-out pairs at the end. The exported directory is a Hugging Face causal LM.
"""
from __future__ import annotations

import torch

from actors.models import load_causal_lm, load_tokenizer
from training import core, runner
from training.config import DPOConfig
from training.data import collate_pairs, tokenize_preference
from training.losses import IGNORE_INDEX, dpo_loss, sequence_logprobs
from training.worker import JobSpec, load_items, setup_worker
from workflows.core.stage import StageContext


def _logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    lp = sequence_logprobs(logits, batch["labels"])
    b = lp.size(0) // 2
    return lp[:b], lp[b:]


@torch.no_grad()
def precompute_reference(model, items: list, collate, mb: int, device, dtype) -> None:
    """Store the starting model's log-probabilities in each pair's ``extra``."""
    model.to(device=device, dtype=dtype).eval()
    for i in range(0, len(items), mb):
        chunk = items[i:i + mb]
        rc, rr = _logps(model, {k: v.to(device) for k, v in collate(chunk).items()})
        for x, c, r in zip(chunk, rc.tolist(), rr.tolist()):
            x.extra.update(ref_chosen=c, ref_rejected=r)
    model.train()


def _make_step(cfg: DPOConfig, ref_model):
    def step(engine, batch):
        pc, pr = _logps(engine, batch)
        if ref_model is not None:
            with torch.no_grad():
                rc, rr = _logps(ref_model, batch)
        else:
            rc, rr = batch["ref_chosen"], batch["ref_rejected"]
        nll = None
        if cfg.rpo_alpha:  # the chosen answers' mean NLL per token (chosen rows come first)
            n = (batch["labels"][:pc.size(0), 1:] != IGNORE_INDEX).sum(-1).clamp(min=1)
            nll = -pc / n
        loss, cr, rj = dpo_loss(pc, pr, rc, rr, beta=cfg.beta, loss_type=cfg.loss_type,
                                label_smoothing=cfg.label_smoothing,
                                p_chosen=batch["p_chosen"] if cfg.use_soft_labels else None,
                                rpo_alpha=cfg.rpo_alpha, chosen_nll=nll)
        return loss, {"reward_chosen": float(cr.mean()), "reward_rejected": float(rj.mean()),
                      "reward_margin": float((cr - rj).mean()), "reward_accuracy": float((cr > rj).float().mean())}
    return step


def _make_eval(step):
    def evaluate(engine, batch):
        loss, stats = step(engine, batch)
        n = batch["p_chosen"].numel()
        return {"n": n, "loss": float(loss) * n, **{k: v * n for k, v in stats.items()}}
    return evaluate


def _summarize(s):
    return {f"eval_{k}": v / s["n"] for k, v in s.items() if k != "n"}


def _probe(engine, batch):
    pc, pr = _logps(engine, batch)
    return pc.tolist() + pr.tolist()


def train_loop(spec: JobSpec) -> None:
    """Ray Train worker entry: tokenize this worker's pairs, the reference's log-probs, then ``core.fit``."""
    cfg: DPOConfig = spec.cfg
    ws = setup_worker(spec)
    tok = load_tokenizer(spec.model)
    train, evals, counts = load_items(tokenize_preference, tok, spec)
    model = core.load_lm(spec.model, cfg)
    collate = lambda xs: collate_pairs(xs, tok.pad_token_id)  # noqa: E731
    ref_model = None
    if cfg.reference == "precompute":
        precompute_reference(model, train + evals, collate, cfg.micro_batch_size, ws.device, ws.dtype)
    else:
        ref_model = load_causal_lm(spec.model, dtype=ws.dtype, device=ws.device).eval().requires_grad_(False)
    step = _make_step(cfg, ref_model)
    task = core.Task(model=model, train=train, eval=evals, collate=collate, step=step, evaluate=_make_eval(step),
                     summarize=_summarize, probe=_probe,
                     export=lambda sd, d, module, extra: core.save_lm(sd, d, module, cfg, tok), counts=counts)
    core.fit(task, spec, ws)


def run(cfg: DPOConfig, ctx: StageContext) -> dict:
    """The ``dpo`` stage: train, then write ``_SUCCESS`` (rows, steps, loss, reward accuracy, ...)."""
    return runner.run_job("dpo", train_loop, cfg, ctx, runner.supervised("pair_id"), runner.rows_report)
