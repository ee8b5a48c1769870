"""The chunked log-probabilities of a linear head (xent.kernels.logprobs): linear_log_probs' per-token log p_y and
entropy against log_softmax on the logits."""

import math

import pytest
import torch
import torch.nn.functional as F

import xent
from tests.conftest import assert_close

D, V, IGNORE = 6, 13, -100
# Tolerances of the comparison with the reference per dtype: float64 is exact up to rounding, bfloat16 is the head's
# GEMMs in bfloat16 on both sides with different summation orders and roundings of the logits' gradient.
TOLERANCES = {
    torch.float64: {"rtol": 1e-9, "atol": 1e-12},
    torch.float32: {"rtol": 2e-5, "atol": 2e-5},
    torch.bfloat16: {"rtol": 4e-2, "atol": 4e-2},
}


def _problem(batch, dtype=torch.float64, *, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, D, generator=generator, dtype=torch.float64).to(dtype)
    w = (torch.randn(V, D, generator=generator, dtype=torch.float64) * 0.7).to(dtype)
    b = torch.randn(V, generator=generator, dtype=torch.float64).to(dtype) if bias else None
    target = torch.randint(V, batch, generator=generator)
    target.view(-1)[::5] = IGNORE
    return x, w, b, target


def reference_logits(x, w, b, temperature=1.0, logit_scale=1.0, softcap=None):
    """``s · c tanh(L / c) / T`` of the materialised head ``L``, in float32 (float64 for float64)."""
    logits = F.linear(x, w, b)
    logits = logits.double() if logits.dtype == torch.float64 else logits.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logit_scale * logits / temperature


def reference(x, w, b, target, temperature=1.0, **head):
    """``(log p_y, H)`` on the materialised logits, in float32 (float64 for float64), plain PyTorch."""
    log_p = torch.log_softmax(reference_logits(x, w, b, temperature, **head), -1)
    valid = target != IGNORE
    picked = log_p.gather(-1, torch.where(valid, target, 0).unsqueeze(-1)).squeeze(-1)
    log_probs = torch.where(valid, picked, torch.zeros_like(picked))
    entropy = -(log_p.exp() * log_p).sum(-1)
    return log_probs, entropy


def ours(x, w, b, target, temperature=1.0, **options):
    return xent.linear_log_probs(x, w, target, linear_bias=b, temperature=temperature, **options)


def _outputs_and_grads(function, tensors, target, requires, outputs, grad_outputs, **options):
    """Both outputs and the gradients of ``Σ g · output`` over the chosen outputs, for the leaves in ``requires``;
    an output left out of ``outputs`` is not backpropagated at all (its grad_output is None)."""
    leaves = [
        None if t is None else t.detach().clone().requires_grad_(need)
        for t, need in zip(tensors, requires, strict=True)
    ]
    log_probs, entropy = function(*leaves, target, **options)
    wanted = [leaf for leaf in leaves if leaf is not None and leaf.requires_grad]
    grads = []
    if wanted:
        chosen = [(out, g) for out, g, use in zip((log_probs, entropy), grad_outputs, outputs, strict=True) if use]
        grads = torch.autograd.grad([out for out, _ in chosen], wanted, [g.to(out.dtype) for out, g in chosen])
    return [log_probs.detach(), entropy.detach(), *grads]


def _assert_all_close(actual, expected, dtype):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got.double(), want.double(), **TOLERANCES[dtype])


OUTPUTS = {"log_probs": (True, False), "entropy": (False, True), "both": (True, True)}
# What turns the head's output into the logits: the temperature, Cohere's and Granite's scales, Gemma 2's soft cap.
HEADS = {
    "plain": {},
    "temperature": {"temperature": 0.7},
    "scale": {"logit_scale": 1.7},
    "softcap": {"softcap": 2.0},
    "all": {"temperature": 0.7, "logit_scale": 0.5, "softcap": 3.0},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("outputs", list(OUTPUTS))
@pytest.mark.parametrize("batch", [(37,), (3, 13)])
def test_matches_reference(dtype, bias, head, outputs, batch):
    x, w, b, target = _problem(batch, dtype, bias=bias)
    generator = torch.Generator().manual_seed(1)
    grad_outputs = [torch.randn(batch, generator=generator, dtype=torch.float64) for _ in range(2)]
    requires = (True, True, bias)
    args = ((x, w, b), target, requires, OUTPUTS[outputs], grad_outputs)
    expected = _outputs_and_grads(reference, *args, **HEADS[head])
    actual = _outputs_and_grads(ours, *args, **HEADS[head], chunk_size=8)  # 37, 39 tokens: uneven chunks
    _assert_all_close(actual, expected, dtype)


def reference_statistics(x, w, b, target, **head):
    """``(log Σ p², mean z, argmax z == y)`` on the materialised logits; ignored tokens are not top-1."""
    logits = reference_logits(x, w, b, **head)
    log_p = torch.log_softmax(logits, -1)
    is_top1 = (logits.argmax(-1) == target) & (target != IGNORE)
    return torch.logsumexp(2 * log_p, -1), logits.mean(-1), is_top1


STATISTICS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("head", ["plain", "all"])
@pytest.mark.parametrize("asked", [(), ("mean_logits",), ("log_sum_sq_probs", "is_top1"), STATISTICS])
def test_token_outputs_match_reference(dtype, head, asked):
    """Each statistic asked for equals the materialised logits'; those not asked for are None; the log-probabilities
    (and the entropy when asked for) keep their gradient, the other statistics have none."""
    x, w, b, target = _problem((37,), dtype)
    x.requires_grad_()
    got = xent.linear_token_outputs(
        x, w, target, linear_bias=b, **HEADS[head], chunk_size=8, outputs=("log_probs", *asked)
    )
    ref_log_probs, ref_entropy = reference(x, w, b, target, **HEADS[head])
    expected = dict(zip(STATISTICS, (ref_entropy, *reference_statistics(x, w, b, target, **HEADS[head])), strict=True))
    torch.testing.assert_close(got.log_probs.double(), ref_log_probs.double(), **TOLERANCES[dtype])
    for name in STATISTICS:
        value = getattr(got, name)
        if name not in asked:
            assert value is None, name
        elif name == "is_top1":
            assert value.dtype == torch.bool and not value.requires_grad
            assert torch.equal(value, expected[name]), name
        else:
            assert value.requires_grad == (name == "entropy"), name
            torch.testing.assert_close(value.double(), expected[name].double(), **TOLERANCES[dtype], msg=name)
    # the gradient of the log-probabilities alone, with or without the entropy computed
    (grad,) = torch.autograd.grad(got.log_probs.sum(), x)
    (ref_grad,) = torch.autograd.grad(ref_log_probs.sum(), x)
    torch.testing.assert_close(grad.double(), ref_grad.double(), **TOLERANCES[dtype])


def test_is_top1_takes_the_first_of_tied_maxima():
    """A target tied with an earlier class for the largest logit is not top-1 (argmax's first maximum); tied with a
    later one, it is."""
    w = torch.eye(4, dtype=torch.float64)
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0], [1.0, 3.0, 3.0, 0.0], [5.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    target = torch.tensor([2, 1, 0])
    got = xent.linear_token_outputs(x, w, target, outputs=("is_top1",))
    assert got.is_top1.tolist() == [False, True, True]


def test_statistics_of_a_masked_class():
    """A class with bias -inf: probability 0 (the same log Σ p² as without it) and a mean logit of -inf."""
    x, w, b, target = _problem((37,))
    target = torch.where(target == 0, torch.ones_like(target), target)
    masked_bias = b.clone()
    masked_bias[0] = -math.inf
    got = xent.linear_token_outputs(
        x, w, target, linear_bias=masked_bias, chunk_size=8, outputs=("log_sum_sq_probs", "mean_logits")
    )
    expected, _, _ = reference_statistics(x, w[1:], b[1:], target)
    assert_close(got.log_sum_sq_probs, expected)
    assert bool((got.mean_logits == -math.inf).all())


@pytest.mark.parametrize(
    "requires",
    [(True, False, False), (False, True, False), (False, False, True), (False, True, True), (False, False, False)],
)
@pytest.mark.parametrize("chunk_size", [1, 8, 37, 1000, None])
def test_any_subset_of_inputs_and_any_chunk_size(requires, chunk_size):
    x, w, b, target = _problem((37,))
    grad_outputs = [
        torch.linspace(-1.0, 2.0, 37, dtype=torch.float64),
        torch.linspace(1.5, -0.5, 37, dtype=torch.float64),
    ]
    args = ((x, w, b), target, requires, (True, True), grad_outputs)
    expected = _outputs_and_grads(reference, *args, temperature=0.7)
    actual = _outputs_and_grads(ours, *args, temperature=0.7, chunk_size=chunk_size)
    _assert_all_close(actual, expected, torch.float64)


def test_ignored_tokens_get_zero_log_prob_and_no_gradient_through_it():
    x, w, b, target = _problem((37,))
    x.requires_grad_()
    log_probs, entropy = ours(x, w, b, target, chunk_size=8)
    ignored = target == IGNORE
    assert ignored.any() and bool((log_probs[ignored] == 0).all())
    assert bool((entropy[ignored] > 0).all())  # the entropy of an ignored token is still there
    (grad_x,) = torch.autograd.grad(log_probs.sum(), x)
    assert bool((grad_x[ignored] == 0).all()) and bool((grad_x[~ignored] != 0).any())
    (grad_x,) = torch.autograd.grad(ours(x, w, b, target)[1].sum(), x)
    assert bool((grad_x[ignored] != 0).any())


def test_custom_ignore_index_and_integer_dtypes():
    x, w, b, target = _problem((37,))
    target = torch.where(target == IGNORE, torch.full_like(target, 5), target)
    log_probs, _ = ours(x, w, b, target.to(torch.int32), ignore_index=5, chunk_size=8)
    expected = torch.log_softmax(F.linear(x, w, b), -1).gather(1, target.unsqueeze(1)).squeeze(1)
    assert_close(log_probs, torch.where(target == 5, torch.zeros_like(expected), expected))


def test_masked_class_with_minus_infinity_bias():
    """A class with bias -inf has probability 0: the same outputs and gradients as the head without it."""
    x, w, b, target = _problem((37,))
    target = torch.where(target == 0, torch.ones_like(target), target)
    masked_bias = b.clone()
    masked_bias[0] = -math.inf
    leaves = [t.clone().requires_grad_() for t in (x, w, masked_bias)]
    log_probs, entropy = ours(*leaves, target, temperature=0.7, chunk_size=8)
    grads = torch.autograd.grad(log_probs.sum() + entropy.sum(), leaves)
    kept = [t.clone().requires_grad_() for t in (x, w[1:], b[1:])]
    shifted = torch.where(target == IGNORE, target, target - 1)
    ref_log_probs, ref_entropy = reference(*kept, shifted, temperature=0.7)
    ref_grads = torch.autograd.grad(ref_log_probs.sum() + ref_entropy.sum(), kept)
    assert_close(log_probs, ref_log_probs)
    assert_close(entropy, ref_entropy)
    assert_close(grads[0], ref_grads[0])
    assert_close(grads[1][1:], ref_grads[1])
    assert_close(grads[2][1:], ref_grads[2])
    assert bool((grads[1][0] == 0).all()) and grads[2][0] == 0


def test_gradcheck_float64():
    x, w, b, target = _problem((5,))
    target[1] = IGNORE
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]

    def function(x, w, b):
        return xent.linear_log_probs(x, w, target, linear_bias=b, temperature=0.7, chunk_size=2)

    assert torch.autograd.gradcheck(function, leaves)  # also checks that an unused output (None grad) is handled


def test_autocast_matches_reference_under_autocast():
    x, w, b, target = _problem((3, 13), torch.float32)
    generator = torch.Generator().manual_seed(1)
    grad_outputs = [torch.randn((3, 13), generator=generator) for _ in range(2)]
    args = ((x, w, b), target, (True, True, True), (True, True), grad_outputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _outputs_and_grads(reference, *args, temperature=0.7)
        actual = _outputs_and_grads(ours, *args, temperature=0.7, chunk_size=8)
    assert actual[0].dtype == actual[1].dtype == torch.float32
    assert all(grad.dtype == torch.float32 for grad in actual[2:])
    _assert_all_close(actual, expected, torch.bfloat16)


def test_outputs_may_be_changed_in_place_and_backpropagated_twice():
    x, w, b, target = _problem((37,))
    x.requires_grad_()
    log_probs, entropy = ours(x, w, b, target, chunk_size=8)
    mask = torch.linspace(0.0, 1.0, 37, dtype=x.dtype)
    log_probs.mul_(mask)
    entropy.mul_(mask)
    first = torch.autograd.grad(log_probs.sum() + entropy.sum(), x, retain_graph=True)[0]
    second = torch.autograd.grad(log_probs.sum() + entropy.sum(), x)[0]
    log_probs, entropy = reference(x, w, b, target)
    expected = torch.autograd.grad((log_probs * mask).sum() + (entropy * mask).sum(), x)[0]
    assert_close(first, expected)
    assert torch.equal(first, second)


def test_empty_batch():
    x, w, b, target = _problem((0,))
    x.requires_grad_()
    log_probs, entropy = ours(x, w, b, target)
    assert log_probs.shape == entropy.shape == (0,)
    (log_probs.sum() + entropy.sum()).backward()
    assert x.grad.shape == (0, D)


def test_second_order_gradients_are_refused():
    x, w, b, target = _problem((7,))
    x.requires_grad_()
    log_probs, _ = ours(x, w, b, target)
    with pytest.raises(RuntimeError, match=r"create_graph=True.*materialised logits"):
        torch.autograd.grad(log_probs.sum(), x, create_graph=True)
