"""Pure pieces of RL-CAI (PPO, RLOO and GRPO) that ``training.losses`` does not already hold: no Ray,
no DeepSpeed, no models. Shapes: ``[B, T]`` over response tokens unless said.

- ``token_logprobs(logits, tokens, temperature)``: log-probs of the sampled tokens under the
  policy *at the sampling temperature* — recomputed by the trainer, never taken from the engine;
- ``entropy(logits, mask, temperature)``: mean per-token entropy of the sampling distribution;
- ``end_penalty(scores, ended, penalty)``: a response that never ended (hit the token limit)
  loses ``penalty`` from its score;
- ``rloo_advantages(rewards, n)``: REINFORCE leave-one-out (Ahmadian et al. 2024): each of a
  prompt's ``n`` samples against the mean reward of its ``n - 1`` siblings;
- ``grpo_advantages(rewards, n, scale)``: each sample against its group's mean, scaled by the
  group's (or batch's) standard deviation or not at all (Dr. GRPO); ``flat_groups`` counts the
  groups that carry no signal;
- ``best_worst(scores, n)``: online DPO's pairs, each prompt's best answer over its worst;
- ``sequence_rewards(scores, kl, mask, kl_coef)``: RLOO's reward, the score minus the KL summed
  over the response (KL folded into the reward instead of spread per token);
- ``AdaptiveKL``: the KL coefficient of Ziegler et al. (2019), steered toward a target KL;
- ``explained_variance(values, returns, mask)``: how much of the returns the critic explains.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from training.losses import masked_mean


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """``[B, T]`` log p(token_t) from ``logits[:, t]`` (already aligned with ``tokens``) under
    softmax(logits / temperature), in float32. Greedy sampling (temperature 0) scores at 1."""
    t = temperature if temperature > 0 else 1.0
    logp = torch.log_softmax(logits.float() / t, dim=-1)
    return torch.gather(logp, -1, tokens.long().unsqueeze(-1)).squeeze(-1)


def entropy(logits: Tensor, mask: Tensor, temperature: float = 1.0) -> Tensor:
    """Masked mean over tokens of the entropy of softmax(logits / temperature)."""
    t = temperature if temperature > 0 else 1.0
    logp = torch.log_softmax(logits.float() / t, dim=-1)
    return masked_mean(-(logp.exp() * logp).sum(-1), mask)


def end_penalty(scores: Tensor, ended: Tensor, penalty: float) -> Tensor:
    """``scores - penalty`` where the response did not end (no end-of-turn before the limit)."""
    return torch.where(ended.bool(), scores, scores - penalty)


def rloo_advantages(rewards: Tensor, n: int) -> Tensor:
    """``[P * n]`` rewards, grouped as ``n`` consecutive samples per prompt → each minus the
    mean of the other ``n - 1`` samples of its prompt (n ≥ 2)."""
    if n < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt, got n={n}")
    if rewards.numel() % n:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of n={n}")
    r = rewards.float().view(-1, n)
    baseline = (r.sum(1, keepdim=True) - r) / (n - 1)
    return (r - baseline).view(-1)


SCALES = ("group", "batch", "none")


def grpo_advantages(rewards: Tensor, n: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """``[P * n]`` rewards, grouped as ``n`` consecutive samples per prompt → each minus its group's
    mean (Shao et al. 2024, GRPO), divided by the group's standard deviation (``group``, as in the
    paper), the whole batch's (``batch``) or nothing (``none``: Dr. GRPO, Liu et al. 2025 — the
    division up-weights prompts that are nearly solved or nearly hopeless). A group whose samples
    all scored the same gets 0: it carries no signal (n ≥ 2)."""
    if n < 2:
        raise ValueError(f"GRPO needs at least 2 samples per prompt, got n={n}")
    if rewards.numel() % n:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of n={n}")
    r = rewards.float().view(-1, n)
    a = r - r.mean(1, keepdim=True)
    if scale == "group":
        a = a / (r.std(1, keepdim=True) + eps)
    elif scale == "batch":
        a = a / (r.std() + eps)
    elif scale != "none":
        raise ValueError(f"unknown scale {scale!r}; allowed: {', '.join(SCALES)}")
    return a.view(-1)


def flat_groups(rewards: Tensor, n: int) -> int:
    """How many prompts' ``n`` samples all got the same reward (no group-relative signal)."""
    r = rewards.float().view(-1, n)
    return int((r.max(1).values - r.min(1).values <= 1e-6).sum())


def best_worst(scores: list[float], n: int, tie: float = 1e-6) -> list[tuple[int, int] | None]:
    """For each group of ``n`` consecutive scores (a prompt's answers): (index of its best, index of
    its worst), the first of equals — or None where best and worst tie (no preference to learn)."""
    if n < 2 or len(scores) % n:
        raise ValueError(f"{len(scores)} scores do not split into groups of n={n} (n ≥ 2)")
    out: list[tuple[int, int] | None] = []
    for g in range(0, len(scores), n):
        group = scores[g:g + n]
        hi = max(range(n), key=lambda i: (group[i], -i))
        lo = min(range(n), key=lambda i: (group[i], i))
        out.append(None if group[hi] - group[lo] <= tie else (g + hi, g + lo))
    return out


def sequence_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """``[B]``: ``score - kl_coef * sum_t kl_t`` over each response's tokens."""
    return scores.float() - kl_coef * (kl.float() * mask.to(torch.float32)).sum(-1)


@dataclass
class AdaptiveKL:
    """KL coefficient that grows when the measured KL is above ``target`` and shrinks when below:
    ``coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon``. ``target=None`` keeps
    it fixed."""

    coef: float = 0.05
    target: float | None = None
    horizon: int = 10_000

    def update(self, kl: float, n_steps: int) -> float:
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.coef *= 1.0 + error * n_steps / self.horizon
        return self.coef


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """``1 - Var(returns - values) / Var(returns)`` over the masked tokens (NaN when the returns
    do not vary): 1 is a perfect critic, 0 one no better than a constant, < 0 worse."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return float("nan") if var_r.item() == 0 else float(1 - var_d / var_r)
