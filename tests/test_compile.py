"""torch.compile: every public loss and every ``linear_*`` function compiles with ``fullgraph=True`` (no graph
break anywhere in xent) under its default options and gives eager's values and gradients; the fused kernels are
custom operators that pass ``torch.library.opcheck``; the value checks follow the rule of ``xent._config`` under
compilation.

Most calls compile with the ``aot_eager`` backend — Dynamo's whole-graph capture and AOTAutograd's fake-tensor and
functionalisation passes, what fullgraph and the custom operators are about — and the central ones (fused
cross-entropy on logits and on a head) with Inductor, whose code generation costs seconds a call. Sizes are chosen
so that the automatic choice takes the fused kernels (65,536 logits and more) and, for the logits losses, the
reference too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch

import xent
from tests.conftest import assert_close

torch._dynamo.config.cache_size_limit = 64  # one compiled graph per case of the table


def _tensor(*shape, dtype=torch.float64, grad=False, **kwargs):
    return torch.randn(*shape, dtype=dtype, **kwargs).requires_grad_(grad)


def _classes(rows, classes, ignore_every=5):
    target = torch.randint(0, classes, (rows,))
    target[::ignore_every] = -100
    return target


def _head(n=64, d=16, v=1024):
    """A linear head's tensors: hidden states ``(n, d)``, weight ``(v, d)``, class indices with ignored tokens."""
    return {"input": _tensor(n, d, grad=True), "linear_weight": _tensor(v, d, grad=True) / 4, "target": _classes(n, v)}


def _logits(rows, classes=256):
    return {"input": _tensor(rows, classes, grad=True), "target": _classes(rows, classes)}


def _counts(classes=256):
    return torch.arange(1, classes + 1, dtype=torch.float64)


def _sequences(b=4, t=6):
    mask = torch.ones(b, t)
    mask[:, -2:] = 0
    return mask


@dataclasses.dataclass
class Case:
    """One compiled call: ``function(*args, **kwargs)`` with ``args``/``kwargs`` from ``make()``; ``outputs`` reads
    the tensors to compare (the loss first, whose sum is differentiated); Inductor when ``inductor``."""

    name: str
    function: Callable[..., object]
    make: Callable[[], tuple[tuple, dict]]
    outputs: Callable[[object], list[torch.Tensor]] = lambda result: [result]
    inductor: bool = False


def _keywords(**kwargs):
    return lambda: ((), {k: v() if callable(v) else v for k, v in kwargs.items()})


def _family(function, rows, **options):
    def make():
        problem = _logits(rows)
        return (problem["input"], problem["target"]), options if not callable(options.get("class_counts")) else {
            **options,
            "class_counts": options["class_counts"](),
        }

    return make


def _head_call(**options):
    def make():
        head = _head()
        return (head["input"], head["linear_weight"], head["target"]), options

    return make


def _fields(*names):
    return lambda result: [getattr(result, name) for name in names]


def _policy():
    b, t = 4, 6
    return (_tensor(b, t, grad=True) - 2, torch.randn(b, dtype=torch.float64), _sequences(b, t).double()), {}


def _preference():
    return (_tensor(8, grad=True) - 3, _tensor(8, grad=True) - 4), {
        "ref_chosen_log_probs": _tensor(8) - 3,
        "ref_rejected_log_probs": _tensor(8) - 4,
    }


def _kto():
    labels = torch.tensor([True, False] * 4)
    kl = {"kl_log_probs": _tensor(8) - 3, "ref_kl_log_probs": _tensor(8) - 3}
    return (_tensor(8, grad=True) - 3, _tensor(8) - 3, labels), kl


def _distill_logits():
    return (_tensor(64, 256, grad=True), _tensor(64, 256)), {}


def _linear_distill():
    head = _head()
    return (head["input"], head["linear_weight"], _tensor(64, 16), _tensor(1024, 16) / 4), {}


def _linear_policy():
    b, t, d, v = 4, 6, 16, 512
    return (
        _tensor(b, t, d, grad=True),
        _tensor(v, d, grad=True) / 4,
        torch.randint(0, v, (b, t)),
        torch.randn(b, dtype=torch.float64),
        _sequences(b, t).double(),
    ), {}


def _binary():
    return (torch.rand(32, 5, dtype=torch.float64).requires_grad_(), torch.rand(32, 5, dtype=torch.float64)), {}


def _binary_logits():
    return (_tensor(32, 5, grad=True), torch.rand(32, 5, dtype=torch.float64)), {}


def _vae():
    return (_tensor(8, 20, grad=True), torch.rand(8, 20, dtype=torch.float64), _tensor(8, 4, grad=True),
            _tensor(8, 4, grad=True)), {}  # fmt: skip


def _gan_discriminator():
    return (_tensor(8, grad=True), _tensor(8, grad=True)), {}


def _wpo():  # the weights carry no gradient: compared as values
    b, t = 4, 6
    return (_tensor(b, t) - 2, _tensor(b, t) - 3, _sequences(b, t).double()), {}


def _rollout():
    b, t = 4, 6
    return (_tensor(b, t) - 2, _tensor(b, t) - 2, _sequences(b, t).double()), {}


CASES = [
    # the logits losses, on the fused kernel (65,536 logits) and on the reference (fewer)
    *[
        case
        for rows, tag in ((256, "fused"), (16, "reference"))
        for case in (
            Case(f"cross_entropy[{tag}]", xent.cross_entropy, _family(xent.cross_entropy, rows), inductor=rows > 16),
            Case(f"focal_loss[{tag}]", xent.focal_loss, _family(xent.focal_loss, rows)),
            Case(f"poly1_cross_entropy[{tag}]", xent.poly1_cross_entropy, _family(xent.poly1_cross_entropy, rows)),
            Case(
                f"generalized_cross_entropy[{tag}]",
                xent.generalized_cross_entropy,
                _family(xent.generalized_cross_entropy, rows),
            ),
            Case(
                f"symmetric_cross_entropy[{tag}]",
                xent.symmetric_cross_entropy,
                _family(xent.symmetric_cross_entropy, rows),
            ),
            Case(
                f"logit_adjusted_cross_entropy[{tag}]",
                xent.logit_adjusted_cross_entropy,
                _family(xent.logit_adjusted_cross_entropy, rows, class_counts=_counts),
            ),
            Case(
                f"balanced_softmax_cross_entropy[{tag}]",
                xent.balanced_softmax_cross_entropy,
                _family(xent.balanced_softmax_cross_entropy, rows, class_counts=_counts),
            ),
            Case(f"ldam_loss[{tag}]", xent.ldam_loss, _family(xent.ldam_loss, rows, class_counts=_counts)),
        )
    ],
    Case("sigmoid_focal_loss", xent.sigmoid_focal_loss, _binary_logits),
    Case("binary_cross_entropy", xent.binary_cross_entropy, _binary),
    Case("binary_cross_entropy_with_logits", xent.binary_cross_entropy_with_logits, _binary_logits),
    Case("distillation_loss", xent.distillation_loss, _distill_logits),
    Case("gan_discriminator_loss", xent.gan_discriminator_loss, _gan_discriminator),
    Case("gan_generator_loss", xent.gan_generator_loss, lambda: ((_tensor(8, grad=True),), {})),
    Case("vae_loss", xent.vae_loss, _vae),
    Case("policy_loss", xent.policy_loss, _policy, _fields("loss", "per_token_loss", "clip_ratio_region")),
    Case("preference_loss", xent.preference_loss, _preference, _fields("loss", "chosen_rewards")),
    Case("kto_loss", xent.kto_loss, _kto, _fields("loss", "rewards", "kl")),
    Case("wpo_weights", xent.wpo_weights, _wpo),
    Case("rollout_importance_ratio", xent.rollout_importance_ratio, _rollout),
    # the linear heads: always fused
    Case("linear_cross_entropy", xent.linear_cross_entropy, _head_call(), inductor=True),
    Case(
        "linear_loss(focal_loss)",
        lambda *a, **k: xent.linear_loss(xent.focal_loss, *a, **k),
        _head_call(),
    ),
    Case(
        "linear_loss('ldam_loss')",
        lambda *a, **k: xent.linear_loss("ldam_loss", *a, **k),
        _head_call(class_counts=torch.arange(1, 1025, dtype=torch.float64)),
    ),
    Case("linear_log_probs", xent.linear_log_probs, _head_call(), lambda result: list(result)),
    Case("linear_token_outputs", xent.linear_token_outputs, _head_call(), _fields("log_probs", "entropy")),
    Case(
        "linear_sequence_log_probs",
        xent.linear_sequence_log_probs,
        lambda: ((_tensor(4, 6, 16, grad=True), _tensor(512, 16, grad=True) / 4, torch.randint(0, 512, (4, 6))), {}),
        _fields("sum", "length"),
    ),
    Case("linear_distillation_loss", xent.linear_distillation_loss, _linear_distill),
    Case("linear_distillation", xent.linear_distillation, _linear_distill, _fields("loss")),
    Case("linear_policy_loss", xent.linear_policy_loss, _linear_policy, _fields("loss")),
]


def _run(function, args, kwargs, outputs):
    """The outputs and the gradients of every input that requires grad, of the sum of the first output."""
    leaves = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
    result = outputs(function(*leaves, **kwargs))
    wanted = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.requires_grad]
    grads = torch.autograd.grad(result[0].sum(), wanted) if wanted else ()
    assert not wanted or result[0].requires_grad
    return [r.detach() for r in result], list(grads)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_compiles_whole_and_equals_eager(case):
    torch._dynamo.reset()
    args, kwargs = case.make()
    compiled = torch.compile(case.function, fullgraph=True, backend="inductor" if case.inductor else "aot_eager")
    expected = _run(case.function, args, kwargs, case.outputs)
    actual = _run(compiled, args, kwargs, case.outputs)
    for got, want in zip(actual[0] + actual[1], expected[0] + expected[1], strict=True):
        assert_close(got, want, torch.float64)


def test_a_compiled_linear_head_with_a_target_that_requires_grad_takes_the_reference():
    """Probability targets that require grad: the fused backward would recompute the reference for their gradient,
    which a traced backward cannot; compiled, the automatic choice is the reference, with eager's gradients."""
    head = _head(n=16, v=32)
    target = torch.softmax(torch.randn(16, 32, dtype=torch.float64), 1).requires_grad_()

    def loss(input, linear_weight, target):
        return xent.linear_cross_entropy(input, linear_weight, target)

    args = (head["input"], head["linear_weight"], target)
    expected = _run(loss, args, {}, lambda result: [result])
    actual = _run(torch.compile(loss, fullgraph=True, backend="aot_eager"), args, {}, lambda result: [result])
    for got, want in zip(actual[0] + actual[1], expected[0] + expected[1], strict=True):
        assert_close(got, want, torch.float64)


MODULES = [
    (lambda: xent.nn.CrossEntropyLoss(label_smoothing=0.1), _family(None, 256)),
    (lambda: xent.nn.FocalLoss(gamma=1.5), _family(None, 256)),
    (lambda: xent.nn.LDAMLoss(class_counts=_counts()), _family(None, 256)),
    (lambda: xent.nn.LinearCrossEntropyLoss(z_loss=1e-3), _head_call()),
    (lambda: xent.nn.LinearLoss(xent.focal_loss, gamma=1.5), _head_call()),
    (lambda: xent.nn.SigmoidFocalLoss(), _binary_logits),
    (lambda: xent.nn.DistillationLoss(temperature=2.0), _distill_logits),
]


@pytest.mark.parametrize(
    ("construct", "make"),
    MODULES,
    ids=[
        "CrossEntropyLoss",
        "FocalLoss",
        "LDAMLoss",
        "LinearCrossEntropyLoss",
        "LinearLoss",
        "SigmoidFocalLoss",
        "DistillationLoss",
    ],
)
def test_modules_compile_whole_and_equal_eager(construct, make):
    """The xent.nn modules hold their options and call the functionals: compiled whole, eager's values and
    gradients."""
    torch._dynamo.reset()
    module = construct()
    args, kwargs = make()
    expected = _run(module, args, kwargs, lambda result: [result])
    actual = _run(torch.compile(module, fullgraph=True, backend="aot_eager"), args, kwargs, lambda result: [result])
    for got, want in zip(actual[0] + actual[1], expected[0] + expected[1], strict=True):
        assert_close(got, want, torch.float64)


# --- the fused paths over the parity grid: options × reductions × dtypes × which inputs require grad ---------------

_FULL = {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0}
GRID = [
    ("cross_entropy", xent.cross_entropy, False, _FULL),
    ("focal_loss", xent.focal_loss, False, {"gamma": 1.5}),
    ("linear_cross_entropy", xent.linear_cross_entropy, True, _FULL),
    ("linear_loss(focal_loss)", lambda *a, **k: xent.linear_loss(xent.focal_loss, *a, **k), True, {"gamma": 1.5}),
]


@pytest.mark.parametrize("weight_requires_grad", [False, True], ids=["input", "input+weight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("name", "function", "head", "options"), GRID, ids=[row[0] for row in GRID])
def test_compiled_fused_losses_equal_eager_over_the_grid(name, function, head, options, reduction, dtype,
                                                         weight_requires_grad):  # fmt: skip
    """Compiled, the fused kernels' operators give eager's loss and every gradient, with a class weight (that
    requires grad too: the reference's way, compiled) and ignored targets, for every reduction and dtype; a
    non-unit grad_output reaches the stored gradients."""
    torch._dynamo.reset()
    rows, classes = (64, 1024) if head else (256, 256)
    weight = (torch.rand(classes, dtype=dtype) + 0.5).requires_grad_(weight_requires_grad)
    inputs = [_head(rows, 16, classes)["input"].to(dtype)] if head else [_tensor(rows, classes, dtype=dtype)]
    if head:
        inputs.append((_tensor(classes, 16) / 4).to(dtype))
    inputs = [tensor.detach().requires_grad_() for tensor in inputs]
    target = _classes(rows, classes)
    leaves = [*inputs, weight] if weight_requires_grad else inputs

    def loss(*tensors):
        return function(*tensors, target, weight=weight, reduction=reduction, **options)

    def run(call):
        values = call(*inputs)
        factor = torch.linspace(0.5, 2.0, values.numel(), dtype=dtype).reshape(values.shape)
        return values.detach(), torch.autograd.grad((values * factor).sum(), leaves)

    expected = run(loss)
    actual = run(torch.compile(loss, fullgraph=True, backend="aot_eager"))
    for got, want in zip((actual[0], *actual[1]), (expected[0], *expected[1]), strict=True):
        assert_close(got, want, dtype)


def test_second_order_through_a_compiled_fused_loss_is_refused():
    """AOTAutograd refuses a double backward of a compiled graph: a second derivative is never silently missing."""
    logits = torch.randn(256, 256, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(xent.cross_entropy, fullgraph=True, backend="aot_eager")
    (grad,) = torch.autograd.grad(compiled(logits, _classes(256, 256)), logits, create_graph=True)
    with pytest.raises(RuntimeError, match="does not currently support double backward"):
        grad.sum().backward()
