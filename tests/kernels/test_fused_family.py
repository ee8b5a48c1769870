"""Every index-target loss of the family through the fused kernels, against its own plain definition
(``impl="reference"``): values and gradients for every option, reduction, dtype and ``grad_output``."""

import pytest
import torch

import xent
from tests.conftest import assert_close
from tests.test_gradient_rule import gradients
from xent.core import reference, rowloss
from xent.core.rowloss import RowLoss
from xent.kernels import chunked

C = 7
COUNTS = torch.tensor([40.0, 20.0, 9.0, 5.0, 3.0, 2.0, 1.0])

LOSSES = {
    "focal-γ0": (xent.focal_loss, {"gamma": 0.0}),
    "focal-γ0.5-α": (xent.focal_loss, {"gamma": 0.5, "alpha": 0.25}),
    "focal-γ2-α-per-class": (xent.focal_loss, {"gamma": 2.0, "alpha": torch.linspace(0.2, 1.0, C)}),
    "poly1": (xent.poly1_cross_entropy, {"epsilon": 2.0}),
    "poly1-smoothing": (xent.poly1_cross_entropy, {"epsilon": -0.5, "label_smoothing": 0.1}),
    "gce": (xent.generalized_cross_entropy, {"q": 0.5}),
    "sce": (xent.symmetric_cross_entropy, {"alpha": 0.5, "beta": 1.0, "log_zero": -4.0}),
    "logit-adjusted": (xent.logit_adjusted_cross_entropy, {"class_counts": COUNTS, "tau": 1.5}),
    "logit-adjusted-smoothing": (
        xent.logit_adjusted_cross_entropy,
        {"class_counts": COUNTS, "tau": 1.0, "label_smoothing": 0.2},
    ),
    "balanced-softmax": (xent.balanced_softmax_cross_entropy, {"class_counts": COUNTS}),
    "ldam": (xent.ldam_loss, {"class_counts": COUNTS, "scale": 2.0}),
    "ldam-s30": (xent.ldam_loss, {"class_counts": COUNTS, "max_margin": 0.3}),
    "cross-entropy-token-weighted": (xent.cross_entropy, {"label_smoothing": 0.1, "z_loss": 1e-2}),
}


def _problem(dtype, weighted, token_weighted):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "input": (torch.randn(4, C, 5, generator=generator, dtype=torch.float64) * 3).to(dtype),  # (N, C, d)
        "target": torch.randint(C, (4, 5), generator=generator),
    }
    tensors["target"][1, ::2] = -100
    if weighted:
        tensors["weight"] = (torch.rand(C, generator=generator, dtype=torch.float64) + 0.2).to(dtype)
    if token_weighted:
        tensors["token_weight"] = torch.rand(4, 5, generator=generator, dtype=torch.float64).to(dtype)
    return tensors


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize(("weighted", "token_weighted"), [(False, False), (True, False), (True, True)])
def test_chunked_equals_the_plain_definition(name, dtype, reduction, weighted, token_weighted, impl="chunked"):
    loss_fn, options = LOSSES[name]
    tensors = _problem(dtype, weighted, token_weighted)
    if loss_fn is xent.ldam_loss:  # LDAM's logits are cosine similarities, scaled by s
        tensors["input"] = torch.tanh(tensors["input"])
    requires = ("input", "weight") if weighted else ("input",)

    def run(impl, tensors=tensors):
        return gradients(lambda **t: loss_fn(**t, reduction=reduction, impl=impl, **options), tensors, requires)

    expected = run("reference")
    actual = run(impl)
    if dtype == torch.float64:
        assert_close(actual[0], expected[0], dtype)
        for key in requires:
            assert_close(actual[1][key], expected[1][key], dtype)
        return
    exact = run(
        "reference", {key: value.double() if value.is_floating_point() else value for key, value in tensors.items()}
    )
    assert_as_accurate_as_the_reference(actual, expected, exact, requires)


def _in_float64(tensors):
    return {key: value.double() if value.is_floating_point() else value for key, value in tensors.items()}


def assert_as_accurate_as_the_reference(actual, expected, exact, requires):
    """float32 results as close to the exact (float64) ones as the float32 reference, within 2e-5 relative. LDAM's
    s = 30 amplifies float32 rounding beyond that, in the reference as in the kernels."""
    for got, reference_value, truth in [(actual[0], expected[0], exact[0])] + [
        (actual[1][key], expected[1][key], exact[1][key]) for key in requires
    ]:
        reference_error = (reference_value.double() - truth).abs().max().item()
        tolerance = max(2e-5 * truth.abs().max().item() + 2e-6, 1.5 * reference_error)
        assert (got.double() - truth).abs().max().item() <= tolerance


@pytest.mark.parametrize("name", ["focal-γ2-α-per-class", "ldam", "logit-adjusted-smoothing"])
@pytest.mark.parametrize("block_rows", [1, 3])
def test_blocks_that_do_not_divide_the_rows(name, block_rows, monkeypatch):
    monkeypatch.setattr(chunked, "rows_per_block", lambda num_classes, device=None: block_rows)
    test_chunked_equals_the_plain_definition(name, torch.float64, "none", True, True)


def test_the_description_reference_equals_each_plain_definition():
    """xent.core.reference computes any description; it must agree with every loss's own definition, which is what
    the fused kernels' extra gradients (class weights) are recomputed with."""
    tensors = _problem(torch.float64, True, True)
    for name, (loss_fn, options) in LOSSES.items():
        captured = {}

        def capture(impl, logits, target, description, reduction, captured=captured, **_):
            captured.update(logits=logits, target=target, options=description)
            return torch.zeros(())

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("xent.losses.softmax.dispatch_cross_entropy", capture)
            loss_fn(**tensors, impl="chunked", reduction="sum", **options)
        ours = reference.reference_cross_entropy(captured["logits"], captured["target"], captured["options"], "sum")
        expected = loss_fn(**tensors, impl="reference", reduction="sum", **options)
        assert_close(ours, expected, torch.float64), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_the_float32_definition(dtype):
    tensors = _problem(torch.float32, True, False)
    tensors["input"] = tensors["input"].to(dtype)
    loss = xent.focal_loss(**tensors, gamma=2.0, impl="chunked")
    expected = xent.focal_loss(**{**tensors, "input": tensors["input"].float()}, gamma=2.0, impl="reference")
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.float(), expected, rtol=1e-2, atol=1e-3)


def test_extreme_and_confident_logits_stay_finite():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [30.0, 0.0, 0.0]], requires_grad=True)
    target = torch.tensor([0, 1, 0])  # the first and last rows are certain: p_y = 1, u = 0
    for loss_fn, options in [(xent.focal_loss, {"gamma": 0.5}), (xent.generalized_cross_entropy, {"q": 0.3})]:
        for impl in ("reference", "chunked"):
            loss = loss_fn(logits, target, impl=impl, reduction="sum", **options)
            (grad,) = torch.autograd.grad(loss, logits)
            assert torch.isfinite(loss) and torch.isfinite(grad).all(), (loss_fn.__name__, impl)


def test_what_the_fused_kernels_do_not_differentiate_is_refused_or_left_to_the_reference():
    tensors = _problem(torch.float64, False, True)
    tensors["input"].requires_grad_()
    alpha = torch.rand(C, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"impl='chunked' does not differentiate alpha.*impl='reference'"):
        xent.focal_loss(**tensors, alpha=alpha, impl="chunked")
    token_weight = tensors.pop("token_weight").requires_grad_()
    with pytest.raises(ValueError, match="token_weight"):
        xent.cross_entropy(**tensors, token_weight=token_weight, impl="chunked")
    # the automatic choice runs the reference, which differentiates them
    big = torch.randn(300, 300, dtype=torch.float64, requires_grad=True)
    target = torch.randint(300, (300,))
    alpha = torch.rand(300, dtype=torch.float64, requires_grad=True)
    xent.focal_loss(big, target, alpha=alpha).backward()
    assert alpha.grad is not None


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_triton_equals_the_plain_definition(name, reduction):
    """The Triton kernel from the same description, under the interpreter on a CPU (small shapes)."""
    pytest.importorskip("triton")
    test_chunked_equals_the_plain_definition(name, torch.float32, reduction, True, True, impl="triton")


def test_token_weights_scale_each_token_and_enter_the_mean():
    """Independent of the description: r_n ℓ_n summed over Σ r_n w_y, written out."""
    tensors = _problem(torch.float64, True, True)
    per_token = xent.cross_entropy(tensors["input"], tensors["target"], weight=tensors["weight"], reduction="none")
    kept = tensors["target"] != -100
    denominator = (tensors["token_weight"] * tensors["weight"][tensors["target"].clamp_min(0)] * kept).sum()
    expected = (tensors["token_weight"] * per_token).sum() / denominator
    for impl in ("reference", "chunked"):
        assert_close(xent.cross_entropy(**tensors, impl=impl), expected)
    with pytest.raises(ValueError, match=r"token_weight must have the target's shape \(4, 5\)"):
        xent.cross_entropy(tensors["input"], tensors["target"], token_weight=torch.ones(20))


def test_options_dataclass_defaults_describe_cross_entropy():
    options = RowLoss()
    assert options.term == rowloss.CROSS_ENTROPY and not options.transforms_per_class


# --- linear_loss -----------------------------------------------------------------------------------------------

LINEAR_CASES = {name: case for name, case in LOSSES.items() if name != "cross-entropy-token-weighted"}
LINEAR_CASES["cross-entropy"] = (xent.cross_entropy, {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 5.0})


def _head_problem(dtype, loss_fn):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "input": torch.randn(2, 5, 6, generator=generator, dtype=torch.float64).to(dtype),  # (B, T, D)
        "linear_weight": (torch.randn(C, 6, generator=generator, dtype=torch.float64) * 0.5).to(dtype),
        "linear_bias": torch.randn(C, generator=generator, dtype=torch.float64).to(dtype),
        "target": torch.randint(C, (2, 5), generator=generator),
        "weight": (torch.rand(C, generator=generator, dtype=torch.float64) + 0.2).to(dtype),
        "token_weight": torch.rand(2, 5, generator=generator, dtype=torch.float64).to(dtype),
    }
    tensors["target"][0, ::3] = -100
    if loss_fn is xent.ldam_loss:  # cosine-like logits
        tensors["linear_weight"] = tensors["linear_weight"] * 0.1
    return tensors


def _materialised(loss_fn, reduction, options):
    """The definition linear_loss must equal: the loss on F.linear's logits, flattened to (N, V)."""

    def loss(input, linear_weight, linear_bias, target, weight, token_weight):
        logits = torch.nn.functional.linear(input, linear_weight, linear_bias)
        value = loss_fn(logits.reshape(-1, C), target.reshape(-1), weight=weight, token_weight=token_weight.reshape(-1),
                        reduction=reduction, impl="reference", **options)  # fmt: skip
        return value.view(target.shape) if reduction == "none" else value

    return loss


@pytest.mark.parametrize("name", list(LINEAR_CASES))
@pytest.mark.parametrize("impl", ["chunked", "triton"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_linear_loss_equals_the_loss_of_the_materialised_logits(name, impl, reduction):
    if impl == "triton":
        pytest.importorskip("triton")
    loss_fn, options = LINEAR_CASES[name]
    dtype = torch.float64 if impl == "chunked" else torch.float32
    tensors = _head_problem(dtype, loss_fn)
    # the class weight too: the fused kernels get its gradient from the description's reference, in backward
    requires = ("input", "linear_weight", "linear_bias", "weight")
    expected = gradients(_materialised(loss_fn, reduction, options), tensors, requires)
    fused = gradients(
        lambda **t: xent.linear_loss(loss_fn, **t, reduction=reduction, impl=impl, chunk_size=4, **options),
        tensors,
        requires,
    )
    by_name = gradients(
        lambda **t: xent.linear_loss(loss_fn.__name__, **t, reduction=reduction, impl=impl, chunk_size=3, **options),
        tensors,
        requires,
    )
    exact = gradients(_materialised(loss_fn, reduction, options), _in_float64(tensors), requires)
    for actual in (fused, by_name):
        if dtype == torch.float64:
            assert_close(actual[0], expected[0], dtype)
            for key in requires:
                assert_close(actual[1][key], expected[1][key], dtype)
        else:
            assert_as_accurate_as_the_reference(actual, expected, exact, requires)


@pytest.mark.parametrize("name", [name for name in LINEAR_CASES if name != "cross-entropy"])
@pytest.mark.parametrize("impl", ["chunked", "triton", "reference"])
def test_linear_loss_softcap_caps_the_logits_of_every_loss(name, impl):
    """softcap is cross_entropy's own option; any other loss is taken of the capped logits c·tanh(z / c)."""
    if impl == "triton":
        pytest.importorskip("triton")
    loss_fn, options = LINEAR_CASES[name]
    dtype = torch.float32 if impl == "triton" else torch.float64
    tensors = _head_problem(dtype, loss_fn)
    requires = ("input", "linear_weight", "linear_bias")

    def capped(input, linear_weight, linear_bias, target, weight, token_weight):
        logits = 0.5 * torch.tanh(torch.nn.functional.linear(input, linear_weight, linear_bias) / 0.5)
        return loss_fn(logits.reshape(-1, C), target.reshape(-1), weight=weight, impl="reference", **options)

    expected = gradients(capped, {**tensors, "token_weight": None}, requires)
    actual = gradients(
        lambda **t: xent.linear_loss(loss_fn, **t, softcap=0.5, impl=impl, chunk_size=4, **options),
        {**tensors, "token_weight": None},
        requires,
    )
    assert_close(actual[0], expected[0], dtype)
    for key in requires:
        assert_close(actual[1][key], expected[1][key], dtype)


def test_linear_loss_module_and_errors():
    tensors = _head_problem(torch.float64, xent.focal_loss)
    del tensors["token_weight"]
    criterion = xent.nn.LinearLoss(xent.focal_loss, gamma=1.5, weight=tensors.pop("weight"), chunk_size=3)
    assert "focal_loss" in repr(criterion) and "gamma=1.5" in repr(criterion)
    assert "weight" in dict(criterion.named_buffers())
    expected = xent.linear_loss("focal_loss", **tensors, gamma=1.5, weight=criterion.options["weight"])
    assert_close(criterion(tensors["input"], tensors["linear_weight"], tensors["target"], tensors["linear_bias"]),
                 expected)  # fmt: skip
    with pytest.raises(ValueError, match="gamma must be in"):
        xent.nn.LinearLoss("focal_loss", gamma=-1.0)
    with pytest.raises(TypeError, match="binary_cross_entropy_with_logits; binary"):
        xent.linear_loss(xent.binary_cross_entropy_with_logits, **tensors)
    with pytest.raises(TypeError, match="got <lambda>"):
        xent.linear_loss(lambda x, y: x, **tensors)
    with pytest.raises(ValueError, match=r"loss must be one of .*'focal'"):
        xent.linear_loss("focal", **tensors)
    with pytest.raises(TypeError, match="focal_loss has no option 'q'; its options: alpha, gamma"):
        xent.linear_loss(xent.focal_loss, **tensors, q=0.5)
    probabilities = torch.softmax(torch.randn(2, 5, C, dtype=torch.float64), -1)
    with pytest.raises(TypeError, match="focal_loss takes class indices"):
        xent.linear_loss(xent.focal_loss, **{**tensors, "target": probabilities})
    # cross-entropy alone takes probabilities, and linear_cross_entropy is linear_loss(cross_entropy)
    assert_close(
        xent.linear_loss(xent.cross_entropy, **{**tensors, "target": probabilities}, label_smoothing=0.1),
        xent.linear_cross_entropy(**{**tensors, "target": probabilities}, label_smoothing=0.1),
    )


# --- linear_distillation_loss ----------------------------------------------------------------------------------


def _distillation_problem(dtype):
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
    tensors = _distillation_problem(dtype)
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
        exact = gradients(definition, _in_float64(tensors), requires)
        assert_as_accurate_as_the_reference(actual, expected, exact, requires)


def test_linear_distillation_refuses_a_teacher_that_requires_grad_and_mismatched_heads():
    tensors = _distillation_problem(torch.float64)
    del tensors["target"]
    teacher = tensors["teacher_linear_weight"].clone().requires_grad_()
    with pytest.raises(ValueError, match=r"teacher_linear_weight requires grad.*detach\(\)"):
        xent.linear_distillation_loss(**{**tensors, "teacher_linear_weight": teacher})
    with pytest.raises(ValueError, match="share the vocabulary"):
        xent.linear_distillation_loss(
            **{
                **tensors,
                "teacher_linear_weight": torch.randn(C + 1, 9, dtype=torch.float64),
                "teacher_linear_bias": None,
            }
        )
    with pytest.raises(ValueError, match=r"teacher_input has shape \(2, 4, 9\)"):
        xent.linear_distillation_loss(**{**tensors, "teacher_input": torch.randn(2, 4, 9, dtype=torch.float64)})
    with pytest.raises(ValueError, match="temperature must be in"):
        xent.linear_distillation_loss(**tensors, temperature=0.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        xent.linear_distillation_loss(**tensors, reduction="average")


# --- the gradient rule on the new paths ------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_fused_family_refuses_second_order_and_the_reference_gives_it(impl):
    if impl == "triton":
        pytest.importorskip("triton")
    head = _head_problem(torch.float32, xent.focal_loss)
    hidden, weight, tokens = head["input"].requires_grad_(), head["linear_weight"], head["target"]
    logits = torch.randn(6, C, requires_grad=True)
    target = torch.tensor([0, 3, 1, 6, 2, 2])

    def focal(impl):
        return xent.focal_loss(logits, target, gamma=2.0, impl=impl), logits

    def ldam(impl):
        return xent.ldam_loss(logits, target, class_counts=COUNTS, impl=impl), logits

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


def test_fused_family_under_autocast_returns_float32_from_half_precision_heads():
    head = _head_problem(torch.float32, xent.focal_loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for loss in (
            xent.linear_loss(xent.focal_loss, head["input"], head["linear_weight"], head["target"], gamma=2.0),
            xent.linear_distillation_loss(head["input"], head["linear_weight"], head["input"], head["linear_weight"]),
            xent.focal_loss(torch.randn(8, C), torch.randint(C, (8,)), impl="chunked"),
        ):
            assert loss.dtype == torch.float32
