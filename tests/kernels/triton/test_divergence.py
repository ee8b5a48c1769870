"""The Triton distillation row kernels (xent.kernels.triton.divergence) against xent.core.divergence in float64 on
the materialised logits, and against autograd, under the interpreter on a CPU (tiny shapes) or on a GPU.

Every case holds a row whose first block of columns (and one more) is masked to -inf in both models (a vocabulary
padded for the GPU; 37 columns: three interpreter blocks of 16, the last partial), a top-k row with padding entries
whose ids are out of range (never read), and a full one."""

import itertools
import math

import pytest
import torch

from tests.conftest import assert_close
from xent.core.divergence import divergence_terms, softmax_gradient, teacher_categories, top_k_rows

pytest.importorskip("triton")
# the interpreter evaluates both sides of every tl.where in NumPy: the side a -inf column discards warns
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
from xent.kernels.distill import DistillSpec, HardLabels  # noqa: E402
from xent.kernels.distill import top_k_rows_ as cpu_top_k_rows_  # noqa: E402
from xent.kernels.triton.divergence import dense_rows_, top_k_rows_  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROWS, VOCAB, K = 3, 37, 5
MASKED = 17  # row 0: columns [0, 17) are -inf in both models
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 1e-3)]
TRANSFORMS = {
    "plain": {},
    "scaled_capped": {"logit_scale": 0.7, "softcap": 5.0, "teacher_logit_scale": 1.3, "teacher_softcap": 8.0},
}


def _problem(seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(ROWS, VOCAB, generator=generator, dtype=torch.float64) * 3
    teacher = torch.randn(ROWS, VOCAB, generator=generator, dtype=torch.float64) * 3
    student[0, :MASKED] = -math.inf
    teacher[0, :MASKED] = -math.inf
    # the teacher's top-k of its own distribution (sums below 1: a valid "bucket" teacher), in a shuffled order
    log_probs, indices = torch.log_softmax(teacher, dim=1).topk(K, dim=1)
    order = torch.randperm(K, generator=generator)
    log_probs, indices = log_probs[:, order], indices[:, order]
    valid = torch.ones(ROWS, K, dtype=torch.bool)
    valid[1, [1, 3]] = False  # padding: -inf log-probs, ids that would fault if read
    log_probs[1, [1, 3]] = -math.inf
    indices[1, 1], indices[1, 3] = 10**6, -7
    grad_scale = torch.tensor([0.5, -1.25, 2.0], dtype=torch.float64)
    target = torch.tensor([20, 4, 9])
    hard_weight = torch.tensor([0.3, 1.0, 0.0], dtype=torch.float64)
    return student, teacher, indices, log_probs, valid, grad_scale, target, hard_weight


def _transform(x, scale, cap):
    if cap is not None:
        x = cap * torch.tanh(x / cap)
    return scale * x


def _hard_loss(u, target, hard_weight):
    log_p = torch.log_softmax(u, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    return torch.where(hard_weight == 0, torch.zeros_like(log_p), -hard_weight * log_p)


def _reference(spec, student, teacher, indices, log_probs, valid, grad_scale, hard):
    """(loss, entropy, analytic gradient of Σ grad_scale · loss, the loss as a function of the leaf for autograd), in
    float64 from xent.core.divergence; teacher None: top-k."""
    temperature = spec.temperature
    leaf = student.clone().requires_grad_()
    u = _transform(leaf, spec.logit_scale, spec.softcap)
    z = u / temperature
    log_p = torch.log_softmax(z, dim=1)
    if teacher is not None:
        log_q = torch.log_softmax(_transform(teacher, spec.teacher_logit_scale, spec.teacher_softcap) / temperature, 1)
        terms, slopes = divergence_terms(log_p, log_q, spec.divergence, spec.beta)
        loss = terms.sum(dim=1)
        grad_z = softmax_gradient(slopes.detach(), log_p.detach())
    else:
        categories = teacher_categories(log_probs, valid, spec.tail, temperature)
        ids = torch.where(valid, indices, 0)
        in_support = torch.zeros_like(z, dtype=torch.float64).scatter_add_(1, ids, valid.double()) > 0
        masked = z.masked_fill(in_support, -math.inf)
        lse, lse_tail = torch.logsumexp(z, dim=1), torch.logsumexp(masked, dim=1)
        parts = top_k_rows(z.gather(1, ids), lse, lse_tail, categories, valid, spec.divergence, spec.beta, spec.tail)
        loss = parts.loss
        tail = (masked - lse_tail.unsqueeze(1)).exp() * parts.tail_coefficient.unsqueeze(1)
        tail = torch.where(in_support | (masked == -math.inf), torch.zeros_like(tail), tail).detach()
        grad_z = tail.scatter_add(1, ids, torch.where(valid, parts.support_gradient.detach(), 0.0))
    loss = loss * temperature**2
    entropy = -torch.special.xlogy(log_p.exp(), log_p.exp()).sum(dim=1).detach()
    du_dx = spec.logit_scale * (1 - torch.tanh(student / spec.softcap) ** 2 if spec.softcap is not None else 1.0)
    grad = grad_scale.unsqueeze(1) * temperature * grad_z * du_dx
    if hard is not None:
        loss = loss + _hard_loss(u, hard.target, hard.weight)
        one_hot = torch.nn.functional.one_hot(hard.target, VOCAB).double()
        grad_u = hard.weight.unsqueeze(1) * (torch.softmax(u.detach(), dim=1) - one_hot)
        grad = grad + grad_scale.unsqueeze(1) * grad_u * du_dx
    autograd = torch.autograd.grad((loss * grad_scale).sum(), leaf)[0]
    return loss.detach(), entropy, grad, autograd


def _run(spec, dtype, needs_grad, with_entropy, with_hard, top_k):
    student, teacher, indices, log_probs, valid, grad_scale, target, hard_weight = _problem()
    hard = HardLabels(target, hard_weight) if with_hard else None
    expected = _reference(spec, student, None if top_k else teacher, indices, log_probs, valid, grad_scale, hard)
    x = student.to(dtype).to(DEVICE)
    entropy = torch.full((ROWS,), math.nan, dtype=torch.float32, device=DEVICE) if with_entropy else None
    factors = torch.float64 if dtype == torch.float64 else torch.float32  # float32 factors round 0.3 and 1.25
    scale = grad_scale.to(factors).to(DEVICE)
    device_hard = HardLabels(target.to(DEVICE), hard_weight.to(factors).to(DEVICE)) if with_hard else None
    if top_k:
        categories = teacher_categories(log_probs, valid, spec.tail, spec.temperature)
        categories = categories.to(torch.float64 if dtype == torch.float64 else torch.float32)
        args = (indices.to(DEVICE), categories.to(DEVICE), valid.to(DEVICE))
        loss = top_k_rows_(x, *args, spec, scale, needs_grad, entropy, device_hard)
    else:
        loss = dense_rows_(x, teacher.to(dtype).to(DEVICE), spec, scale, needs_grad, entropy, device_hard)
    return loss, entropy, x, student, expected


@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES)
@pytest.mark.parametrize("tail", [None, "renormalize", "bucket"])  # None: a dense teacher
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize(
    ("needs_grad", "with_entropy", "with_hard"), [(True, True, False), (False, False, False), (True, False, True)]
)
def test_rows_match_the_core_math(divergence, beta, tail, temperature, transform, needs_grad, with_entropy, with_hard):
    spec = DistillSpec(divergence, beta, temperature, tail=tail or "renormalize", **TRANSFORMS[transform])
    loss, entropy, x, student, (want_loss, want_entropy, want_grad, autograd) = _run(
        spec, torch.float32, needs_grad, with_entropy, with_hard, tail is not None
    )
    assert loss.dtype == torch.float32
    assert_close(loss.double().cpu(), want_loss, torch.float32)
    if with_entropy:
        assert_close(entropy.double().cpu(), want_entropy, torch.float32)
    if needs_grad:
        assert_close(x.double().cpu(), want_grad, torch.float32)
        # autograd through the core math agrees, on the rows where it is finite (a -inf column or a padding entry
        # may give it 0 · NaN): the last one at least, which has neither
        finite = autograd.isfinite().all(dim=1)
        assert finite[-1]
        assert_close(x.double().cpu()[finite], autograd[finite], torch.float32)
    else:
        assert torch.equal(x.cpu(), student.float())  # read only


@pytest.mark.parametrize(("divergence", "beta"), DIVERGENCES)
@pytest.mark.parametrize("tail", [None, "renormalize", "bucket"])
def test_float64_rows_are_float64(divergence, beta, tail):
    spec = DistillSpec(divergence, beta, 2.0, tail=tail or "renormalize", **TRANSFORMS["scaled_capped"])
    loss, entropy, x, _, (want_loss, want_entropy, want_grad, _) = _run(
        spec, torch.float64, True, True, True, tail is not None
    )
    assert loss.dtype == torch.float64 and x.dtype == torch.float64
    assert_close(loss.cpu(), want_loss)
    assert_close(x.cpu(), want_grad)
    assert_close(entropy.double().cpu(), want_entropy, torch.float32)  # written into the float32 buffer given


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_a_row_never_reads_the_next_rows_support(tail):
    """k = 5 ids are loaded K_BLOCK = 8 wide and the last block of columns overhangs V: the support run of that block
    once took the padding positions too, reading the next row's sorted ids (or, for the last row, memory past the
    tensor: a loss that changed from run to run). Row 1's support lies in row 0's last block, where it would be
    taken for row 0's: row 0 must not see it. Compared with the chunked kernel's float64 rows."""
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(2, VOCAB, generator=generator, dtype=torch.float64)
    teacher = torch.randn(2, VOCAB, generator=generator, dtype=torch.float64)
    indices = torch.tensor([[1, 2, 3, 4, 5], [36, 35, 34, 33, 32]])  # row 1's in the last block [32, 48)
    log_probs = torch.log_softmax(teacher, 1).gather(1, indices)
    valid = torch.ones(2, K, dtype=torch.bool)
    spec = DistillSpec("forward_kl", 0.5, 1.0, tail=tail)
    categories = teacher_categories(log_probs, valid, tail, 1.0)
    scale = torch.ones(2, dtype=torch.float64)
    expected = cpu_top_k_rows_(student.clone(), indices, categories, valid, spec, scale, False, None)
    got = top_k_rows_(student.to(DEVICE), indices.to(DEVICE), categories.to(DEVICE), valid.to(DEVICE), spec,
                      scale.to(DEVICE), False, None)  # fmt: skip
    assert_close(got.cpu(), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tail", [None, "bucket"])
def test_half_precision_heads(dtype, tail):
    spec = DistillSpec("jsd", 0.5, 2.0, tail=tail or "renormalize")
    student = _problem()[0]
    loss, _, x, _, _ = _run(spec, dtype, True, False, False, tail is not None)
    # the exact answer for the head's rounded values
    rounded = student.to(dtype).double()
    _, teacher, indices, log_probs, valid, grad_scale, _, _ = _problem()
    teacher = teacher.to(dtype).double() if tail is None else None
    want_loss, _, want_grad, _ = _reference(spec, rounded, teacher, indices, log_probs, valid, grad_scale, None)
    assert loss.dtype == torch.float32 and x.dtype == dtype
    torch.testing.assert_close(loss.double().cpu(), want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.double().cpu(), want_grad, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("tail", [None, "renormalize"])
def test_a_dropped_row_gets_no_gradient(tail):
    """grad_scale 0 (an ignored token): a gradient of exactly 0, even where its teacher makes the loss infinite."""
    spec = DistillSpec("reverse_kl", 0.5, 1.0, tail="bucket" if tail is None else tail)
    student, teacher, indices, log_probs, valid, _, _, _ = _problem()
    teacher[2, :5] = -math.inf  # q = 0 where p > 0: reverse KL is infinite
    x = student.float().to(DEVICE)
    scale = torch.tensor([1.0, 1.0, 0.0], device=DEVICE)
    if tail is None:
        loss = dense_rows_(x, teacher.float().to(DEVICE), spec, scale, True, None)
        assert loss[2].item() == math.inf
    else:
        log_probs[2] = math.nan  # an ignored token's garbage
        categories = teacher_categories(log_probs, valid, spec.tail, 1.0).float()
        top_k_rows_(x, indices.to(DEVICE), categories.to(DEVICE), valid.to(DEVICE), spec, scale, True, None)
    assert torch.isfinite(x[:2]).all()
    assert x[2].eq(0).all()


def test_support_covering_the_vocabulary():
    """k = V: the tail is empty (lse_tail = -inf) and the student's whole distribution is the support."""
    student, teacher = _problem()[:2]
    student, teacher = student[1:], teacher[1:]
    log_probs, indices = torch.log_softmax(teacher, dim=1).sort(dim=1, descending=True)
    valid = torch.ones_like(indices, dtype=torch.bool)
    scale = torch.tensor([1.0, -0.5], dtype=torch.float64)
    for divergence, tail in itertools.product(("forward_kl", "reverse_kl", "jsd"), ("renormalize", "bucket")):
        spec = DistillSpec(divergence, 0.5, 2.0, tail=tail)
        want_loss, want_entropy, want_grad, _ = _reference(spec, student, None, indices, log_probs, valid, scale, None)
        x, entropy = student.float().to(DEVICE), torch.empty(2, device=DEVICE)
        categories = teacher_categories(log_probs, valid, spec.tail, 2.0).float().to(DEVICE)
        loss = top_k_rows_(x, indices.to(DEVICE), categories, valid.to(DEVICE), spec, scale.float(), True, entropy)
        assert_close(loss.double().cpu(), want_loss, torch.float32)
        assert_close(entropy.double().cpu(), want_entropy, torch.float32)
        assert_close(x.double().cpu(), want_grad, torch.float32)


def test_confident_rows_and_extreme_logits():
    """A student and a teacher holding almost all their mass on one class, and logits of ±1e4: finite, and the hard
    label's p_y - 1 ≈ -1e-9 formed without cancellation."""
    student = torch.zeros(2, VOCAB, dtype=torch.float64)
    student[0, 3] = 25.0
    student[1, :] = torch.linspace(-1e4, 1e4, VOCAB, dtype=torch.float64)
    teacher = student.flip(0).clone()
    spec = DistillSpec("forward_kl", 0.5, 1.0)
    scale = torch.ones(2, dtype=torch.float64)
    hard = HardLabels(torch.tensor([3, VOCAB - 1]), torch.ones(2, dtype=torch.float64))
    want_loss, _, want_grad, _ = _reference(spec, student, teacher, None, None, None, scale, hard)
    x = student.float().to(DEVICE)
    device_hard = HardLabels(hard.target.to(DEVICE), hard.weight.float().to(DEVICE))
    loss = dense_rows_(x, teacher.float().to(DEVICE), spec, scale.float().to(DEVICE), True, None, device_hard)
    assert torch.isfinite(loss).all() and torch.isfinite(x).all()
    torch.testing.assert_close(loss.double().cpu(), want_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.double().cpu(), want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tail", [None, "renormalize", "bucket"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_same_contract_as_the_chunked_rows(tail, divergence):
    """The Triton twins take the chunked kernels' arguments (hard labels included) and give their results."""
    from xent.kernels import distill

    spec = DistillSpec(divergence, 0.3, 2.0, tail=tail or "renormalize", **TRANSFORMS["scaled_capped"])
    student, teacher, indices, log_probs, valid, grad_scale, target, hard_weight = _problem()
    categories = teacher_categories(log_probs, valid, spec.tail, 2.0).float().to(DEVICE)
    results = []
    for kernels in ((distill.dense_rows_, distill.top_k_rows_), (dense_rows_, top_k_rows_)):
        x, entropy = student.float().to(DEVICE), torch.empty(ROWS, device=DEVICE)
        hard = HardLabels(target.to(DEVICE), hard_weight.float().to(DEVICE))
        scale = grad_scale.float().to(DEVICE)
        if tail is None:
            loss = kernels[0](x, teacher.float().to(DEVICE), spec, scale, True, entropy, hard)
        else:
            loss = kernels[1](x, indices.to(DEVICE), categories, valid.to(DEVICE), spec, scale, True, entropy, hard)
        results.append((loss, entropy, x))
    for got, want in zip(results[1], results[0], strict=True):
        assert_close(got, want, torch.float32)
