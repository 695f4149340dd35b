"""Pure loss functions of the training jobs (docs/training.md): no Ray, no DeepSpeed, no models.

Conventions: ``logits`` are ``[B, T, V]``, ``labels``/``mask`` are ``[B, T]``; a label equal to
``IGNORE_INDEX`` (prompt or padding) contributes nothing. Log-probabilities are computed in
float32 whatever the model's dtype. Masked means never divide by zero: an empty mask gives 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def shift_for_causal_lm(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Align ``logits[:, t]`` with ``labels[:, t + 1]`` (position t predicts token t+1)."""
    return logits[:, :-1], labels[:, 1:]


def sft_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean token cross-entropy ``-log p(y_{t+1} | y_<=t)`` over shifted labels != IGNORE_INDEX.

    An all-masked batch gives 0.0 that still has a grad_fn (zero gradient), not NaN."""
    logits, labels = shift_for_causal_lm(logits, labels)
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def sequence_logprobs(logits: Tensor, labels: Tensor, average: bool = False) -> Tensor:
    """``[B]``: sum_t log p(y_{t+1}) over unmasked shifted positions (mean if ``average``)."""
    logits, labels = shift_for_causal_lm(logits, labels)
    mask = labels != IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = torch.gather(logp, -1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    total = (tok * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, p_chosen: Tensor | None = None,
                       margin: Tensor | float | None = None) -> Tensor:
    """Reward-model loss on ``d = r_chosen - r_rejected - margin``.

    Hard labels: ``mean(-logsigmoid(d))``. Soft labels ``p = P(chosen > rejected)``: the BCE
    ``mean(-(p logsigmoid(d) + (1-p) logsigmoid(-d)))``; p=1 is the hard loss, p=0.5 is minimised
    at d=0. ``logsigmoid`` keeps it finite for |d| up to 1e4 and beyond."""
    d = r_chosen.float() - r_rejected.float()
    if margin is not None:
        d = d - (margin.float() if isinstance(margin, Tensor) else margin)
    if p_chosen is None:
        return -F.logsigmoid(d).mean()
    p = p_chosen.to(d.dtype)
    return -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d)).mean()


DPO_LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, p_chosen: Tensor | None = None, weights: Tensor | None = None,
             rpo_alpha: float = 0.0, chosen_nll: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """DPO family on ``h = (pi_c - ref_c) - (pi_r - ref_r)``; returns (mean loss, chosen_rewards,
    rejected_rewards) with rewards ``beta * (policy - ref)`` detached.

    Both losses use a per-pair label ``p`` = probability that "chosen" really is preferred:
    ``p = p_chosen`` if given (it overrides ``label_smoothing``), else ``p = 1 - label_smoothing``.

    * ``"sigmoid"`` (DPO, Rafailov et al. 2023; cDPO, Mitchell 2023, as in TRL) with ``eps = 1-p``:
      ``-(1-eps) logsigmoid(beta h) - eps logsigmoid(-beta h)``; eps=0 is plain DPO.
    * ``"ipo"`` (Azar et al. 2023): ``(h - (2p-1) / (2 beta))^2``; p=1 is standard IPO's target
      ``1/(2 beta)``, p=0.5 targets h=0. (Unlike TRL, label_smoothing thus also softens IPO.)

    ``weights`` (per pair) make the loss a weighted mean: a weight-0 pair only pads a batch.

    ``rpo_alpha`` > 0 adds ``rpo_alpha * chosen_nll`` per pair (RPO, Pang et al. 2024; TRL's
    ``rpo_alpha``): ``chosen_nll`` is each chosen answer's mean negative log-likelihood per token,
    so the chosen answers' likelihood is held up while the margin grows — plain DPO can widen the
    margin by pushing both answers down."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; allowed: {', '.join(DPO_LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    chosen_diff = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected_diff = policy_rejected_logps.float() - ref_rejected_logps.float()
    h = chosen_diff - rejected_diff
    p = (p_chosen.to(h.dtype) if p_chosen is not None
         else torch.full_like(h, 1.0 - label_smoothing))
    if loss_type == "sigmoid":
        eps = 1 - p
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    else:
        losses = (h - (2 * p - 1) / (2 * beta)) ** 2
    if rpo_alpha:
        if chosen_nll is None:
            raise ValueError("rpo_alpha needs chosen_nll: each chosen answer's mean NLL per token")
        losses = losses + rpo_alpha * chosen_nll.float()
    loss = losses.mean() if weights is None else (losses * weights).sum() / weights.sum().clamp(min=1e-8)
    return loss, beta * chosen_diff.detach(), beta * rejected_diff.detach()


def masked_mean(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    """``sum(x * mask) / sum(mask)`` (over ``dim``, or everything); 0 where the mask is empty."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1e-8)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1e-8)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` with mean/var (biased) over the masked entries of the
    whole tensor; ``shift_mean=False`` adds the mean back. Masked-out entries come back as 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over ``[B, T]`` token steps.

    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``, with V and r
    taken as 0 outside the mask (so the episode ends — bootstraps 0 — after the last valid
    token). Returns detached ``(advantages, returns = advantages + values)``, both 0 off-mask."""
    with torch.no_grad():
        m = mask.to(values.dtype)
        r, v = rewards.to(values.dtype) * m, values * m
        adv = torch.zeros_like(v)
        last = torch.zeros_like(v[:, 0])
        for t in reversed(range(v.size(1))):
            next_v = v[:, t + 1] if t + 1 < v.size(1) else torch.zeros_like(last)
            delta = r[:, t] + gamma * next_v - v[:, t]
            last = (delta + gamma * lam * last) * m[:, t]
            adv[:, t] = last
        return adv, (adv + v) * m


LOSS_NORMS = ("token", "sequence", "constant")


def aggregate(per_token: Tensor, mask: Tensor, norm: str = "token", max_len: int | None = None) -> Tensor:
    """One loss from ``[B, T]`` per-token terms over the masked tokens:

    - ``token``: the mean over every token of the batch (DAPO; a long answer weighs more);
    - ``sequence``: each answer's token mean, then the mean over answers (the GRPO paper's 1/|o|,
      which favours short right answers and long wrong ones — the length bias Dr. GRPO names);
    - ``constant``: the token sum over ``B × max_len`` (Dr. GRPO): every token weighs the same
      whatever the answer's length or the batch's."""
    m = mask.to(per_token.dtype)
    if norm == "token":
        return masked_mean(per_token, m)
    if norm == "sequence":
        return masked_mean(per_token, m, dim=1).mean()
    if norm == "constant":
        if not max_len or max_len < 1:
            raise ValueError("the constant norm needs max_len, the most tokens an answer may have")
        return (per_token * m).sum() / (per_token.size(0) * max_len)
    raise ValueError(f"unknown loss norm {norm!r}; allowed: {', '.join(LOSS_NORMS)}")


def ppo_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                    clip_eps: float = 0.2, norm: str = "token", max_len: int | None = None,
                    extra: Tensor | None = None) -> tuple[Tensor, dict]:
    """Clipped surrogate (Schulman et al. 2017): ``max(-A r, -A clip(r, 1-eps, 1+eps))`` per token
    with ``r = exp(logp - old_logp)``, plus ``extra`` per-token terms (a KL penalty in the loss),
    aggregated by ``norm`` (see ``aggregate``). Stats (floats): ``clipfrac`` = fraction of tokens
    where the clipped term is active, ``approx_kl`` = masked mean of ``0.5 (logp - old_logp)^2``."""
    log_ratio = logprobs.float() - old_logprobs.float()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = torch.maximum(unclipped, clipped)
    loss = aggregate(per_token if extra is None else per_token + extra, mask, norm, max_len)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
                 "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask).item()}
    return loss, stats


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                   clip_eps: float = 0.2) -> Tensor:
    """Clipped value loss:
    ``0.5 * masked_mean(max((v - R)^2, (clip(v, old - eps, old + eps) - R)^2))``."""
    values = values.float()
    clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


KL_KINDS = ("k1", "k3", "abs", "mse")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Per-token KL(pi || ref) estimate from sampled tokens (Schulman, "Approximating KL"):
    k1 = ``logp - ref``; k3 = ``(exp(ref - logp) - 1) - (ref - logp)`` (unbiased, >= 0);
    abs = ``|logp - ref|``; mse = ``0.5 (logp - ref)^2``."""
    diff = logprobs.float() - ref_logprobs.float()
    if kind == "k1":
        return diff
    if kind == "k3":
        return torch.expm1(-diff) + diff
    if kind == "abs":
        return diff.abs()
    if kind == "mse":
        return 0.5 * diff ** 2
    raise ValueError(f"unknown kl kind {kind!r}; allowed: {', '.join(KL_KINDS)}")


def token_rewards(score: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """``[B, T]`` RLHF rewards: ``-kl_coef * kl`` on response tokens, plus each row's scalar
    ``score`` at its last valid token (rows with an empty mask get no score)."""
    m = mask.to(kl.dtype)
    rewards = -kl_coef * kl * m
    T = mask.size(1)
    has_any = m.sum(1) > 0
    last = T - 1 - torch.argmax(torch.flip(m, dims=[1]), dim=1)
    rows = torch.arange(mask.size(0), device=mask.device)
    bonus = torch.where(has_any, score.to(rewards.dtype), torch.zeros_like(rewards[:, 0]))
    return rewards.index_put((rows, last), bonus, accumulate=True)
