"""PyTorch's own test inputs for its losses — the OpInfo samples and error inputs of ``torch.nn.functional`` and the
ModuleInfo inputs of ``torch.nn`` — run through every xent implementation and compared with PyTorch."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.common_modules import module_db

import xent
from tests.conftest import assert_close
from tests.test_gradient_rule import IMPLS

OPS = {
    (op.name, op.variant_test_name): op
    for op in op_db
    if op.name
    in (
        "nn.functional.cross_entropy",
        "nn.functional.binary_cross_entropy",
        "nn.functional.binary_cross_entropy_with_logits",
        "nn.functional.linear_cross_entropy",
    )
}
OURS = {
    "nn.functional.cross_entropy": xent.cross_entropy,
    "nn.functional.binary_cross_entropy": xent.binary_cross_entropy,
    "nn.functional.binary_cross_entropy_with_logits": xent.binary_cross_entropy_with_logits,
    "nn.functional.linear_cross_entropy": xent.linear_cross_entropy,
}
# PyTorch's own linear_cross_entropy warns that it ignores its chunking options on probability targets.
pytestmark = pytest.mark.filterwarnings("ignore:linear_cross_entropy. ``options`` ignored:UserWarning")
TAKES_IMPL = ("nn.functional.cross_entropy", "nn.functional.linear_cross_entropy")


def _samples(key, dtype):
    op = OPS[key]
    return list(op.sample_inputs("cpu", dtype, requires_grad=True))


def _xent_call(name, sample):
    """xent's arguments for a PyTorch sample, or None where the sample uses a layout xent does not share: PyTorch's
    ``linear_cross_entropy`` also takes K-dimensional heads ``(V, d1, ..., D)``, and its ``options`` object maps to
    ``chunk_size``."""
    args, kwargs = list(sample.args), dict(sample.kwargs)
    if name == "nn.functional.linear_cross_entropy":
        if args[0].dim() != 2 or sample.input.dim() > 2:
            return None
        options = kwargs.pop("options", None)
        if options is not None:
            kwargs["chunk_size"] = options.batch_chunk_size
    return args, kwargs


def _differentiate(loss, tensors):
    """Gradients of ``loss`` for every tensor that requires grad (a random grad_output for ``"none"``)."""
    grad_output = torch.randn(loss.shape, generator=torch.Generator().manual_seed(3), dtype=loss.dtype)
    wanted = [tensor for tensor in tensors if isinstance(tensor, torch.Tensor) and tensor.requires_grad]
    grads = torch.autograd.grad(loss, wanted, grad_output, allow_unused=True)
    assert all(grad is not None for grad in grads), "a tensor that requires grad got no gradient"
    return grads


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("key", list(OPS), ids=lambda key: "-".join(filter(None, key)))
def test_pytorch_sample_inputs_through_every_impl(key, dtype, impl):
    name = key[0]
    if impl != "reference" and name not in TAKES_IMPL:
        pytest.skip(f"{name} has one implementation")
    if impl == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernel computes in float32")
    compared = 0
    for sample in _samples(key, dtype):
        call = _xent_call(name, sample)
        if call is None:
            continue
        args, kwargs = call
        impl_kwargs = {"impl": impl} if name in TAKES_IMPL else {}
        weight = kwargs.get("weight")
        if name in TAKES_IMPL and weight is not None and bool((weight < 0).any()):
            # a deliberate difference: PyTorch averages over negative class weights, xent rejects them
            with pytest.raises(ValueError, match="weight must be non-negative"):
                OURS[name](sample.input, *args, **kwargs, **impl_kwargs)
            continue
        ours = OURS[name](sample.input, *args, **kwargs, **impl_kwargs)
        theirs = OPS[key].op(sample.input, *sample.args, **sample.kwargs)
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        assert_close(ours, theirs.detach(), dtype)
        tensors = [sample.input, *args, *kwargs.values()]
        for got, want in zip(_differentiate(ours, tensors), _differentiate(theirs, tensors), strict=True):
            assert_close(got, want, dtype)
        compared += 1
    assert compared >= 8


# xent's layout takes inputs (..., D) of any rank, where PyTorch's linear_cross_entropy takes (N, D) or (D,).
ACCEPTED_BY_DESIGN = "dimensionality 1 or 2"


@pytest.mark.parametrize("key", [key for key in OPS if OPS[key].error_inputs_func is not None])
def test_pytorch_error_inputs_raise_a_value_or_type_error(key):
    errors = list(OPS[key].error_inputs("cpu"))
    assert errors
    for error in errors:
        if ACCEPTED_BY_DESIGN in error.error_regex:
            continue
        sample = error.sample_input
        kwargs = {name: value for name, value in sample.kwargs.items() if name != "options"}
        with pytest.raises((ValueError, TypeError)):
            OURS[key[0]](sample.input, *sample.args, **kwargs)


MODULES = {
    "CrossEntropyLoss": xent.nn.CrossEntropyLoss,
    "BCELoss": xent.nn.BCELoss,
    "BCEWithLogitsLoss": xent.nn.BCEWithLogitsLoss,
}


@pytest.mark.parametrize("module_info", [m for m in module_db if m.module_cls.__name__ in MODULES],
                         ids=lambda m: m.module_cls.__name__)  # fmt: skip
def test_pytorch_module_inputs(module_info):
    inputs = module_info.module_inputs_func(
        module_info, device="cpu", dtype=torch.float64, requires_grad=True, training=True
    )
    assert inputs
    for module_input in inputs:
        constructor = module_input.constructor_input
        theirs_module = module_info.module_cls(*constructor.args, **constructor.kwargs)
        ours_module = MODULES[module_info.module_cls.__name__](*constructor.args, **constructor.kwargs)
        forward = module_input.forward_input
        theirs = theirs_module(*forward.args, **forward.kwargs)
        weight = getattr(theirs_module, "weight", None)
        if isinstance(theirs_module, torch.nn.CrossEntropyLoss) and weight is not None and bool((weight < 0).any()):
            with pytest.raises(ValueError, match="weight must be non-negative"):  # the deliberate difference
                ours_module(*forward.args, **forward.kwargs)
            continue
        ours = ours_module(*forward.args, **forward.kwargs)
        if _nothing_to_average(theirs_module, forward.args):
            # the documented difference: 0 with a zero gradient where PyTorch returns NaN
            assert theirs.isnan() and ours == 0
            assert not _differentiate(ours, forward.args)[0].any()
            continue
        assert_close(ours, theirs.detach())
        for got, want in zip(_differentiate(ours, forward.args), _differentiate(theirs, forward.args), strict=True):
            assert_close(got, want)


def _nothing_to_average(module, args):
    if not isinstance(module, torch.nn.CrossEntropyLoss) or module.reduction != "mean" or args[1].is_floating_point():
        return False
    return bool((args[1] == module.ignore_index).all())


def test_probability_targets_reject_a_non_negative_ignore_index_like_pytorch():
    logits, probs = torch.randn(3, 4), torch.softmax(torch.randn(3, 4), 1)
    with pytest.raises(RuntimeError, match="ignore_index"):
        F.cross_entropy(logits, probs, ignore_index=0)
    for impl in ("reference", "chunked"):
        with pytest.raises(ValueError, match=r"ignore_index=0 .* probabilities"):
            xent.cross_entropy(logits, probs, ignore_index=0, impl=impl)
    with pytest.raises(ValueError, match="ignore_index=2"):
        xent.linear_cross_entropy(torch.randn(3, 5), torch.randn(4, 5), probs, ignore_index=2)
    with pytest.raises(ValueError, match="ignore_index=1"):
        xent.nn.CrossEntropyLoss(ignore_index=1)(logits, probs)
    # a negative ignore_index is accepted, as PyTorch does
    assert_close(xent.cross_entropy(logits, probs, ignore_index=-1), F.cross_entropy(logits, probs, ignore_index=-1))
