"""Loss functions against hand-computed values (tiny tensors, CPU, no models)."""
from __future__ import annotations

import math

import pytest
import torch

from training.losses import (
    IGNORE_INDEX,
    bradley_terry_loss,
    dpo_loss,
    gae,
    kl_penalty,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_logprobs,
    sft_loss,
    shift_for_causal_lm,
    token_rewards,
)

IGN = IGNORE_INDEX


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32),
                          torch.as_tensor(b, dtype=torch.float32), atol=tol, rtol=tol)


def sp(x):  # softplus(x) = -logsigmoid(-x) = ln(1 + e^x), by hand
    return math.log1p(math.exp(x))


def lm_batch():
    """B=1, T=3, V=2. Position 0 gives p(1)=3/4, position 1 p(0)=1/2; position 2 is never scored."""
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, -5.0]]], requires_grad=True)
    labels = torch.tensor([[IGN, 1, 0]])  # shifted: [1, 0]
    return logits, labels


def test_shift_for_causal_lm():
    logits = torch.arange(12.0).view(1, 3, 4)
    labels = torch.tensor([[7, 8, 9]])
    lg, lb = shift_for_causal_lm(logits, labels)
    assert lg.shape == (1, 2, 4) and torch.equal(lg, logits[:, :2])
    assert torch.equal(lb, torch.tensor([[8, 9]]))


def test_sft_loss_value_and_masking():
    logits, labels = lm_batch()
    loss = sft_loss(logits, labels)
    assert close(loss, (-math.log(0.75) - math.log(0.5)) / 2)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 2].abs().sum() == 0
    # mask the first response token as "prompt": only p(0)=1/2 at position 1 remains
    masked = torch.tensor([[IGN, IGN, 0]])
    base = sft_loss(logits.detach(), masked)
    assert close(base, math.log(2.0))
    other = logits.detach().clone()
    other[0, 0] = torch.tensor([9.0, -4.0])  # predicts a masked label: must not matter
    other[0, 2] = torch.tensor([-7.0, 3.0])  # last position predicts nothing
    assert close(sft_loss(other, masked), base)


def test_sft_loss_all_masked_is_zero_with_grad():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    loss = sft_loss(logits, torch.full((2, 4), IGN))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_sequence_logprobs_sum_mean_and_mask():
    logits, labels = lm_batch()
    logits2 = torch.cat([logits.detach(), torch.zeros(1, 3, 2)])
    labels2 = torch.cat([labels, torch.tensor([[IGN, IGN, 1]])])  # row 1: one token, p=1/2
    out = sequence_logprobs(logits2, labels2)
    assert out.shape == (2,) and out.dtype == torch.float32
    assert close(out, [math.log(0.75) + math.log(0.5), math.log(0.5)])
    avg = sequence_logprobs(logits2, labels2, average=True)
    assert close(avg, [(math.log(0.75) + math.log(0.5)) / 2, math.log(0.5)])
    changed = logits2.clone()
    changed[1, 0] = torch.tensor([4.0, -4.0])  # masked position of row 1
    changed[:, 2] = 11.0  # the last position predicts nothing
    assert close(sequence_logprobs(changed, labels2), out)
    # low-precision logits are scored in float32
    assert sequence_logprobs(logits2.bfloat16(), labels2).dtype == torch.float32
    sequence_logprobs(logits, labels).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_bradley_terry_hard_margin_soft():
    rc = torch.tensor([1.0, 0.0], requires_grad=True)
    rr = torch.tensor([0.0, 2.0])
    hard = bradley_terry_loss(rc, rr)  # d = [1, -2]
    assert close(hard, (sp(-1.0) + sp(2.0)) / 2)
    assert close(bradley_terry_loss(rc, rr, margin=0.5), (sp(-0.5) + sp(2.5)) / 2)
    per_pair = bradley_terry_loss(rc, rr, margin=torch.tensor([1.0, 0.0]))
    assert close(per_pair, (sp(0.0) + sp(2.0)) / 2)
    assert close(bradley_terry_loss(rc, rr, p_chosen=torch.ones(2)), hard)
    p = torch.tensor([0.25, 0.9])
    # -(p ln s(d) + (1-p) ln s(-d)) = p sp(-d) + (1-p) sp(d)
    want = (0.25 * sp(-1.0) + 0.75 * sp(1.0) + 0.9 * sp(2.0) + 0.1 * sp(-2.0)) / 2
    loss = bradley_terry_loss(rc, rr, p_chosen=p)
    assert close(loss, want)
    loss.backward()
    assert torch.isfinite(rc.grad).all()


def test_bradley_terry_half_label_minimised_at_zero():
    rc = torch.tensor([0.3, -1.2], requires_grad=True)
    rr = rc.detach().clone()  # d = 0
    loss = bradley_terry_loss(rc, rr, p_chosen=torch.full((2,), 0.5))
    assert close(loss, math.log(2.0))
    loss.backward()
    assert rc.grad.abs().max() < 1e-7
    for d in (-1.0, 0.5, 3.0):  # any other d is worse
        assert bradley_terry_loss(torch.tensor([d]), torch.zeros(1), torch.tensor([0.5])) > loss


def test_bradley_terry_large_d_is_stable():
    rc = torch.tensor([1e4, -1e4], requires_grad=True)
    rr = torch.zeros(2)
    hard = bradley_terry_loss(rc, rr)
    assert close(hard, 1e4 / 2)  # sp(-1e4) = 0, sp(1e4) = 1e4
    soft = bradley_terry_loss(rc, rr, p_chosen=torch.tensor([0.3, 1.0]))
    assert close(soft, (0.7 * 1e4 + 1e4) / 2)
    (hard + soft).backward()
    assert torch.isfinite(rc.grad).all()


def dpo_inputs():
    # h = (pc - rc) - (pr - rr) = (-1 + 2) - (-3 + 2) = 2
    pc = torch.tensor([-1.0], requires_grad=True)
    pr = torch.tensor([-3.0], requires_grad=True)
    return pc, pr, torch.tensor([-2.0]), torch.tensor([-2.0])


def test_dpo_sigmoid_value_and_rewards():
    pc, pr, rc, rr = dpo_inputs()
    loss, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.5)  # beta h = 1
    assert close(loss, sp(-1.0))
    assert close(cr, [0.5]) and close(rj, [-0.5])
    assert not cr.requires_grad and not rj.requires_grad
    loss.backward()
    # d/dpc -logsigmoid(beta h) = -beta * sigmoid(-beta h)
    assert close(pc.grad, [-0.5 / (1 + math.e)]) and close(pr.grad, [0.5 / (1 + math.e)])


def test_cdpo_label_smoothing_and_soft_override():
    pc, pr, rc, rr = dpo_inputs()
    plain = dpo_loss(pc, pr, rc, rr, beta=0.5)[0]
    assert close(dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.0)[0], plain)
    smooth = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.2)[0]
    assert close(smooth, 0.8 * sp(-1.0) + 0.2 * sp(1.0))
    # p_chosen overrides label_smoothing: p=1 is plain DPO whatever the smoothing
    assert close(dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.3,
                          p_chosen=torch.tensor([1.0]))[0], plain)
    assert close(dpo_loss(pc, pr, rc, rr, beta=0.5, p_chosen=torch.tensor([0.8]))[0], smooth)
    # per-pair labels: pair 0 as above (p=0.8), pair 1 with h=0 (p=0.6): loss ln 2 whatever p
    two = [torch.cat([t.detach(), torch.tensor([0.0])]) for t in (pc, pr, rc, rr)]
    loss = dpo_loss(*two, beta=0.5, p_chosen=torch.tensor([0.8, 0.6]))[0]
    assert close(loss, (0.8 * sp(-1.0) + 0.2 * sp(1.0) + math.log(2.0)) / 2)


def test_ipo_hard_and_soft():
    pc, pr, rc, rr = dpo_inputs()
    loss = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")[0]
    assert close(loss, (2.0 - 1.0 / (2 * 0.5)) ** 2)  # = 1
    loss.backward()
    assert close(pc.grad, [2.0 * (2.0 - 1.0)])
    soft = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo", p_chosen=torch.tensor([0.75]))[0]
    assert close(soft, (2.0 - (2 * 0.75 - 1) / (2 * 0.5)) ** 2)  # target 0.5 → 2.25
    half = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo", p_chosen=torch.tensor([0.5]))[0]
    assert close(half, 4.0)  # target h = 0
    # label_smoothing eps acts as p = 1 - eps, and p_chosen overrides it
    assert close(dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo", label_smoothing=0.25)[0], soft)
    assert close(dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo", label_smoothing=0.25,
                          p_chosen=torch.tensor([1.0]))[0], 1.0)


def test_rpo_adds_the_chosen_answers_nll():
    """RPO: + alpha * chosen NLL per pair (weighted like the DPO term); its gradient raises the
    chosen answer's log-prob even where the DPO term alone is satisfied."""
    pc, pr, rc, rr = dpo_inputs()
    nll = -pc / 4  # a 4-token chosen answer: mean NLL 0.25
    loss = dpo_loss(pc, pr, rc, rr, beta=0.5, rpo_alpha=2.0, chosen_nll=nll)[0]
    assert close(loss, sp(-1.0) + 2.0 * 0.25)
    loss.backward()
    assert close(pc.grad, [-0.5 / (1 + math.e) - 2.0 / 4])
    two = [torch.cat([t.detach(), torch.tensor([0.0])]) for t in (pc, pr, rc, rr)]
    weighted = dpo_loss(*two, beta=0.5, rpo_alpha=1.0, chosen_nll=torch.tensor([0.25, 9.0]),
                        weights=torch.tensor([1.0, 0.0]))[0]
    assert close(weighted, sp(-1.0) + 0.25)  # a weight-0 pad pair adds nothing
    with pytest.raises(ValueError, match="chosen_nll"):
        dpo_loss(pc, pr, rc, rr, rpo_alpha=1.0)


def test_dpo_unknown_loss_type():
    pc, pr, rc, rr = dpo_inputs()
    with pytest.raises(ValueError, match="sigmoid.*ipo"):
        dpo_loss(pc, pr, rc, rr, loss_type="hinge")


def test_masked_mean_and_whiten():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    m = torch.tensor([[1, 0], [1, 1]])
    assert close(masked_mean(x, m), 8.0 / 3)
    assert close(masked_mean(x, m, dim=1), [1.0, 3.5])
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0
    y = torch.tensor([1.0, 2.0, 3.0, 100.0])
    ym = torch.tensor([1, 1, 1, 0])
    s = math.sqrt(2.0 / 3)  # mean 2, biased var 2/3 over the valid entries
    assert close(masked_whiten(y, ym), [-1 / s, 0.0, 1 / s, 0.0], tol=1e-4)
    assert close(masked_whiten(y, ym, shift_mean=False), [2 - 1 / s, 2.0, 2 + 1 / s, 0.0], tol=1e-4)


def test_gae_three_steps_with_padding():
    g, lam = 0.9, 0.8
    rewards = torch.tensor([[0.5, -1.0, 2.0, 9.0]])  # last position is padding
    values = torch.tensor([[1.0, 2.0, 3.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    d2 = 2.0 + g * 0.0 - 3.0  # bootstrap 0 after the last valid token
    d1 = -1.0 + g * 3.0 - 2.0
    d0 = 0.5 + g * 2.0 - 1.0
    a2 = d2
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    adv, ret = gae(rewards, values, mask, gamma=g, lam=lam)
    assert close(adv, [[a0, a1, a2, 0.0]])
    assert close(ret, [[a0 + 1.0, a1 + 2.0, a2 + 3.0, 0.0]])
    assert close(adv[0, :3], [0.5656, -1.02, -1.0])


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [1.0, 8.0, 8.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert close(adv, [[5.5, 4.5, 2.5], [3.0, 0.0, 0.0]])
    assert close(ret, [[6.0, 5.0, 3.0], [4.0, 0.0, 0.0]])


def test_ppo_policy_loss_clipping():
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.1, 3.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, 2.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    logp = torch.log(ratio).requires_grad_()
    old = torch.zeros(1, 5)
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # per token max(-A r, -A clip(r)): [-1.2 (clipped), -0.5, 0.8 (clipped), -2.2]
    assert close(loss, (-1.2 - 0.5 + 0.8 - 2.2) / 4)
    assert stats["clipfrac"] == pytest.approx(0.5)
    want_kl = sum(0.5 * math.log(r) ** 2 for r in (1.5, 0.5, 0.5, 1.1)) / 4
    assert stats["approx_kl"] == pytest.approx(want_kl, rel=1e-5)
    assert isinstance(stats["clipfrac"], float) and isinstance(stats["approx_kl"], float)
    loss.backward()
    # clipped tokens and the masked one get no gradient; others d/dlogp = -A r / 4
    assert close(logp.grad, [[0.0, -0.5 / 4, 0.0, -2.2 / 4, 0.0]])


def test_ppo_value_loss_clipping():
    values = torch.tensor([1.0, 1.0, 0.0], requires_grad=True)
    old = torch.tensor([0.5, 1.1, 0.0])
    returns = torch.tensor([2.0, 0.0, 5.0])
    mask = torch.tensor([1, 1, 0])
    loss = ppo_value_loss(values, old, returns, mask, clip_eps=0.2)
    # token 0: max(1, (0.7-2)^2=1.69) clipped; token 1: max(1, 1) with v inside the band
    assert close(loss, 0.5 * (1.69 + 1.0) / 2)
    loss.backward()
    assert close(values.grad, [0.0, 0.5 * 2 * 1.0 / 2, 0.0])


def test_kl_penalty_kinds():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])  # logp - ref = [0.5, -1]
    assert close(kl_penalty(logp, ref), [0.5, -1.0])
    assert close(kl_penalty(logp, ref, "k3"), [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0])
    assert close(kl_penalty(logp, ref, "abs"), [0.5, 1.0])
    assert close(kl_penalty(logp, ref, "mse"), [0.125, 0.5])
    assert (kl_penalty(torch.randn(50), torch.randn(50), "k3") >= 0).all()
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(logp, ref, "k2")


def test_token_rewards():
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    score = torch.tensor([2.0, -1.0, 7.0])
    out = token_rewards(score, kl, mask, kl_coef=0.5)
    assert close(out, [[-0.05, -0.1, -0.15 + 2.0, 0.0],
                       [-0.25, -0.25 - 1.0, 0.0, 0.0],
                       [0.0, 0.0, 0.0, 0.0]])


def test_gradients_flow_everywhere():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5))
    labels[:, :2] = IGN
    lp = torch.randn(2, 4, requires_grad=True)
    m = torch.ones(2, 4)
    adv, ret = gae(torch.randn(2, 4), torch.randn(2, 4), m, gamma=0.99, lam=0.9)
    seq = sequence_logprobs(logits, labels)
    total = (sft_loss(logits, labels)
             + bradley_terry_loss(seq[:1], seq[1:], p_chosen=torch.tensor([0.7]))
             + dpo_loss(seq[:1], seq[1:], seq[:1].detach() - 1, seq[1:].detach())[0]
             + dpo_loss(seq[:1], seq[1:], seq[:1].detach(), seq[1:].detach(), loss_type="ipo")[0]
             + ppo_policy_loss(lp, lp.detach() + 0.3 * torch.randn(2, 4),
                               masked_whiten(adv, m), m)[0]
             + ppo_value_loss(lp, lp.detach() + 0.1, ret, m)
             + masked_mean(kl_penalty(lp, torch.randn(2, 4), "k3"), m))
    total.backward()
    assert torch.isfinite(total)
    for t in (logits, lp):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
