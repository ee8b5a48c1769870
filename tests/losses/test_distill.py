"""Knowledge distillation (xent.losses.distill) against its formula (Hinton et al.), its identities, gradient
and errors, and the errors of the fused distillation of two linear heads."""

import pytest
import torch
import torch.nn.functional as F

import xent
from tests.conftest import assert_close
from tests.kernels.test_distill import C as HEAD_CLASSES
from tests.kernels.test_distill import distillation_problem
from tests.losses.formulas import C, N, check, problem


@pytest.mark.parametrize("reduction", ["none", "batchmean", "mean", "sum"])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("spatial", [False, True])
def test_distillation_matches_formula(reduction, temperature, spatial):
    student, _ = problem(spatial=spatial)
    teacher = torch.randn_like(student.detach()) * 2
    ours = xent.distillation_loss(student, teacher, temperature=temperature, reduction=reduction)
    q = torch.softmax(teacher / temperature, 1)
    log_p = torch.log_softmax(student / temperature, 1)
    kl = (q * (q.log() - log_p)).sum(1) * temperature**2
    expected = {"none": kl, "batchmean": kl.sum() / N, "mean": kl.mean(), "sum": kl.sum()}[reduction]
    check(ours, expected, (student,))
    torch_kl = F.kl_div(log_p, q, reduction="batchmean") * temperature**2 if not spatial else None
    if reduction == "batchmean" and torch_kl is not None:
        assert_close(ours, torch_kl)


def test_distillation_identities():
    student, target = problem(ignore=False)
    one_hot = F.one_hot(target, C).double()
    check(
        xent.distillation_loss(student, one_hot, teacher_is_probs=True),
        xent.cross_entropy(student, target) - 0.0,
        (student,),
    )
    teacher_logits = torch.randn(N, C, dtype=torch.float64)
    from_probs = xent.distillation_loss(
        student, torch.softmax(teacher_logits, 1), temperature=3.0, teacher_is_probs=True
    )
    from_logits = xent.distillation_loss(student, teacher_logits, temperature=3.0)
    assert_close(from_probs, from_logits)


GRADCHECKED = {
    "distill": lambda x, t: xent.distillation_loss(x, torch.linspace(-2, 2, x.numel()).view_as(x), temperature=2.0),
}


@pytest.mark.parametrize("name", list(GRADCHECKED))
def test_gradcheck(name):
    logits = torch.randn(5, C, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, -100, 5, 1])
    assert torch.autograd.gradcheck(lambda x: GRADCHECKED[name](x, target), (logits,))


def test_a_teacher_distribution_without_mass_is_rejected():
    teacher = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"distribution at \(1,\) sums to 0"):
        xent.distillation_loss(torch.randn(2, 3), teacher, teacher_is_probs=True)  # was NaN


def test_linear_distillation_refuses_a_teacher_that_requires_grad_and_mismatched_heads():
    tensors = distillation_problem(torch.float64)
    del tensors["target"]
    teacher = tensors["teacher_linear_weight"].clone().requires_grad_()
    with pytest.raises(ValueError, match=r"teacher_linear_weight requires grad.*detach\(\)"):
        xent.linear_distillation_loss(**{**tensors, "teacher_linear_weight": teacher})
    with pytest.raises(ValueError, match="share the vocabulary"):
        xent.linear_distillation_loss(
            **{
                **tensors,
                "teacher_linear_weight": torch.randn(HEAD_CLASSES + 1, 9, dtype=torch.float64),
                "teacher_linear_bias": None,
            }
        )
    with pytest.raises(ValueError, match=r"teacher_input has shape \(2, 4, 9\)"):
        xent.linear_distillation_loss(**{**tensors, "teacher_input": torch.randn(2, 4, 9, dtype=torch.float64)})
    with pytest.raises(ValueError, match="temperature must be in"):
        xent.linear_distillation_loss(**tensors, temperature=0.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        xent.linear_distillation_loss(**tensors, reduction="average")


# --- errors ----------------------------------------------------------------------------------------------------

LOGITS, TARGET = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: xent.distillation_loss(LOGITS, LOGITS, temperature=0.0),
            ValueError,
            r"temperature must be in \(0, inf\), got 0",
        ),
        (
            lambda: xent.distillation_loss(LOGITS, LOGITS[:2]),
            ValueError,
            r"teacher has shape \(2, 3\) but student_logits has shape \(4, 3\)",
        ),
        (lambda: xent.distillation_loss(LOGITS, LOGITS, reduction="avg"), ValueError, r"'batchmean'"),
    ],
)
def test_bad_hyperparameters(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: xent.distillation_loss(torch.zeros(()), torch.zeros(())), r"^student_logits must have a class dim"),
        (  # the teacher's head is checked by the same code as the student's, under the teacher's names
            lambda: xent.linear_distillation_loss(
                torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, 2), torch.zeros(5, 3)
            ),
            r"^teacher_linear_weight has shape \(5, 3\) but teacher_input has shape \(3, 2\)",
        ),
        (
            lambda: xent.linear_distillation_loss(
                torch.zeros(3, 4),
                torch.zeros(5, 4),
                torch.zeros(3, 2),
                torch.zeros(5, 2),
                teacher_linear_bias=torch.zeros(6),
            ),
            r"^teacher_linear_bias must have shape \(5,\)",
        ),
    ],
)
def test_errors_name_the_callers_argument(call, message):
    """Found by the fuzz layer: each error names the argument as the caller wrote it."""
    with pytest.raises((ValueError, TypeError), match=message):
        call()
