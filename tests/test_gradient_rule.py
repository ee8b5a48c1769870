"""The gradient rule: every implementation differentiates every tensor the reference (and PyTorch) differentiates,
with the reference's gradient, or refuses up front — first and second order, with and without autocast. The losses
and modules of the fused family are read from the registry (xent.losses.family.FAMILY) with the options of
tests/family_samples.py.

A future kernel that drops a gradient fails here: gradients are taken with ``allow_unused=True`` and a ``None`` is
an assertion error, never a silently skipped input.
"""

import importlib.util
import itertools

import pytest
import torch
import torch.nn.functional as F

import xent
from tests import family_samples
from tests.conftest import assert_close
from xent.losses.family import FAMILY

IMPLS = [
    "reference",
    "chunked",
    pytest.param(
        "triton", marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
    ),
]
REDUCTIONS = ("none", "mean", "sum")
# Options PyTorch has (compared with PyTorch too), and with xent's extras (compared with the reference only).
TORCH_OPTIONS = {"label_smoothing": 0.1}
XENT_OPTIONS = {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0}


def gradients(loss_fn, tensors, requires, seed=1):
    """The loss and the gradients of ``loss_fn(**tensors)`` with respect to the tensors named in ``requires``,
    contracted with a random ``grad_output`` for ``reduction="none"``. A missing gradient fails."""
    leaves = {
        name: value.detach().clone().requires_grad_(name in requires) if isinstance(value, torch.Tensor) else value
        for name, value in tensors.items()
    }
    loss = loss_fn(**leaves)
    generator = torch.Generator().manual_seed(seed)
    grad_output = torch.randn(loss.shape, generator=generator, dtype=torch.float64).to(loss.dtype)
    wanted = [leaves[name] for name in requires]
    grads = torch.autograd.grad(loss, wanted, grad_output, allow_unused=True)
    for name, grad in zip(requires, grads, strict=True):
        assert grad is not None, f"no gradient for {name}"
        assert grad.dtype == leaves[name].dtype, f"{name}'s gradient has dtype {grad.dtype}"
    return loss.detach(), dict(zip(requires, grads, strict=True))


def assert_same(actual, expected, dtype):
    assert_close(actual[0], expected[0], dtype)
    assert actual[1].keys() == expected[1].keys()
    for name in expected[1]:
        assert_close(actual[1][name], expected[1][name], dtype)


# --- cross_entropy ---------------------------------------------------------------------------------------------

CE_REQUIRES = {
    "indices": [("input",), ("weight",), ("input", "weight")],
    "probabilities": [("input",), ("target",), ("weight",), ("target", "weight"), ("input", "target", "weight")],
}


def _ce_problem(kind, dtype):
    generator = torch.Generator().manual_seed(0)
    input = (torch.randn(5, 7, 3, generator=generator, dtype=torch.float64) * 3).to(dtype)  # (N, C, d)
    if kind == "probabilities":
        target = torch.softmax(torch.randn(5, 7, 3, generator=generator, dtype=torch.float64), 1).to(dtype)
    else:
        target = torch.randint(7, (5, 3), generator=generator)
        target[::2, 0] = -100
    weight = (torch.rand(7, generator=generator, dtype=torch.float64) + 0.2).to(dtype)
    return {"input": input, "target": target, "weight": weight}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", [TORCH_OPTIONS, XENT_OPTIONS], ids=["torch-options", "xent-options"])
@pytest.mark.parametrize(
    ("kind", "requires"), [(kind, requires) for kind, subsets in CE_REQUIRES.items() for requires in subsets]
)
def test_cross_entropy_every_impl_differentiates_what_the_reference_does(
    impl, dtype, reduction, options, kind, requires
):
    if impl == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernel computes in float32")
    tensors = _ce_problem(kind, dtype)

    def loss_with(impl):
        return lambda **t: xent.cross_entropy(**t, reduction=reduction, impl=impl, **options)

    expected = gradients(loss_with("reference"), tensors, requires)
    assert_same(gradients(loss_with(impl), tensors, requires), expected, dtype)
    # PyTorch has these options, and differentiates a class weight only with probability targets.
    if options is TORCH_OPTIONS and (kind == "probabilities" or "weight" not in requires):
        torch_loss = lambda **t: F.cross_entropy(**t, reduction=reduction, **options)  # noqa: E731
        assert_same(gradients(torch_loss, tensors, requires), expected, dtype)


def test_pytorch_refuses_the_class_weight_gradient_that_xent_gives():
    """The documented difference: with class indices PyTorch raises for a weight that requires grad."""
    tensors = _ce_problem("indices", torch.float64)
    with pytest.raises(RuntimeError, match="weight"):
        gradients(F.cross_entropy, tensors, ("weight",))


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_inplace_backward_refuses_a_target_that_requires_grad(impl):
    pytest.importorskip("triton") if impl == "triton" else None
    tensors = _ce_problem("probabilities", torch.float32)
    with pytest.raises(ValueError, match="inplace_backward"):
        gradients(lambda **t: xent.cross_entropy(**t, impl=impl, inplace_backward=True), tensors, ("input", "target"))


def test_automatic_choice_is_the_reference_when_a_target_requires_grad():
    from tests.kernels.test_dispatch import automatic

    logits = torch.randn(1024, 512, requires_grad=True)  # above PyTorch's own path (tests/kernels/test_pytorch_path.py)
    assert automatic(logits) == "chunked"
    assert automatic(logits, weight=torch.ones(512, requires_grad=True)) == "reference"
    probabilities = torch.softmax(torch.randn(1024, 512), 1).requires_grad_()
    assert automatic(logits, target=probabilities) == "reference"


# --- linear_cross_entropy --------------------------------------------------------------------------------------

HEAD = ("input", "linear_weight", "linear_bias")
LINEAR_REQUIRES = {
    "indices": [HEAD, ("input",), ("linear_weight",), ("weight",), (*HEAD, "weight")],
    "probabilities": [HEAD, ("target",), ("weight",), (*HEAD, "target", "weight")],
}


def _linear_problem(kind, dtype, vocab=9):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "input": torch.randn(2, 5, 4, generator=generator, dtype=torch.float64).to(dtype),  # (B, T, D)
        "linear_weight": torch.randn(vocab, 4, generator=generator, dtype=torch.float64).to(dtype),
        "linear_bias": torch.randn(vocab, generator=generator, dtype=torch.float64).to(dtype),
        "weight": (torch.rand(vocab, generator=generator, dtype=torch.float64) + 0.2).to(dtype),
    }
    if kind == "probabilities":
        target = torch.softmax(torch.randn(2, 5, vocab, generator=generator, dtype=torch.float64), -1).to(dtype)
    else:
        target = torch.randint(vocab, (2, 5), generator=generator)
        target[0, ::2] = -100
    return {**tensors, "target": target}


def _torch_linear_cross_entropy(input, linear_weight, linear_bias, target, weight, **options):
    logits = F.linear(input, linear_weight, linear_bias)
    reduction = options.pop("reduction")
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1, *target.shape[2:]), weight=weight,
                           reduction=reduction, **options)  # fmt: skip
    return loss.view(target.shape[:2]) if reduction == "none" else loss


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    ("kind", "requires"), [(kind, requires) for kind, subsets in LINEAR_REQUIRES.items() for requires in subsets]
)
def test_linear_cross_entropy_every_impl_differentiates_what_the_reference_does(impl, dtype, reduction, kind, requires):
    if impl == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernel computes in float32")
    tensors = _linear_problem(kind, dtype)

    def loss_with(impl):
        return lambda **t: xent.linear_cross_entropy(
            **t, reduction=reduction, impl=impl, chunk_size=3, label_smoothing=0.1
        )

    expected = gradients(loss_with("reference"), tensors, requires)
    assert_same(gradients(loss_with(impl), tensors, requires), expected, dtype)
    if kind == "probabilities" or "weight" not in requires:
        torch_loss = lambda **t: _torch_linear_cross_entropy(**t, reduction=reduction, label_smoothing=0.1)  # noqa: E731
        assert_same(gradients(torch_loss, tensors, requires), expected, dtype)


# --- second order ----------------------------------------------------------------------------------------------


def _gradient_penalty(loss_fn, features, model_weight, target):
    """∂/∂model_weight of ‖∂L/∂logits‖², L = loss_fn(features @ model_weightᵀ, target): a gradient penalty."""
    model_weight = model_weight.detach().clone().requires_grad_()
    logits = features @ model_weight.t()
    (grad_logits,) = torch.autograd.grad(loss_fn(logits, target), logits, create_graph=True)
    (grad_weight,) = torch.autograd.grad(grad_logits.square().sum(), model_weight)
    return grad_weight


@pytest.mark.parametrize("kind", ["indices", "probabilities"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_second_order_equals_pytorch(kind, reduction):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    model_weight = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    if kind == "indices":
        target = torch.tensor([0, 4, -100, 2, 2, 1])
    else:
        target = torch.softmax(torch.randn(6, 5, generator=generator, dtype=torch.float64), 1)
    weight = torch.rand(5, generator=generator, dtype=torch.float64) + 0.5
    options = {"weight": weight, "reduction": reduction, "label_smoothing": 0.1}

    def summed(loss):
        return loss.sum() if reduction == "none" else loss

    ours = _gradient_penalty(
        lambda x, t: summed(xent.cross_entropy(x, t, impl="reference", **options)), features, model_weight, target
    )
    theirs = _gradient_penalty(lambda x, t: summed(F.cross_entropy(x, t, **options)), features, model_weight, target)
    assert_close(ours, theirs)


def test_reference_gradgradcheck_with_every_option():
    logits = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, -100, 1])
    weight = torch.rand(5, dtype=torch.float64) + 0.5
    options = {"weight": weight, "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 2.0, "impl": "reference"}
    assert torch.autograd.gradgradcheck(lambda x: xent.cross_entropy(x, target, **options), (logits,))
    head = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    hidden = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, w: xent.linear_cross_entropy(x, w, target, **options), (hidden, head))


@pytest.mark.parametrize("impl", ["chunked", "triton", None])
@pytest.mark.parametrize("kind", ["indices", "probabilities"])
def test_fused_kernels_refuse_second_order_and_name_the_reference(impl, kind):
    if impl == "triton":
        pytest.importorskip("triton")
    # > 262,144 logits: the automatic choice (impl=None) is the fused kernel for a training step, plain or not.
    rows = 1024 if impl is None else 6  # small shapes under the Triton interpreter
    features = torch.randn(rows, 16)
    model_weight = torch.randn(rows, 16)
    target = torch.randint(rows, (rows,)) if kind == "indices" else torch.softmax(torch.randn(rows, rows), 1)
    with pytest.raises(RuntimeError, match="impl='reference'"):
        _gradient_penalty(lambda x, t: xent.cross_entropy(x, t, impl=impl), features, model_weight, target)


@pytest.mark.parametrize("impl", ["chunked", "triton", None])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_linear_refuses_second_order(impl, reduction):
    if impl == "triton":
        pytest.importorskip("triton")
    hidden = torch.randn(6, 4, requires_grad=True)
    head = torch.randn(9, 4, requires_grad=True)
    loss = xent.linear_cross_entropy(hidden, head, torch.randint(9, (6,)), impl=impl, reduction=reduction)
    with pytest.raises(RuntimeError, match="impl='reference'"):
        torch.autograd.grad(loss.sum(), hidden, create_graph=True)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_fused_family_refuses_second_order_and_the_reference_gives_it(impl):
    if impl == "triton":
        pytest.importorskip("triton")
    C = family_samples.C
    head = family_samples.head_problem(torch.float32)
    hidden, weight, tokens = head["input"].requires_grad_(), head["linear_weight"], head["target"]
    logits = torch.randn(6, C, requires_grad=True)
    target = torch.tensor([0, 3, 1, 6, 2, 2])

    def focal(impl):
        return xent.focal_loss(logits, target, gamma=2.0, impl=impl), logits

    def ldam(impl):
        return xent.ldam_loss(logits, target, class_counts=family_samples.class_counts(C), impl=impl), logits

    def poly1_head(impl):
        return xent.linear_loss("poly1_cross_entropy", hidden, weight, tokens, impl=impl), hidden

    def distillation(impl):
        return xent.linear_distillation_loss(hidden, weight, hidden.detach(), weight, impl=impl), hidden

    for call in (focal, ldam, poly1_head, distillation):
        loss, leaf = call(impl)
        with pytest.raises(RuntimeError, match="impl='reference'"):
            torch.autograd.grad(loss, leaf, create_graph=True)
        loss, leaf = call("reference")
        (grad,) = torch.autograd.grad(loss, leaf, create_graph=True)
        assert grad.requires_grad  # a differentiable gradient: second order works there


# --- autocast --------------------------------------------------------------------------------------------------

AUTOCAST = {"device_type": "cpu", "dtype": torch.bfloat16}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["indices", "probabilities"])
def test_cross_entropy_under_autocast_is_pytorch_float32(impl, input_dtype, reduction, kind):
    tensors = _ce_problem(kind, input_dtype)
    tensors["weight"] = tensors["weight"].float()
    requires = ("input", "target") if kind == "probabilities" else ("input",)
    options = {"reduction": reduction, "label_smoothing": 0.1}
    with torch.autocast(**AUTOCAST):
        ours = gradients(lambda **t: xent.cross_entropy(**t, impl=impl, **options), tensors, requires)
        theirs = gradients(lambda **t: F.cross_entropy(**t, **options), tensors, requires)
    assert ours[0].dtype == theirs[0].dtype == torch.float32
    assert_close(ours[0], theirs[0], torch.float32)
    for name in requires:
        if input_dtype == torch.float32:
            assert_close(ours[1][name], theirs[1][name], torch.float32)
        else:  # one rounding to bfloat16 apart: the fused kernels store the gradient before grad_output scales it
            torch.testing.assert_close(ours[1][name], theirs[1][name])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_under_autocast_is_linear_then_cross_entropy(impl, reduction):
    tensors = _linear_problem("indices", torch.float32, vocab=33)
    tensors["weight"] = None
    options = {"reduction": reduction, "label_smoothing": 0.1}
    with torch.autocast(**AUTOCAST):
        ours = gradients(lambda **t: xent.linear_cross_entropy(**t, impl=impl, chunk_size=4, **options), tensors, HEAD)
        theirs = gradients(lambda **t: _torch_linear_cross_entropy(**t, **options), tensors, HEAD)
    assert ours[0].dtype == torch.float32
    # The head ran in bfloat16, as F.linear does under autocast: far from float32, at bfloat16's distance from it.
    lowered = {name: value.bfloat16() if name in HEAD else value for name, value in tensors.items()}
    in_bfloat16 = xent.linear_cross_entropy(**lowered, impl="reference", **options).float()
    in_float32 = xent.linear_cross_entropy(**tensors, impl="reference", **options)
    torch.testing.assert_close(ours[0], in_bfloat16, rtol=1e-2, atol=1e-2)
    assert not torch.equal(ours[0], in_float32)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-2, atol=1e-2)
    for name in HEAD:
        torch.testing.assert_close(ours[1][name], theirs[1][name], rtol=2e-2, atol=2e-2)


# --- the rest of the family, and the modules -------------------------------------------------------------------


def _with_options(function, options):
    return lambda **tensors: function(**tensors, **options)


def _family():
    """(name, loss(**tensors), tensors, differentiable names, PyTorch's loss or None): every loss of the registry
    with each of its samples over 4 classes, and the losses outside the fused family."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(*shape, generator=generator, dtype=torch.float64) * 0.8 + 0.1

    logits, target = randn(5, 4) * 2, torch.tensor([0, 3, -100, 1, 2])
    binary, binary_target = randn(5, 3) * 2, rand(5, 3)
    indices = {"input": logits, "target": target, "weight": rand(4)}
    cases = []
    for case in family_samples.cases():
        name, index = case.values
        options = family_samples.sample(name, index, 4)
        tensors, differentiable = dict(indices), ("input", "weight")
        if isinstance(options.get("alpha"), torch.Tensor):  # focal's per-class α: a tensor it differentiates too
            tensors["alpha"] = options.pop("alpha")
            differentiable += ("alpha",)
        cases.append((case.id, _with_options(FAMILY[name].function, options), tensors, differentiable, None))
    return [
        *cases,
        ("binary_cross_entropy_with_logits", xent.binary_cross_entropy_with_logits,
         {"input": binary, "target": binary_target, "weight": rand(5, 3), "pos_weight": rand(3)},
         ("input", "target", "weight", "pos_weight"), F.binary_cross_entropy_with_logits),
        ("binary_cross_entropy", xent.binary_cross_entropy,
         {"input": rand(5, 3), "target": binary_target, "weight": rand(5, 3)},
         ("input", "target", "weight"), F.binary_cross_entropy),
        ("sigmoid_focal_loss", lambda **t: xent.sigmoid_focal_loss(**t, gamma=1.5),
         {"input": binary, "target": binary_target}, ("input", "target"), None),
        ("distillation_loss", lambda **t: xent.distillation_loss(**t, temperature=2.0),
         {"student_logits": logits, "teacher": randn(5, 4)}, ("student_logits",), None),
        ("gan_discriminator_loss", lambda **t: xent.gan_discriminator_loss(**t, label_smoothing=0.1),
         {"real_logits": binary, "fake_logits": randn(5, 3)}, ("real_logits", "fake_logits"), None),
        ("gan_generator_loss", xent.gan_generator_loss, {"fake_logits": binary}, ("fake_logits",), None),
        ("vae_loss", lambda **t: xent.vae_loss(**t, beta=2.0),
         {"recon_logits": binary, "x": binary_target, "mu": randn(5, 2), "logvar": randn(5, 2)},
         ("recon_logits", "x", "mu", "logvar"), None),
    ]  # fmt: skip


CASES = {case[0]: case for case in _family()}


@pytest.mark.parametrize("name", list(CASES))
def test_family_first_and_second_order_gradients_are_exact(name):
    _, loss_fn, tensors, differentiable, _ = CASES[name]
    leaves = [tensors[key].detach().clone().requires_grad_() for key in differentiable]

    def call(*values):
        return loss_fn(**{**tensors, **dict(zip(differentiable, values, strict=True))})

    assert torch.autograd.gradcheck(call, leaves)
    assert torch.autograd.gradgradcheck(call, leaves)


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case[4] is not None])
@pytest.mark.parametrize("subset_size", [1, 2])
def test_binary_losses_differentiate_what_pytorch_does(name, subset_size):
    _, loss_fn, tensors, differentiable, torch_fn = CASES[name]
    # PyTorch differentiates the input and the target; weight and pos_weight it refuses (xent differentiates them).
    for requires in itertools.combinations([key for key in differentiable if key in ("input", "target")], subset_size):
        for reduction in REDUCTIONS:
            ours = gradients(lambda **t: loss_fn(**t, reduction=reduction), tensors, requires)  # noqa: B023
            theirs = gradients(lambda **t: torch_fn(**t, reduction=reduction), tensors, requires)  # noqa: B023
            assert_same(ours, theirs, torch.float64)


@pytest.mark.parametrize("name", list(CASES))
def test_family_under_autocast_computes_and_returns_float32(name):
    _, loss_fn, tensors, differentiable, _ = CASES[name]
    low = {key: value.to(torch.bfloat16) if value.is_floating_point() else value for key, value in tensors.items()}
    upcast = {key: value.float() if value.is_floating_point() else value for key, value in low.items()}
    with torch.autocast(**AUTOCAST):
        ours = gradients(loss_fn, low, differentiable)
    expected = gradients(loss_fn, upcast, differentiable)
    assert ours[0].dtype == torch.float32
    torch.testing.assert_close(ours[0], expected[0])
    for key in differentiable:
        torch.testing.assert_close(ours[1][key], expected[1][key].to(torch.bfloat16))


def test_distillation_refuses_a_teacher_that_requires_grad():
    student, teacher = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    with pytest.raises(ValueError, match=r"teacher requires grad.*teacher\.detach\(\)"):
        xent.distillation_loss(student, teacher)
    with pytest.raises(ValueError, match="teacher requires grad"):
        xent.nn.DistillationLoss()(student, teacher)
    xent.distillation_loss(student, teacher.detach()).backward()
    with torch.no_grad():
        xent.distillation_loss(student, teacher)
    assert student.grad is not None and teacher.grad is None


MODULE_CASES = [  # every module of the registry with each sample; cross-entropy's over probabilities too
    pytest.param(*case.values, kind, id=f"{case.id}-{kind}")
    for case in family_samples.cases()
    for kind in (["indices", "probabilities"] if FAMILY[case.values[0]].takes_probabilities else ["indices"])
]


@pytest.mark.parametrize(("name", "index", "kind"), MODULE_CASES)
def test_modules_differentiate_input_weight_and_target_like_their_functionals(name, index, kind):
    module, options = FAMILY[name].module, family_samples.sample(name, index, 7)
    tensors = _ce_problem(kind, torch.float64)
    requires = ("input", "target") if kind == "probabilities" else ("input",)
    weight = tensors.pop("weight").requires_grad_()
    loss_fn = module(weight=weight, **options)
    ours = gradients(lambda **t: loss_fn(t["input"], t["target"]), tensors, requires)
    functional = type(loss_fn).function
    expected = gradients(lambda **t: functional(t["input"], t["target"], weight=weight, **options), tensors, requires)
    assert_same(ours, expected, torch.float64)
    # the stored weight is differentiated through the module as through the function
    (grad_weight,) = torch.autograd.grad(loss_fn(tensors["input"], tensors["target"]), loss_fn.weight)
    (expected_weight,) = torch.autograd.grad(functional(tensors["input"], tensors["target"], weight=weight, **options),
                                             weight)  # fmt: skip
    assert_close(grad_weight, expected_weight)
