"""The fused distillation of two linear heads (xent.kernels.distill): linear_distillation_loss through the chunked
and the Triton kernel against distillation_loss of the materialised logits, plus the hard-label cross-entropy."""

import math

import pytest
import torch

import xent
from tests.conftest import assert_as_accurate_as_the_reference, assert_close, in_float64
from tests.test_gradient_rule import gradients

C = 7


def distillation_problem(dtype):
    generator = torch.Generator().manual_seed(1)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)

    target = torch.randint(C, (2, 5), generator=generator)
    target[1, ::2] = -100
    return {
        "input": randn(2, 5, 6),
        "linear_weight": randn(C, 6, scale=0.7),
        "linear_bias": randn(C),
        "teacher_input": randn(2, 5, 9),
        "teacher_linear_weight": randn(C, 9, scale=0.5),
        "teacher_linear_bias": randn(C),
        "target": target,
    }


def _distillation_definition(reduction, temperature, hard_weight, with_target):
    """distillation_loss of the materialised logits, plus the hard-label cross-entropy, written out."""

    def loss(input, linear_weight, linear_bias, teacher_input, teacher_linear_weight, teacher_linear_bias, target):
        student = torch.nn.functional.linear(input, linear_weight, linear_bias).reshape(-1, C)
        teacher = torch.nn.functional.linear(teacher_input, teacher_linear_weight, teacher_linear_bias).reshape(-1, C)
        if with_target:  # ignored tokens drop out of the soft term too
            kept = target.reshape(-1) != -100
            rows = xent.distillation_loss(student, teacher.detach(), temperature=temperature, reduction="none")
            rows = torch.where(kept, rows, torch.zeros_like(rows))
            value = {"none": rows, "sum": rows.sum()}.get(reduction, rows.sum() / kept.sum())
        else:
            value = xent.distillation_loss(student, teacher.detach(), temperature=temperature, reduction=reduction)
        if with_target:
            hard = "mean" if reduction in ("batchmean", "mean") else reduction
            value = value + hard_weight * xent.cross_entropy(student, target.reshape(-1), reduction=hard)
        return value.view(target.shape) if reduction == "none" else value

    return loss


@pytest.mark.parametrize("impl", ["chunked", "triton"])
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
@pytest.mark.parametrize("with_target", [False, True])
def test_linear_distillation_equals_distillation_of_the_materialised_logits(impl, reduction, with_target):
    if impl == "triton":
        pytest.importorskip("triton")
    dtype = torch.float64 if impl == "chunked" else torch.float32
    tensors = distillation_problem(dtype)
    options = {"temperature": 2.0, "reduction": reduction}
    if with_target:
        options["hard_weight"] = 0.3
    else:
        tensors["target"] = tensors["target"].clamp_min(0)  # only its shape matters
    requires = ("input", "linear_weight", "linear_bias")
    definition = _distillation_definition(reduction, 2.0, 0.3, with_target)
    expected = gradients(definition, tensors, requires)

    def fused(**t):
        target = t.pop("target")
        if not with_target:
            target = None
        return xent.linear_distillation_loss(**t, target=target, impl=impl, chunk_size=3, **options)

    actual = gradients(fused, tensors, requires)
    if dtype == torch.float64:
        assert_close(actual[0], expected[0], dtype)
        for key in requires:
            assert_close(actual[1][key], expected[1][key], dtype)
    else:
        exact = gradients(definition, in_float64(tensors), requires)
        assert_as_accurate_as_the_reference(actual, expected, exact, requires)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("masked", ["student", "teacher", "both", "neither"])
def test_a_masked_class_has_probability_zero(divergence, masked):
    """A class masked with a -inf bias has probability 0, whichever head masks it: its terms are 0 (no 0 · -inf),
    the fused rows clamping their log-probabilities then (and skipping the clamp when every logit is finite). A
    divergence that is infinite — the forward KL when the student masks a class the teacher does not, the reverse KL
    the other way round — comes out enormous (log 0 taken as the dtype's lowest number), never NaN."""
    tensors = distillation_problem(torch.float64)
    del tensors["target"]
    for role, name in (("student", "linear_bias"), ("teacher", "teacher_linear_bias")):
        if masked in (role, "both"):
            tensors[name] = tensors[name].clone().index_fill_(0, torch.tensor([2]), -math.inf)
    leaves = {name: t.clone().requires_grad_(name in ("input", "linear_weight")) for name, t in tensors.items()}
    fused = xent.linear_distillation_loss(
        **leaves, divergence=divergence, temperature=2.0, impl="chunked", chunk_size=4
    )
    gradients = torch.autograd.grad(fused, (leaves["input"], leaves["linear_weight"]))
    assert all(torch.isfinite(g).all() for g in gradients)
    if (divergence, masked) in (("forward_kl", "student"), ("reverse_kl", "teacher")):
        assert fused > 1e300
        return
    student = torch.nn.functional.linear(leaves["input"], leaves["linear_weight"], leaves["linear_bias"]) / 2.0
    teacher = (
        torch.nn.functional.linear(
            tensors["teacher_input"], tensors["teacher_linear_weight"], tensors["teacher_linear_bias"]
        )
        / 2.0
    )
    p, q = student.softmax(-1), teacher.softmax(-1)
    m = 0.5 * (p + q)

    def log(x):  # log x, 0 where x = 0 (a constant mask: no 0 · inf in the reference's own gradient)
        return torch.log(x.masked_fill(x == 0, 1.0))

    def kl(a, b):  # Σ a log(a / b), 0 where a = 0
        return (a * (log(a) - log(b))).sum(-1)

    rows = {"forward_kl": lambda: kl(q, p), "reverse_kl": lambda: kl(p, q)}.get(
        divergence, lambda: 0.5 * kl(q, m) + 0.5 * kl(p, m)
    )()
    expected = 4.0 * rows.mean()
    assert_close(fused, expected, torch.float64)
    for got, want in zip(
        gradients, torch.autograd.grad(expected, (leaves["input"], leaves["linear_weight"])), strict=True
    ):
        assert_close(got, want, torch.float64)
