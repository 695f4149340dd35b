"""The pure parts of PPO, RLOO and GRPO (``training.rl`` and the PPO losses of ``training.losses``),
on hand-computed examples."""
from __future__ import annotations

import math

import pytest
import torch

from training.losses import aggregate, gae, kl_penalty, masked_whiten, ppo_policy_loss, token_rewards
from training.rl import (
    AdaptiveKL,
    end_penalty,
    entropy,
    explained_variance,
    flat_groups,
    grpo_advantages,
    rloo_advantages,
    sequence_rewards,
    token_logprobs,
)


def test_token_logprobs_are_recomputed_at_the_sampling_temperature():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])
    tokens = torch.tensor([[0, 2]])
    for t in (1.0, 0.7):
        want = [torch.log_softmax(logits[0, i] / t, -1)[tokens[0, i]].item() for i in range(2)]
        assert token_logprobs(logits, tokens, t)[0].tolist() == pytest.approx(want)
    assert torch.equal(token_logprobs(logits, tokens, 0.0), token_logprobs(logits, tokens, 1.0))  # greedy


def test_entropy_of_uniform_and_certain_distributions():
    mask = torch.tensor([[1, 1]])
    uniform = torch.zeros(1, 2, 4)
    assert entropy(uniform, mask).item() == pytest.approx(math.log(4))
    certain = torch.tensor([[[50.0, 0, 0, 0], [50.0, 0, 0, 0]]])
    assert entropy(certain, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_is_exactly_zero_when_the_policy_is_the_reference():
    logp = torch.log_softmax(torch.randn(3, 5), -1)
    for kind in ("k1", "k3"):
        assert torch.count_nonzero(kl_penalty(logp, logp.clone(), kind)) == 0


def test_with_unchanged_weights_the_ratio_is_one_and_nothing_is_clipped():
    logp = torch.log_softmax(torch.randn(2, 4), -1)
    adv = torch.randn(2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    loss, stats = ppo_policy_loss(logp, logp.clone(), adv, mask)
    assert stats["clipfrac"] == 0.0 and stats["approx_kl"] == 0.0
    assert loss.item() == pytest.approx(-(adv * mask).sum().item() / mask.sum().item())


def test_gae_on_a_hand_computed_three_token_response_and_padding_gets_nothing():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0]])  # the 9 sits on padding
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    d2 = 1.0 - 0.7
    d1 = 0.0 + 0.7 - 0.6
    d0 = 0.0 + 0.6 - 0.5
    a2, a1 = d2, d1 + 0.5 * d2
    a0 = d0 + 0.5 * a1
    assert adv[0, :3].tolist() == pytest.approx([a0, a1, a2])
    assert adv[0, 3] == 0 and ret[0, 3] == 0
    assert masked_whiten(adv, mask)[0, 3] == 0


def test_token_rewards_put_the_score_on_the_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    mask = torch.tensor([[1, 1, 0, 0]])
    r = token_rewards(torch.tensor([2.0]), kl, mask, kl_coef=0.5)
    assert r[0].tolist() == pytest.approx([-0.05, 2.0 - 0.1, 0.0, 0.0])


def test_rloo_baseline_on_a_hand_example():
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # two prompts, three samples each
    adv = rloo_advantages(rewards, 3)
    assert adv.tolist() == pytest.approx([1 - 4, 2 - 3.5, 6 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0])
    centred = rewards.view(2, 3) - rewards.view(2, 3).mean(1, keepdim=True)
    assert adv.tolist() == pytest.approx((centred * 3 / 2).view(-1).tolist())  # = n/(n-1) × mean-centred
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(rewards, 1)
    with pytest.raises(ValueError, match="groups of n=4"):
        rloo_advantages(rewards, 4)


def test_rloo_reward_folds_the_summed_kl_in_and_unfinished_answers_pay():
    kl = torch.tensor([[0.1, 0.2, 5.0], [0.3, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert sequence_rewards(torch.tensor([1.0, 1.0]), kl, mask, 2.0).tolist() == pytest.approx([0.4, 0.4])
    assert end_penalty(torch.tensor([1.0, 1.0]), torch.tensor([True, False]), 3.0).tolist() == [1.0, -2.0]


def test_adaptive_kl_moves_toward_its_target_and_fixed_stays():
    up, down, fixed = AdaptiveKL(0.1, target=1.0, horizon=100), AdaptiveKL(0.1, 1.0, 100), AdaptiveKL(0.1)
    assert up.update(kl=5.0, n_steps=10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error clipped at +0.2
    assert down.update(kl=0.5, n_steps=10) == pytest.approx(0.1 * (1 - 0.5 * 0.1 * 0.4))
    assert fixed.update(kl=5.0, n_steps=10) == 0.1


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(returns.clone(), returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask) == pytest.approx(0.0)
    assert math.isnan(explained_variance(returns, torch.ones_like(returns), mask))


def test_weights_travel_in_size_capped_buckets_in_order():
    from training.rollouts import buckets

    sd = {"a": torch.zeros(10), "b": torch.zeros(10), "big": torch.zeros(100), "c": torch.zeros(5)}  # 40, 40, 400, 20 B
    assert buckets(sd, 100) == [["a", "b"], ["big"], ["c"]]
    assert buckets(sd, 10**6) == [["a", "b", "big", "c"]]
    assert [k for b in buckets(sd, 1) for k in b] == list(sd)


def test_grpo_advantages_on_a_hand_example():
    # two prompts, three samples each: rewards [1, 2, 3] and [5, 5, 5]
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    # group: (r - 2) / std([1, 2, 3]) = (r - 2) / 1 (unbiased); the flat group gets 0
    assert grpo_advantages(r, 3, "group").tolist() == pytest.approx([-1, 0, 1, 0, 0, 0], abs=1e-3)
    # none (Dr. GRPO): only the mean comes off
    assert grpo_advantages(r, 3, "none").tolist() == pytest.approx([-1, 0, 1, 0, 0, 0])
    # batch: one std over all six rewards
    s = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]).std().item()
    assert grpo_advantages(r, 3, "batch").tolist() == pytest.approx([-1 / s, 0, 1 / s, 0, 0, 0], rel=1e-3)
    # the scale matters: a group with small spread is up-weighted by "group", not by "none"
    small = torch.tensor([0.0, 0.1, 10.0, 20.0])
    g, n = grpo_advantages(small, 2, "group"), grpo_advantages(small, 2, "none")
    assert g[1].item() == pytest.approx(g[3].item(), rel=1e-2) and n[3].item() == pytest.approx(100 * n[1].item())
    assert flat_groups(r, 3) == 1 and flat_groups(small, 2) == 0
    for bad in [(r, 1, "group"), (r, 4, "group"), (r, 3, "rank")]:
        with pytest.raises(ValueError):
            grpo_advantages(*bad)


def test_loss_norms_on_a_hand_example():
    # answer 1 has two tokens (1, 3), answer 2 one token (8); max_len 4
    x = torch.tensor([[1.0, 3.0, 99.0], [8.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate(x, mask, "token").item() == pytest.approx((1 + 3 + 8) / 3)
    assert aggregate(x, mask, "sequence").item() == pytest.approx((2 + 8) / 2)
    assert aggregate(x, mask, "constant", max_len=4).item() == pytest.approx((1 + 3 + 8) / (2 * 4))
    with pytest.raises(ValueError):
        aggregate(x, mask, "constant")
    with pytest.raises(ValueError):
        aggregate(x, mask, "per_answer")


def test_kl_in_the_loss_pulls_toward_the_reference():
    # zero advantage: the loss is the k3 KL alone, whose gradient moves logp toward the reference's
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    mask = torch.ones(1, 2)
    kl = kl_penalty(logp, ref, "k3")
    loss, _ = ppo_policy_loss(logp, logp.detach(), torch.zeros(1, 2), mask, norm="sequence", extra=0.5 * kl)
    want = 0.5 * sum(math.exp(r - p) - (r - p) - 1 for p, r in ((-1.0, -1.5), (-2.0, -1.0))) / 2
    assert loss.item() == pytest.approx(want, rel=1e-5)
    loss.backward()
    assert logp.grad[0, 0] > 0 and logp.grad[0, 1] < 0  # above the reference: down; below: up
