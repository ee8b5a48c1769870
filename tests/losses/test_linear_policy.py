"""xent.linear_policy_loss and xent.linear_sequence_log_probs against the materialised logits: the policy loss of
log_softmax(F.linear(...)) gathered at the tokens, and per-sequence sums for the preference losses."""

import pytest
import torch
import torch.nn.functional as F

import xent
from tests.conftest import assert_close

B, T, D, V = 3, 6, 5, 11


def problem(dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=generator, dtype=dtype)
    weight = torch.randn(V, D, generator=generator, dtype=dtype) * 0.7
    bias = torch.randn(V, generator=generator, dtype=dtype)
    tokens = torch.randint(V, (B, T), generator=generator)
    mask = torch.ones(B, T)
    mask[0, 4:] = 0
    mask[2, :] = 0  # an empty completion
    tokens[0, 5] = 10**6  # a pad id outside the vocabulary, never read
    old = torch.randn(B, T, generator=generator, dtype=dtype) * 0.1 - 2.0
    ref = torch.randn(B, T, generator=generator, dtype=dtype) * 0.1 - 2.0
    advantages = torch.randn(B, generator=generator, dtype=dtype)
    return hidden, weight, bias, tokens, mask, old, ref, advantages


def materialised(hidden, weight, bias, tokens, mask, temperature):
    logits = F.linear(hidden, weight, bias).double() / temperature
    log_softmax = logits.log_softmax(-1)
    safe = torch.where(mask.bool(), tokens, torch.zeros_like(tokens))
    log_probs = log_softmax.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * mask
    entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    return log_probs, entropy


OPTIONS = [
    {"loss_type": "grpo"},
    {"loss_type": "bnpo", "beta": 0.04, "epsilon_high": 0.28},
    {"loss_type": "dapo", "entropy_coef": 0.01, "num_items_in_batch": 7},
    {"loss_type": "grpo", "importance_sampling_level": "sequence", "top_entropy_quantile": 0.5},
    {"loss_type": "cispo", "epsilon_high": 5.0, "num_items_in_batch": 9},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_linear_policy_loss_is_the_policy_loss_of_the_materialised_logits(options, temperature):
    hidden, weight, bias, tokens, mask, old, ref, advantages = problem()
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    extra = {"old_log_probs": old, **({"ref_log_probs": ref} if options.get("beta") else {})}
    fused = xent.linear_policy_loss(
        leaves[0], leaves[1], tokens, advantages, mask, linear_bias=leaves[2], temperature=temperature,
        chunk_size=4, **options, **extra,
    )  # fmt: skip
    fused.loss.backward()
    copies = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    log_probs, entropy = materialised(*copies, tokens, mask, temperature)
    expected = xent.policy_loss(log_probs, advantages, mask, entropy=entropy, **options, **extra)
    expected.loss.backward()
    assert_close(fused.loss, expected.loss, torch.float64)
    assert_close(fused.per_token_loss, expected.per_token_loss, torch.float64)
    for name in ("kl", "entropy", "clip_ratio_region"):
        if getattr(expected, name) is not None:
            assert_close(getattr(fused, name), getattr(expected, name), torch.float64)
    for leaf, copy in zip(leaves, copies, strict=True):
        assert_close(leaf.grad, copy.grad, torch.float64)


def test_linear_policy_loss_refuses_precomputed_log_probs():
    hidden, weight, _, tokens, mask, _, _, advantages = problem()
    with pytest.raises(TypeError, match="log_probs and entropy"):
        xent.linear_policy_loss(hidden, weight, tokens, advantages, mask, entropy=torch.zeros(B, T))
    with pytest.raises(ValueError, match="completion_ids has shape"):
        xent.linear_policy_loss(hidden, weight, tokens[:, :-1], advantages, mask)
    with pytest.raises(TypeError, match="completion_ids must hold integer"):
        xent.linear_policy_loss(hidden, weight, tokens.double(), advantages, mask)


def test_sequence_log_probs_are_the_sums_of_the_materialised_log_probs():
    hidden, weight, bias, tokens, mask, _, _, _ = problem()
    labels = torch.where(mask.bool(), tokens, torch.full_like(tokens, -100))
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = xent.linear_sequence_log_probs(leaves[0], leaves[1], labels, linear_bias=leaves[2], chunk_size=5)
    copies = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    log_probs, _ = materialised(*copies, tokens, mask, 1.0)
    expected = log_probs.sum(-1)
    assert out.length.tolist() == mask.sum(-1).long().tolist()
    assert_close(out.sum, expected, torch.float64)
    out.sum.sum().backward()
    expected.sum().backward()
    for leaf, copy in zip(leaves, copies, strict=True):
        assert_close(leaf.grad, copy.grad, torch.float64)
    with pytest.raises(ValueError, match=r"target must be \(B, T\)"):
        xent.linear_sequence_log_probs(hidden, weight, labels.reshape(-1))


def test_a_dpo_step_from_hidden_states():
    """chosen and rejected sums from the heads feed xent.preference_loss: the gradient reaches the hidden states."""
    hidden, weight, _, tokens, mask, _, _, _ = problem()
    labels = torch.where(mask.bool(), tokens, torch.full_like(tokens, -100))
    chosen_hidden = hidden.clone().requires_grad_()
    chosen = xent.linear_sequence_log_probs(chosen_hidden, weight, labels)
    rejected = xent.linear_sequence_log_probs(hidden.flip(0), weight, labels.flip(0))
    out = xent.preference_loss(chosen.sum, rejected.sum, ref_chosen_log_probs=chosen.sum.detach() - 0.1,
                               ref_rejected_log_probs=rejected.sum.detach() + 0.1, beta=0.1)  # fmt: skip
    out.loss.backward()
    assert torch.isfinite(chosen_hidden.grad).all() and chosen_hidden.grad[:2].abs().sum() > 0
    assert chosen_hidden.grad[2].abs().sum() == 0  # an empty completion has no log-probability
