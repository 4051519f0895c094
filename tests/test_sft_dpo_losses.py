"""The SFT and DPO losses of rlhf.algos as specifications: worked examples computed by hand,
an independent float64 reference, and the gradients autograd takes through them."""

import math

import pytest
import torch

from rlhf import algos

# --------------------------------------------------------------------------------------
# SFT
# --------------------------------------------------------------------------------------


def test_sft_loss_is_the_token_mean_nll_of_the_learned_tokens():
    # Row 0 learns its last two tokens (-2, -3), row 1 its first (-0.5): (2 + 3 + 0.5) / 3.
    # The unlearned entries hold garbage (NaN, a huge number) that must not leak.
    logprobs = torch.tensor([[float("nan"), -2.0, -3.0], [-0.5, -1e30, float("inf")]])
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    assert algos.sft_loss(logprobs, mask).item() == pytest.approx(5.5 / 3)


def test_sft_loss_split_into_micro_batches_adds_up_to_the_batch_loss():
    # Each micro-batch divides by the batch's 3 learned tokens: the parts sum to the whole.
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -9.0, -9.0]])
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    whole = algos.sft_loss(logprobs, mask)
    parts = algos.sft_loss(logprobs[:1], mask[:1], num_tokens=3) + algos.sft_loss(logprobs[1:], mask[1:], num_tokens=3)
    assert parts.item() == pytest.approx(whole.item())


def test_sft_loss_gradient_is_minus_mask_over_token_count():
    g = torch.Generator().manual_seed(0)
    logprobs = (-torch.rand(3, 5, generator=g, dtype=torch.float64) * 4).requires_grad_()
    mask = (torch.rand(3, 5, generator=g) > 0.4).double()
    mask[0, 0] = 1
    algos.sft_loss(logprobs, mask).backward()
    assert torch.allclose(logprobs.grad, -mask / mask.sum())


def test_sft_loss_refuses_an_all_zero_mask_and_a_zero_token_count():
    with pytest.raises(ValueError, match="mask"):
        algos.sft_loss(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="num_tokens"):
        algos.sft_loss(torch.zeros(2, 3), torch.ones(2, 3), num_tokens=0)


def test_sequence_logprobs_sum_or_mean_over_the_mask():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert algos.sequence_logprobs(logprobs, mask).tolist() == [-6.0, -4.0]
    assert algos.sequence_logprobs(logprobs, mask, average=True).tolist() == [-2.0, -4.0]


# --------------------------------------------------------------------------------------
# DPO and IPO
# --------------------------------------------------------------------------------------


def test_dpo_sigmoid_worked_example():
    # beta 0.5; the policy moved chosen up by 1 and rejected down by 1 from the reference:
    # h = (-3 - -4) - (-5 - -4) = 2, loss = -log sigmoid(0.5 * 2) = log(1 + e^-1) = 0.31326.
    # Implicit rewards: 0.5 * 1 = 0.5 and 0.5 * -1 = -0.5.
    losses, chosen, rejected = algos.dpo_loss(torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]),
                                              torch.tensor([-4.0]), beta=0.5)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert losses.item() == pytest.approx(0.313262, abs=1e-6)
    assert (chosen.item(), rejected.item()) == (0.5, -0.5)


def test_dpo_loss_is_log_2_where_the_policy_is_the_reference():
    logps = torch.tensor([-7.0, -2.5])
    losses, chosen, rejected = algos.dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    assert torch.allclose(losses, torch.full((2,), math.log(2)))
    assert chosen.abs().max() == 0 and rejected.abs().max() == 0


def test_ipo_worked_example():
    # beta 0.5: the target gap is 1 / (2 * 0.5) = 1. h = 2 gives (2 - 1)^2 = 1; h = 1 gives 0;
    # h = 0 gives 1 (the same distance on the other side).
    def ipo(h):
        return algos.dpo_loss(torch.tensor([h]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]),
                              beta=0.5, kind="ipo")[0].item()

    assert (ipo(2.0), ipo(1.0), ipo(0.0)) == (1.0, 0.0, 1.0)


def _reference_losses(pc, pr, rc, rr, beta, kind):
    """Independent float64 reference, written from the papers' formulas element by element."""
    out = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        h = (a - c) - (b - d)
        out.append(math.log1p(math.exp(-beta * h)) if kind == "sigmoid" else (h - 1 / (2 * beta)) ** 2)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_dpo_losses_and_gradients_match_a_float64_reference(kind):
    g = torch.Generator().manual_seed(1)
    beta = 0.3
    pc, pr, rc, rr = (-torch.rand(6, generator=g) * 20 for _ in range(4))
    pc, pr = pc.requires_grad_(), pr.requires_grad_()
    losses, _, _ = algos.dpo_loss(pc, pr, rc, rr, beta=beta, kind=kind)
    assert torch.allclose(losses.double(), _reference_losses(pc.detach(), pr.detach(), rc, rr, beta, kind), rtol=1e-5,
                          atol=1e-6)
    losses.sum().backward()
    h = ((pc.detach() - rc) - (pr.detach() - rr)).double()
    # d/dh: sigmoid -beta * sigmoid(-beta h); ipo 2 (h - 1/(2 beta)); d h / d chosen = 1, / d rejected = -1.
    dh = -beta * torch.sigmoid(-beta * h) if kind == "sigmoid" else 2 * (h - 1 / (2 * beta))
    assert torch.allclose(pc.grad.double(), dh, rtol=1e-5, atol=1e-6)
    assert torch.allclose(pr.grad.double(), -dh, rtol=1e-5, atol=1e-6)


def test_dpo_sigmoid_is_stable_for_huge_gaps():
    losses, _, _ = algos.dpo_loss(torch.tensor([0.0, -1e4]), torch.tensor([-1e4, 0.0]), torch.zeros(2), torch.zeros(2),
                                  beta=1.0)
    assert losses[0].item() == 0.0 and losses[1].item() == pytest.approx(1e4)


def test_dpo_loss_refuses_bad_arguments():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="beta"):
        algos.dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="kind"):
        algos.dpo_loss(x, x, x, x, beta=0.1, kind="hinge")
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        algos.dpo_loss(x, x, x, torch.zeros(2), beta=0.1)
