"""The custom operators of xent.kernels.ops: torch.library.opcheck on each (schema, autograd registration, fake
implementation against the real one, AOTAutograd with dynamic shapes), the value checks they run for a compiled
caller, and their placeholders and internal outputs."""

from __future__ import annotations

import pytest
import torch

import xent
from xent.core.rowloss import FocalTerm, RowLoss, SymmetricTerm, TargetTerm, make_term
from xent.kernels import distill, ops

M, C, D = 12, 9, 5


def _classes(rows, classes):
    target = torch.randint(0, classes, (rows,))
    target[::4] = -100
    return target


def _leaf(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


DESCRIPTIONS = {
    "plain": RowLoss(),
    "options": RowLoss(
        weight=torch.rand(C, dtype=torch.float64) + 0.5,
        label_smoothing=0.1,
        z_loss=1e-2,
        softcap=3.0,
        token_weight=torch.rand(M, dtype=torch.float64),
    ),
    "focal": RowLoss(term=FocalTerm(gamma=2.0), alpha=torch.rand(C, dtype=torch.float64)),
    "ldam": RowLoss(target_margin=torch.rand(C, dtype=torch.float64), logit_scale=4.0),
    "adjusted": RowLoss(class_offset=torch.randn(C, dtype=torch.float64), term=SymmetricTerm()),
}


def _row_args(options, reduction, *, probabilities=False, needs_grad=True):
    target = torch.softmax(torch.randn(M, C, dtype=torch.float64), 1) if probabilities else _classes(M, C)
    return (
        _leaf(M, C).requires_grad_(needs_grad),
        target,
        *ops.row_arguments(options),
        reduction,
        "chunked",
        needs_grad,
        False,
        False,
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", DESCRIPTIONS)
def test_row_loss_passes_opcheck(name, reduction):
    torch.library.opcheck(ops.row_loss, _row_args(DESCRIPTIONS[name], reduction))


def test_row_loss_passes_opcheck_with_probabilities_and_without_gradient():
    torch.library.opcheck(ops.row_loss, _row_args(RowLoss(label_smoothing=0.1), "mean", probabilities=True))
    torch.library.opcheck(ops.row_loss, _row_args(RowLoss(), "sum", needs_grad=False))


def _linear_args(options, reduction, bias=True):
    head = (_leaf(M, D), _leaf(C, D), _leaf(C) if bias else None, _classes(M, C))
    return (*head, *ops.row_arguments(options), reduction, "chunked", 5, torch.float64, [True, True, bias], False,
            False)  # fmt: skip


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", ["plain", "options", "focal"])
def test_linear_row_loss_and_its_backward_pass_opcheck(name, reduction):
    options = DESCRIPTIONS[name]
    torch.library.opcheck(ops.linear_row_loss, _linear_args(options, reduction))
    torch.library.opcheck(ops.linear_row_loss, _linear_args(options, reduction, bias=False))
    head = (torch.randn(M, D, dtype=torch.float64), torch.randn(C, D, dtype=torch.float64), None, _classes(M, C))
    backward = (torch.randn(M, dtype=torch.float64), *head, *ops.row_arguments(options), "chunked", 5, torch.float64,
                [True, True, False])  # fmt: skip
    torch.library.opcheck(ops.linear_row_loss_backward, backward)


@pytest.mark.parametrize("statistics", [[True, False, False, False], [False] * 4, [True] * 4])
def test_linear_log_probs_and_its_backward_pass_opcheck(statistics):
    head = (_leaf(M, D), _leaf(C, D), _leaf(C), _classes(M, C))
    torch.library.opcheck(ops.linear_log_probs, (*head, 0.5, 4.0, -100, 5, statistics, False))
    plain = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in head)
    lse = torch.randn(M, dtype=torch.float64)
    entropy = torch.rand(M, dtype=torch.float64) if statistics[0] else None
    grad_entropy = torch.randn(M, dtype=torch.float64) if statistics[0] else None
    backward = (torch.randn(M, dtype=torch.float64), grad_entropy, *plain, lse, entropy, 0.5, 4.0, -100, 5,
                [True, True, True])  # fmt: skip
    torch.library.opcheck(ops.linear_log_probs_backward, backward)


def _distill_args(teacher, reduction, with_entropy):
    head = (_leaf(M, D), _leaf(C, D), None)
    kept = torch.rand(M) > 0.25
    if teacher == "dense":
        teacher_tensors = (torch.randn(M, D, dtype=torch.float64), torch.randn(C, D, dtype=torch.float64), None,
                           None, None, None)  # fmt: skip
    else:
        k = 3
        indices = torch.stack([torch.randperm(C)[:k] for _ in range(M)])
        log_probs = torch.log_softmax(torch.randn(M, k + 1, dtype=torch.float64), 1)
        teacher_tensors = (None, None, None, indices, log_probs, torch.ones(M, k, dtype=torch.bool))
    hard = (torch.randint(0, C, (M,)), kept.double() * 0.5)
    spec = ("jsd", 0.5, 2.0, 1.0, None, 1.0, None, "renormalize", False)
    factor = torch.tensor(0.1, dtype=torch.float64)
    return (*head, *teacher_tensors, kept, factor, *hard, *spec, reduction, "chunked", 5, with_entropy,
            [True, True, False], False)  # fmt: skip


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("teacher", ["dense", "top_k"])
def test_linear_distillation_and_its_backward_pass_opcheck(teacher, reduction):
    args = _distill_args(teacher, reduction, with_entropy=reduction == "none")
    torch.library.opcheck(ops.linear_distillation, args)
    tensors = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args[:13])
    backward = (torch.randn(M, dtype=torch.float64), *tensors, *args[13:22], "chunked", 5, [True, True, False])
    torch.library.opcheck(ops.linear_distillation_backward, backward)


def test_a_description_crosses_the_operator_boundary_unchanged():
    for term in (TargetTerm(), FocalTerm(gamma=1.5), SymmetricTerm(alpha=0.2, beta=0.7, log_zero=-3.0)):
        assert make_term(term.name, term.parameters()) == term


# --- the value checks of a compiled call ---------------------------------------------------------------------------


def test_a_compiled_fused_call_checks_the_class_indices_when_it_runs():
    """The rule of xent._config: no host read is traced; the operators check the indices at run time, with the
    eager message, and only when the value-check setting asks for it."""
    logits = torch.randn(256, 256, requires_grad=True)
    target = torch.randint(0, 256, (256,))
    target[7] = 300
    compiled = torch.compile(xent.cross_entropy, fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match="target holds class index 300, outside"):
        xent.cross_entropy(logits, target)
    with pytest.raises(ValueError, match="target holds class index 300, outside"):
        compiled(logits, target)
    head = torch.randn(256, 8, requires_grad=True), torch.randn(256, 8, requires_grad=True)
    compiled_head = torch.compile(xent.linear_cross_entropy, fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match="target holds class index 300, outside"):
        compiled_head(*head, target)
    target[7] = 3
    torch.testing.assert_close(compiled(logits, target), xent.cross_entropy(logits, target))


def test_a_compiled_reference_call_stops_at_an_index_outside_the_classes():
    """Below the fused size the reference runs inside the compiled graph: the generated code's bounds check stops an
    index outside the classes (no silent value)."""
    logits = torch.randn(8, 5, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 4, 9, 1, 2])
    compiled = torch.compile(xent.cross_entropy, fullgraph=True)
    with pytest.raises(RuntimeError, match="out of bounds"):
        compiled(logits, target)


def test_second_backward_through_an_operator_is_refused():
    logits = torch.randn(256, 256, requires_grad=True)
    loss = xent.cross_entropy(logits, torch.randint(0, 256, (256,)), impl="chunked")
    (2 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated once"):
        loss.backward()


def test_statistics_without_a_gradient_do_not_require_grad():
    head = _leaf(M, D), _leaf(C, D)
    outputs = xent.linear_token_outputs(*head, _classes(M, C), outputs=xent.TokenOutputs._fields)
    assert outputs.log_probs.requires_grad and outputs.entropy.requires_grad
    assert not any(getattr(outputs, name).requires_grad for name in ("log_sum_sq_probs", "mean_logits", "is_top1"))


def test_the_distillation_spec_is_the_operators_nine_numbers():
    spec = distill.DistillSpec("jsd", 0.3, 2.0, 1.5, 30.0, 1.0, None, "renormalize", True)
    fields = ("divergence", "beta", "temperature", "logit_scale", "softcap", "teacher_logit_scale", "teacher_softcap",
              "tail", "finite_logits")  # fmt: skip
    assert distill.DistillSpec(*(getattr(spec, name) for name in fields)) == spec


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_compiled_fused_loss_scales_its_stored_gradients_by_any_grad_output(reduction):
    """Compiled, the stored gradients are scaled in place by the operator xent::scale_ (what lets Inductor skip the
    pass for a factor of 1): a factor other than 1, per row or per token too, gives eager's gradients."""
    logits = torch.randn(256, 256, dtype=torch.float64, requires_grad=True)
    hidden, weight = _leaf(256, 8), _leaf(300, 8)
    target = _classes(256, 256)
    factor = torch.rand(256 if reduction == "none" else (), dtype=torch.float64) + 0.5
    for function, inputs in ((xent.cross_entropy, (logits,)), (xent.linear_cross_entropy, (hidden, weight))):
        backend = "inductor" if reduction == "mean" else "aot_eager"  # Inductor runs the in-place product itself
        compiled = torch.compile(function, fullgraph=True, backend=backend)
        expected = torch.autograd.grad((function(*inputs, target, reduction=reduction) * factor).sum(), inputs)
        actual = torch.autograd.grad((compiled(*inputs, target, reduction=reduction) * factor).sum(), inputs)
        for got, want in zip(actual, expected, strict=True):
            torch.testing.assert_close(got, want)


def test_a_transposed_head_weight_gets_contiguous_gradients_from_the_fake_too():
    """The gradient buffers are new and contiguous whatever the weight's strides; the fake implementations say so
    (Inductor asserts the real strides against them)."""
    weight = torch.randn(D, C, dtype=torch.float64).t().requires_grad_()
    head = (_leaf(M, D), weight, None, _classes(M, C))
    args = (*head, *ops.row_arguments(RowLoss()), "mean", "chunked", 5, torch.float64, [True, True, False], False,
            False)  # fmt: skip
    torch.library.opcheck(ops.linear_row_loss, args)
    compiled = torch.compile(xent.linear_cross_entropy, fullgraph=True)
    x, target = torch.randn(M, D, requires_grad=True), _classes(M, C)
    w = torch.randn(D, C).t().requires_grad_()
    expected = torch.autograd.grad(xent.linear_cross_entropy(x, w, target), (x, w))
    for got, want in zip(torch.autograd.grad(compiled(x, w, target), (x, w)), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_an_unregistered_target_term_is_refused_not_rebuilt_as_another():
    class Doubled(TargetTerm):  # keeps cross-entropy's name: would come back as cross-entropy
        def value(self, u, smoothing, num_classes):
            return -2 * u

    with pytest.raises(TypeError, match=r"target term Doubled \(name 'cross_entropy'\) is not in .*TERMS"):
        ops.row_arguments(RowLoss(term=Doubled()))


def test_a_direct_caller_keeps_the_gradient_output_of_an_operator():
    """The operator's own backward scales out of place: the gradient output a caller holds is not changed."""
    args = _row_args(RowLoss(), "sum")
    loss, grad = ops.row_loss(*args)
    kept = grad.clone()
    (3 * loss).backward()
    assert torch.equal(grad, kept) and not grad.requires_grad
    torch.testing.assert_close(args[0].grad, 3 * kept)


def test_saved_tensor_hooks_do_not_see_the_stored_gradients():
    """Eagerly the gradients formed in the forward stay on the node, as the kernels always kept them: activation
    offloading (torch.autograd.graph.save_on_cpu and other saved-tensor hooks) does not copy them."""
    logits = torch.randn(256, 256, requires_grad=True)
    hidden, weight = torch.randn(64, 16, requires_grad=True), torch.randn(1024, 16, requires_grad=True)
    packed = []

    def pack(tensor):
        packed.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        xent.cross_entropy(logits, torch.randint(0, 256, (256,)), impl="chunked").backward()
        xent.linear_cross_entropy(hidden, weight, torch.randint(0, 1024, (64,))).backward()
    assert all(shape not in packed for shape in (logits.shape, weight.shape, hidden.shape))


def test_a_compiled_call_checks_the_indices_every_operator_reads():
    x, weight = torch.randn(16, 8, requires_grad=True), torch.randn(64, 8, requires_grad=True)
    target = torch.randint(0, 64, (16,))
    target[3] = 70
    teacher = {"teacher_input": torch.randn(16, 8), "teacher_linear_weight": torch.randn(64, 8)}
    calls = {
        "linear_log_probs": lambda x, w, t: xent.linear_log_probs(x, w, t)[0],
        "linear_token_outputs": lambda x, w, t: xent.linear_token_outputs(x, w, t).log_probs,
        "linear_distillation_loss": lambda x, w, t: xent.linear_distillation_loss(x, w, **teacher, target=t),
    }
    for call in calls.values():
        torch._dynamo.reset()
        with pytest.raises(ValueError, match="target holds class index 70"):
            torch.compile(call, fullgraph=True, backend="aot_eager")(x, weight, target)
        with pytest.raises(ValueError, match="target holds class index 70"):
            call(x, weight, target)


def test_an_explicit_fused_impl_that_would_recompute_the_reference_is_refused_under_compile():
    """Whole-graph compilation stops at the refusal (Dynamo wraps the ValueError, its message kept); without
    fullgraph the call falls back to eager, whose backward recomputes the reference."""
    logits = torch.randn(16, 8, requires_grad=True)
    probabilities = torch.softmax(torch.randn(16, 8), 1).requires_grad_()

    def loss(logits, target):
        return xent.cross_entropy(logits, target, impl="chunked")

    with pytest.raises(Exception, match=r"impl='chunked' under torch.compile cannot differentiate a target"):
        torch.compile(loss, fullgraph=True, backend="aot_eager")(logits, probabilities)
    torch._dynamo.reset()
    expected = torch.autograd.grad(loss(logits, probabilities), (logits, probabilities))
    compiled = torch.compile(loss, backend="aot_eager")(logits, probabilities)
    for got, want in zip(torch.autograd.grad(compiled, (logits, probabilities)), expected, strict=True):
        torch.testing.assert_close(got, want)
