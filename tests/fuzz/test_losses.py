"""Hypothesis over every public loss and module: shapes (empty batches, unbatched and spatial inputs), dtypes, option
values, implementations and which inputs require grad.

Each drawn call is either valid — and then returns, in the input's dtype, the value and the gradient of every input
that requires grad that the float64 reference gives (written here from each docstring's formula) — or carries one
deliberate defect, and then raises ValueError or TypeError naming the broken argument. A call that cannot form a
gradient the reference forms may refuse up front, naming the tensor; a gradient silently missing fails.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xent
from xent.losses.family import FAMILY

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
SCALES = (0.1, 1.0, 10.0, 100.0)
NAN = math.nan


@dataclass
class Case:
    """One drawn call. ``call`` gets the tensors as leaves (``requires`` of them requiring grad) and ``reference``
    their float64 copies; ``broken`` names the argument a deliberate defect broke (``None``: a valid call)."""

    call: Callable[[dict[str, torch.Tensor]], torch.Tensor | tuple[torch.Tensor, ...]]
    reference: Callable[[dict[str, torch.Tensor]], torch.Tensor | tuple[torch.Tensor, ...]]
    tensors: dict[str, torch.Tensor]
    requires: tuple[str, ...] = ()
    broken: str | None = None
    scale: float = 1.0  # the largest logit: float32 and half math lose about eps · scale
    out_dtype: torch.dtype | None = None
    construct: Callable[[], object] | None = None  # a module's constructor, run before ``call``
    construction_checks: tuple[str, ...] = field(default_factory=tuple)  # options a constructor must reject
    half_logits: bool = False  # the logits themselves are rounded to the (half) input dtype, as F.linear's are


def _leaves(tensors, requires, dtype=None):
    leaves = {}
    for name, value in tensors.items():
        value = value.detach().clone()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        leaves[name] = value.requires_grad_(name in requires)
    return leaves


def _as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


def _assert_matches(actual, expected, compute_dtype, out_dtype, scale, what, rounded_logits=None):
    """Close relative to the tensor's largest entry: the output's rounding plus the compute dtype's error, which
    grows with the size of the logits (and, for logits rounded to half precision, that rounding)."""
    error = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    size = max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
    tolerance = 2 * torch.finfo(out_dtype).eps + 256 * torch.finfo(compute_dtype).eps * (1 + scale)
    if rounded_logits is not None:
        tolerance += 4 * torch.finfo(rounded_logits).eps * (1 + scale)
    assert error <= tolerance * size, f"{what}: error {error:.3g} > {tolerance * size:.3g}"


def check(case: Case) -> None:
    module = None
    if case.construct is not None:
        try:
            module = case.construct()
        except (ValueError, TypeError) as error:
            assert case.broken is not None, f"a valid module was refused: {error}"
            assert case.broken in str(error), f"{case.broken!r} not named in: {error}"
            return
        assert case.broken not in case.construction_checks, f"{case.broken} was not checked at construction"
    leaves = _leaves(case.tensors, case.requires)
    if case.broken is not None:
        with pytest.raises((ValueError, TypeError)) as error:
            case.call(leaves) if module is None else case.call(leaves, module)
        assert case.broken in str(error.value), f"{case.broken!r} not named in: {error.value}"
        return
    try:
        outputs = _as_tuple(case.call(leaves) if module is None else case.call(leaves, module))
    except (ValueError, TypeError) as error:  # a gradient it cannot form, refused up front with the tensor named
        named = [name for name in case.requires if name in str(error) and name != "input"]
        assert named, f"valid call refused: {error}"
        return
    first = next(t for t in case.tensors.values() if t.is_floating_point())
    out_dtype = case.out_dtype or first.dtype
    compute_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    rounded = first.dtype if case.half_logits and first.dtype in (torch.float16, torch.bfloat16) else None
    for output in outputs:
        assert output.dtype == out_dtype, f"result dtype {output.dtype}, expected {out_dtype}"
    references = _as_tuple(case.reference(_leaves(case.tensors, case.requires, torch.float64)))
    for output, expected in zip(outputs, references, strict=True):
        assert output.shape == expected.shape, f"shape {tuple(output.shape)}, expected {tuple(expected.shape)}"
        _assert_matches(output, expected, compute_dtype, out_dtype, case.scale, "value", rounded)
    if not case.requires:
        return
    generator = torch.Generator().manual_seed(7)
    grad_outputs = [torch.randn(o.shape, generator=generator, dtype=torch.float64) for o in outputs]
    wanted = [leaves[name] for name in case.requires]
    grads = torch.autograd.grad(
        outputs, wanted, [g.to(o.dtype) for g, o in zip(grad_outputs, outputs, strict=True)], allow_unused=True
    )
    ref_leaves = _leaves(case.tensors, case.requires, torch.float64)
    references = _as_tuple(case.reference(ref_leaves))
    expected_grads = torch.autograd.grad(
        references, [ref_leaves[name] for name in case.requires], grad_outputs, allow_unused=True
    )
    for name, grad, expected in zip(case.requires, grads, expected_grads, strict=True):
        expected = torch.zeros_like(ref_leaves[name]) if expected is None else expected
        assert grad is not None, f"no gradient for {name}"
        assert grad.dtype == leaves[name].dtype, f"{name}'s gradient has dtype {grad.dtype}"
        _assert_matches(grad, expected, compute_dtype, grad.dtype, case.scale, f"gradient of {name}", rounded)


# --- references -------------------------------------------------------------------------------------------------


def _rows(x: torch.Tensor, class_dim: int = 1) -> torch.Tensor:
    """(C) → (1, C); (N, C, d...) → (N·d..., C)."""
    if x.dim() == 1:
        return x.unsqueeze(0)
    return x.movedim(class_dim, -1).reshape(-1, x.shape[class_dim])


def _smoothed_ce(x, y, w, smoothing):
    """PyTorch's weighted, smoothed cross-entropy per row: (1 − ε) w_y (−log p_y) + ε/C Σ_c w_c (−log p_c)."""
    log_p = x.log_softmax(-1)
    nll = -log_p.gather(1, y[:, None])[:, 0]
    if not smoothing:  # a masked class (log p = -inf) is no part of the loss then: not 0 · -inf
        return w[y] * nll
    return (1 - smoothing) * w[y] * nll - smoothing * (log_p * w).sum(1) / x.shape[1]


def _p_y(x, y):
    return x.softmax(-1).gather(1, y[:, None])[:, 0]


def _margins(counts, max_margin):
    margins = counts**-0.25
    return margins * max_margin / margins.max()


# Per-row loss of each loss of the registry over class indices (class weights included), written from its docstring's
# formula, independently of xent on purpose.
ROW_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "cross_entropy": lambda x, y, w, o: (
        _smoothed_ce(_cap(x, o), y, w, o["label_smoothing"]) + o["z_loss"] * w[y] * _cap(x, o).logsumexp(1) ** 2
    ),
    "focal_loss": lambda x, y, w, o: (
        -_alpha(o, y, x)
        * (-torch.expm1(x.log_softmax(1).gather(1, y[:, None])[:, 0])) ** o["gamma"]
        * x.log_softmax(1).gather(1, y[:, None])[:, 0]
        * w[y]
    ),
    "poly1_cross_entropy": lambda x, y, w, o: (
        _smoothed_ce(x, y, w, o["label_smoothing"])
        + o["epsilon"] * w[y] * (1 - ((1 - o["label_smoothing"]) * _p_y(x, y) + o["label_smoothing"] / x.shape[1]))
    ),
    "logit_adjusted_cross_entropy": lambda x, y, w, o: _smoothed_ce(
        x + o["tau"] * (o["class_counts"] / o["class_counts"].sum()).log(), y, w, o["label_smoothing"]
    ),
    "balanced_softmax_cross_entropy": lambda x, y, w, o: _smoothed_ce(
        x + o["class_counts"].log(), y, w, o["label_smoothing"]
    ),
    "ldam_loss": lambda x, y, w, o: _smoothed_ce(
        o["scale"] * (x - _margins(o["class_counts"], o["max_margin"])[y][:, None] * F.one_hot(y, x.shape[1])),
        y,
        w,
        0.0,
    ),
    "generalized_cross_entropy": lambda x, y, w, o: (1 - _p_y(x, y) ** o["q"]) / o["q"] * w[y],
    "symmetric_cross_entropy": lambda x, y, w, o: (
        w[y]
        * (-o["alpha"] * x.log_softmax(1).gather(1, y[:, None])[:, 0] - o["beta"] * o["log_zero"] * (1 - _p_y(x, y)))
    ),
}


def _cap(x, options):
    cap = options.get("softcap")
    return x if cap is None else cap * torch.tanh(x / cap)


def _alpha(options, y, x):
    alpha = options.get("alpha")
    if alpha is None:
        return torch.ones_like(y, dtype=x.dtype)
    if isinstance(alpha, torch.Tensor):
        return alpha.to(x.dtype)[y]
    return torch.full_like(y, alpha, dtype=x.dtype)


def family_reference(name, logits, target, weight, token_weight, ignore_index, reduction, options, class_dim=1):
    """Every softmax-family loss over class indices: the row loss of the kept rows (an ignored row is absent, whatever
    it holds: it is dropped before any arithmetic), times the token weight, reduced; ``"mean"`` divides by Σ r_n w_{y_n}
    over kept rows and is 0 when that is 0."""
    x = _rows(logits, class_dim)
    y = target.reshape(-1)
    kept = y != ignore_index
    x = torch.where(kept[:, None], x, 0.0)
    y_safe = torch.where(kept, y, 0)
    w = torch.ones(x.shape[1], dtype=x.dtype) if weight is None else weight
    options = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    loss = torch.where(kept, ROW_LOSSES[name](x, y_safe, w, options), 0.0)
    denominator = torch.where(kept, w[y_safe], 0.0)
    if token_weight is not None:
        loss, denominator = loss * token_weight.reshape(-1), denominator * token_weight.reshape(-1)
    if reduction == "none":
        return loss.reshape(target.shape)
    if reduction == "sum":
        return loss.sum()
    total = denominator.sum()
    return loss.sum() / total if total != 0 else loss.sum() * 0.0


# --- softmax family over class indices --------------------------------------------------------------------------

FINITE = {"allow_nan": False, "allow_infinity": False}


def _counts(draw, c):
    return torch.tensor(draw(st.lists(st.integers(1, 500), min_size=c, max_size=c)), dtype=torch.float64)


# Per loss of the registry (its module is the registry's): valid options drawn for C classes, invalid values per option.
STRATEGIES: dict[str, tuple[Callable, dict[str, list]]] = {
    "cross_entropy": (
        lambda draw, c: {
            "label_smoothing": draw(st.sampled_from([0.0, 0.1, 1.0])),
            "z_loss": draw(st.sampled_from([0.0, 1e-3, 0.5])),
            "softcap": draw(st.sampled_from([None, 0.5, 30.0])),
        },
        {"label_smoothing": [-0.1, 1.5, NAN], "z_loss": [-1.0, NAN], "softcap": [0.0, -2.0, NAN]},
    ),
    "focal_loss": (
        lambda draw, c: {
            "gamma": draw(st.sampled_from([0.0, 1.0, 2.0, 5.0])),
            "alpha": draw(st.one_of(st.none(), st.floats(0, 1), st.just(torch.linspace(0.1, 1, c)))),
        },
        {"gamma": [-1.0, NAN], "alpha": [NAN, -0.5]},
    ),
    "poly1_cross_entropy": (
        lambda draw, c: {
            "epsilon": draw(st.floats(-1, 5, **FINITE)),
            "label_smoothing": draw(st.sampled_from([0.0, 0.2])),
        },
        {"epsilon": [-1.5, NAN], "label_smoothing": [2.0]},
    ),
    "logit_adjusted_cross_entropy": (
        lambda draw, c: {
            "class_counts": _counts(draw, c),
            "tau": draw(st.sampled_from([0.0, 0.5, 1.0, 2.0])),
            "label_smoothing": draw(st.sampled_from([0.0, 0.1])),
        },
        {"class_counts": [torch.zeros(3)], "tau": [-1.0, NAN]},
    ),
    "balanced_softmax_cross_entropy": (
        lambda draw, c: {"class_counts": _counts(draw, c), "label_smoothing": draw(st.sampled_from([0.0, 0.1]))},
        {"class_counts": [torch.full((3,), -1.0)], "label_smoothing": [-1.0]},
    ),
    "ldam_loss": (
        lambda draw, c: {
            "class_counts": _counts(draw, c),
            "max_margin": draw(st.sampled_from([0.0, 0.5, 1.0])),
            "scale": draw(st.sampled_from([1.0, 30.0])),
        },
        {"class_counts": [torch.full((2,), NAN)], "max_margin": [-0.5], "scale": [0.0, NAN]},
    ),
    "generalized_cross_entropy": (
        lambda draw, c: {"q": draw(st.sampled_from([0.1, 0.7, 1.0]))},
        {"q": [0.0, 1.5, NAN]},
    ),
    "symmetric_cross_entropy": (
        lambda draw, c: {
            "alpha": draw(st.sampled_from([0.0, 0.1, 1.0])),
            "beta": draw(st.sampled_from([0.0, 1.0])),
            "log_zero": draw(st.sampled_from([-4.0, -1.0])),
        },
        {"log_zero": [0.0, NAN], "alpha": [NAN]},
    ),
}


# What an ignored row may hold (logits of the masked rows, hidden states of a linear head's), or a masked class 0
# (an action mask, or a pad token masked through the head's bias) that the kept rows never target.
POISONS = (None, None, None, "nan", "inf", "-inf", "masked class")


def _poison(logits, target, ignore_index, poison, class_dim=1):
    """Writes ``poison`` into ``logits`` in place: NaN/±inf at the last class of the ignored rows (-inf: the whole
    row), or -inf at class 0 of every row, whose kept targets are then moved off class 0 (``target`` changes)."""
    rows = logits.unsqueeze(0) if logits.dim() == 1 else logits.movedim(class_dim, -1)  # a view (..., C)
    ignored = (target == ignore_index).reshape(rows.shape[:-1]).unsqueeze(-1)
    if poison == "masked class":
        rows[..., 0] = -math.inf
        target[(target == 0) & (ignore_index != 0)] = 1
    elif poison == "-inf":
        rows.masked_fill_(ignored, -math.inf)
    else:
        last = torch.arange(rows.shape[-1]) == rows.shape[-1] - 1
        rows.masked_fill_(ignored & last, math.nan if poison == "nan" else math.inf)


def _logits(draw, shape, dtype, scale):
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype), generator


@st.composite
def family_cases(draw, names=tuple(FAMILY)):
    name = draw(st.sampled_from(names))
    draw_options, bad_options = STRATEGIES[name]
    module = FAMILY[name].module
    dtype = draw(st.sampled_from(DTYPES))
    c = draw(st.integers(1, 6))
    n, d = draw(st.integers(0, 5)), draw(st.integers(1, 3))
    layout = draw(st.sampled_from(["unbatched", "batch", "spatial"]))
    shape, batch = {"unbatched": ((c,), ()), "batch": ((n, c), (n,)), "spatial": ((n, c, d), (n, d))}[layout]
    options = draw_options(draw, c)
    # float64 references lose the gradient of (1 − p)^γ, γ < 1, where p rounds to 1: keep such logits moderate
    scale = draw(st.sampled_from(SCALES[:3] if options.get("q", 1) < 1 or name == "focal_loss" else SCALES))
    logits, generator = _logits(draw, shape, dtype, scale)
    ignore_index = draw(st.sampled_from([-100, -1, 0]))
    target = torch.randint(c, batch, generator=generator)
    target[torch.rand(batch, generator=generator) < draw(st.sampled_from([0.0, 0.3, 1.0]))] = ignore_index
    poison = draw(st.sampled_from(POISONS if c > 1 else POISONS[:-1]))
    if poison is not None:
        _poison(logits, target, ignore_index, poison)
        if poison == "masked class" and "label_smoothing" in options:
            options["label_smoothing"] = 0.0  # smoothing over a masked class is an infinite loss, as in PyTorch
    weight = draw(st.sampled_from([None, "positive", "some zero"]))
    if weight is not None:
        weight = (torch.rand(c, generator=generator, dtype=torch.float64) + 0.1).to(dtype)
        if weight == "some zero" or draw(st.booleans()):
            weight[0] = 0.0
    via_module = draw(st.booleans())
    token_weight = impl = None
    if not via_module:
        if draw(st.booleans()):
            token_weight = (torch.rand(batch, generator=generator, dtype=torch.float64) * 2).to(dtype)
        impl = draw(st.sampled_from([None, "reference", "chunked"]))
    reduction = draw(st.sampled_from(["none", "mean", "sum"]))
    tensors = {"input": logits, "target": target}
    tensors |= {"weight": weight} if weight is not None else {}
    tensors |= {"token_weight": token_weight} if token_weight is not None else {}
    floating = [k for k in tensors if k != "target"]
    requires = tuple(k for k in floating if draw(st.booleans()))

    defects = ["input", "target dtype", "target shape", "reduction", *bad_options]
    defects += ["target range"] if target.numel() else []
    defects += ["weight shape", "weight sign"] if weight is not None else []
    defects += ["token_weight shape", "token_weight sign"] if token_weight is not None else []
    defects += ["impl"] if not via_module else []
    defects += ["class_counts length"] if "class_counts" in options else []
    defects += ["alpha shape"] if isinstance(options.get("alpha"), torch.Tensor) else []
    broken = draw(st.one_of(st.none(), st.none(), st.sampled_from(defects)))
    argument = broken.split()[0] if broken else None
    if broken == "input":
        tensors["input"] = logits.to(torch.int64)
        requires = tuple(r for r in requires if r != "input")
    elif broken == "target dtype":
        tensors["target"] = target.to(dtype)
    elif broken == "target shape":
        tensors["target"] = torch.zeros((*batch, 2), dtype=torch.int64)
    elif broken == "target range":
        tensors["target"] = target.clone()
        tensors["target"].view(-1)[0] = c
    elif broken == "weight shape":
        tensors["weight"] = torch.ones(c + 1, dtype=dtype)
    elif broken == "weight sign":
        tensors["weight"] = weight.clone()
        tensors["weight"][-1] = -0.5
    elif broken == "token_weight shape":
        tensors["token_weight"] = torch.ones((*batch, 3), dtype=dtype)
    elif broken == "token_weight sign":
        tensors["token_weight"] = token_weight.clone()
        tensors["token_weight"].view(-1)[-1] = -1.0
    elif broken == "reduction":
        reduction = "avg"
    elif broken == "impl":
        impl = "fastest"
    elif broken in ("class_counts length", "alpha shape"):
        options[argument] = torch.ones(c + 1)
    elif broken is not None:
        options[broken] = draw(st.sampled_from(bad_options[broken]))
    function = FAMILY[name].function
    keywords = {"ignore_index": ignore_index, "reduction": reduction, **options}

    def reference(t):
        options64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in options.items()}
        return family_reference(
            name, t["input"], t["target"], t.get("weight"), t.get("token_weight"), ignore_index, reduction, options64
        )

    if via_module:

        def construct():
            return module(**keywords, **({"weight": tensors["weight"]} if "weight" in tensors else {}))

        def call(t, loss_fn):
            if "weight" in t:  # the buffer is the leaf that requires grad
                loss_fn.weight = t["weight"]
            return loss_fn(t["input"], t["target"])

        # a bad option value is caught by the constructor; a length that does not fit C only at the call
        checked_at_construction = (argument,) if broken in ("reduction", *bad_options) else ()
        return Case(call, reference, tensors, requires, argument, scale, None, construct, checked_at_construction)

    def call(t):
        extra = {k: t[k] for k in ("weight", "token_weight") if k in t}
        return function(t["input"], t["target"], impl=impl, **keywords, **extra)

    return Case(call, reference, tensors, requires, argument, scale)


@FUZZ
@given(family_cases())
def test_softmax_family_over_class_indices(case):
    check(case)


def test_every_loss_of_the_registry_has_strategies_and_a_reference():
    """A loss added to the registry fails here until it has its option strategies and its independent row loss."""
    assert set(STRATEGIES) == set(FAMILY)
    assert set(ROW_LOSSES) == set(FAMILY)
    for name, (_, bad_options) in STRATEGIES.items():
        FAMILY[name].check_names(bad_options)  # the defects break the loss's own options


# --- cross-entropy over probabilities ---------------------------------------------------------------------------


@st.composite
def probability_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    c, n = draw(st.integers(1, 6)), draw(st.integers(0, 5))
    shape = draw(st.sampled_from([(c,), (n, c), (n, c, 2)]))
    scale = draw(st.sampled_from(SCALES))
    logits, generator = _logits(draw, shape, dtype, scale)
    target = torch.rand(shape, generator=generator, dtype=torch.float64)
    target = (target / target.sum(1 if len(shape) > 1 else 0, keepdim=True)).to(dtype)
    options = STRATEGIES["cross_entropy"][0](draw, c)
    reduction = draw(st.sampled_from(["none", "mean", "sum"]))
    weight = (torch.rand(c, generator=generator, dtype=torch.float64) + 0.1).to(dtype) if draw(st.booleans()) else None
    tensors = {"input": logits, "target": target} | ({"weight": weight} if weight is not None else {})
    requires = tuple(k for k in tensors if draw(st.booleans()))
    impl = draw(st.sampled_from([None, "reference", "chunked"]))
    defects = [None, None, None, "target shape", "ignore_index"] + (["target range"] if target.numel() else [])
    broken = draw(st.sampled_from(defects))
    ignore_index = -100
    if broken == "target range":  # probabilities must lie in [0, 1]
        tensors["target"] = -target
    elif broken == "target shape":
        tensors["target"] = torch.rand((*shape, 2), dtype=dtype)
    elif broken == "ignore_index":  # a class index cannot be ignored in probabilities
        ignore_index = 0

    def call(t):
        return xent.cross_entropy(
            t["input"], t["target"], weight=t.get("weight"), reduction=reduction, impl=impl,
            ignore_index=ignore_index, **options,
        )  # fmt: skip

    def reference(t):
        x, q = _rows(_cap(t["input"], options)), _rows(t["target"])
        w = torch.ones(x.shape[1], dtype=x.dtype) if t.get("weight") is None else t["weight"]
        smoothed = (1 - options["label_smoothing"]) * q + options["label_smoothing"] / x.shape[1]
        loss = -(w * smoothed * x.log_softmax(1)).sum(1) + options["z_loss"] * x.logsumexp(1) ** 2
        if reduction == "none":
            return loss.reshape(shape[:1] + shape[2:] if len(shape) > 1 else ())
        return loss.mean() if reduction == "mean" and loss.numel() else loss.sum()

    return Case(call, reference, tensors, requires, broken and broken.split()[0], scale)


@FUZZ
@given(probability_cases())
def test_cross_entropy_over_probabilities(case):
    check(case)


# --- binary losses ----------------------------------------------------------------------------------------------


@st.composite
def binary_cases(draw):
    name = draw(st.sampled_from(["binary_cross_entropy_with_logits", "binary_cross_entropy", "sigmoid_focal_loss"]))
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    # binary_cross_entropy takes probabilities: sigmoid of large logits rounds to 0 or 1, where log is clamped
    scale = draw(st.sampled_from({"binary_cross_entropy_with_logits": SCALES}.get(name, SCALES[:2])))
    logits, generator = _logits(draw, shape, dtype, scale)
    target = torch.rand(shape, generator=generator, dtype=torch.float64)
    if draw(st.booleans()):
        target = target.round()
    tensors = {"input": logits if name != "binary_cross_entropy" else torch.sigmoid(logits.double()).to(dtype)}
    tensors["target"] = target.to(dtype)
    reduction = draw(st.sampled_from(["none", "mean", "sum"]))
    options: dict = {"reduction": reduction}
    if name == "sigmoid_focal_loss":
        options |= {"gamma": draw(st.sampled_from([0.0, 1.0, 2.0])), "alpha": draw(st.sampled_from([None, 0.25]))}
        bad = {"gamma": -1.0, "alpha": 1.5}
    else:
        options["label_smoothing"] = draw(st.sampled_from([0.0, 0.1]))
        bad = {"label_smoothing": 1.5}
        if draw(st.booleans()):
            tensors["weight"] = (torch.rand(shape[-1:], generator=generator, dtype=torch.float64) + 0.1).to(dtype)
        if name == "binary_cross_entropy_with_logits" and draw(st.booleans()):
            tensors["pos_weight"] = (torch.rand(shape[-1:], generator=generator, dtype=torch.float64) * 3).to(dtype)
    requires = tuple(k for k in tensors if draw(st.booleans()))
    defects = [None, None, "reduction", *bad] + (["target"] if logits.numel() else [])
    broken = draw(st.sampled_from(defects))
    if broken == "reduction":
        options["reduction"] = "avg"
    elif broken == "target":
        tensors["target"] = tensors["target"].clone()
        tensors["target"].view(-1)[0] = 2.0  # out of [0, 1]
    elif broken is not None:
        options[broken] = bad[broken]
    function = getattr(xent, name)

    def call(t):
        return function(t["input"], t["target"], **{k: v for k, v in t.items() if k not in ("input", "target")},
                        **options)  # fmt: skip

    def reference(t):
        x, y = t["input"], t["target"]
        y = y * (1 - options.get("label_smoothing", 0.0)) + options.get("label_smoothing", 0.0) / 2
        if name == "binary_cross_entropy":
            loss = -(y * x.log().clamp_min(-100) + (1 - y) * torch.log1p(-x).clamp_min(-100))
        else:
            log_p, log_not_p = F.logsigmoid(x), F.logsigmoid(-x)
            loss = -(t.get("pos_weight", 1.0) * y * log_p + (1 - y) * log_not_p)
            if name == "sigmoid_focal_loss":
                p = torch.sigmoid(x)
                loss = loss * (1 - (p * y + (1 - p) * (1 - y))) ** options["gamma"]
                if options["alpha"] is not None:
                    loss = loss * (options["alpha"] * y + (1 - options["alpha"]) * (1 - y))
        loss = loss * t.get("weight", 1.0)
        return loss if reduction == "none" else loss.mean() if reduction == "mean" and loss.numel() else loss.sum()

    return Case(call, reference, tensors, requires, broken, scale)


@FUZZ
@given(binary_cases())
def test_binary_losses(case):
    check(case)


# --- distillation and generative --------------------------------------------------------------------------------


@st.composite
def distillation_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    c, n = draw(st.integers(1, 6)), draw(st.integers(0, 4))
    shape = draw(st.sampled_from([(n, c), (n, c, 2)]))
    scale = draw(st.sampled_from(SCALES[:3]))
    student, generator = _logits(draw, shape, dtype, scale)
    teacher_is_probs = draw(st.booleans())
    teacher = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    if teacher_is_probs:
        teacher = teacher.softmax(1)
        teacher[teacher < 0.1] = 0.0  # zero-probability classes: 0 · log 0 = 0
        teacher = teacher / teacher.sum(1, keepdim=True).clamp_min(1e-300)
        teacher[teacher.isnan()] = 1.0
    tensors = {"input": student, "teacher": teacher.to(dtype)}
    requires = tuple(k for k in tensors if draw(st.booleans()))
    temperature = draw(st.sampled_from([0.5, 1.0, 4.0]))
    reduction = draw(st.sampled_from(["none", "batchmean", "mean", "sum"]))
    broken = draw(st.sampled_from([None, None, "temperature", "reduction", "teacher"]))
    if broken == "temperature":
        temperature = draw(st.sampled_from([0.0, -1.0, NAN]))
    elif broken == "reduction":
        reduction = "batch"
    elif broken == "teacher":
        tensors["teacher"] = tensors["teacher"][:, :-1] if c > 1 else torch.zeros((n, 2), dtype=dtype)
        if teacher_is_probs and n:  # ... or a probability row that holds no mass
            tensors["teacher"] = torch.zeros(shape, dtype=dtype)
    via_module = draw(st.booleans())

    def call(t, loss_fn=None):
        if loss_fn is not None:
            return loss_fn(t["input"], t["teacher"])
        return xent.distillation_loss(
            t["input"], t["teacher"], temperature=temperature, reduction=reduction, teacher_is_probs=teacher_is_probs
        )

    def reference(t):
        log_p = _rows(t["input"]).div(temperature).log_softmax(1)
        # probabilities are softened as the logits are: softmax(log q / T)
        q = (_rows(t["teacher"]).log() if teacher_is_probs else _rows(t["teacher"])).div(temperature).softmax(1)
        kl = (torch.xlogy(q, q) - q * log_p).sum(1) * temperature**2
        if reduction == "none":
            return kl.reshape(shape[:1] + shape[2:])
        total = kl.sum()
        return {"sum": total, "batchmean": total / max(n, 1), "mean": total / max(kl.numel(), 1)}[reduction]

    construct = None
    if via_module:

        def construct():
            return xent.nn.DistillationLoss(temperature, reduction, teacher_is_probs)

    return Case(call, reference, tensors, requires, broken, scale, None, construct, ("temperature", "reduction"))


@FUZZ
@given(distillation_cases())
def test_distillation(case):
    check(case)


@st.composite
def generative_cases(draw):
    dtype = draw(st.sampled_from(DTYPES[:2]))
    scale = draw(st.sampled_from(SCALES))
    name = draw(st.sampled_from(["gan_discriminator_loss", "gan_generator_loss", "vae_loss"]))
    if name == "vae_loss":
        n, k = draw(st.integers(1, 4)), draw(st.integers(1, 3))
        recon, generator = _logits(draw, (n, 1, 2, 3), dtype, scale)
        tensors = {"recon": recon, "x": torch.rand((n, 1, 2, 3), generator=generator, dtype=dtype)}
        tensors |= {"mu": torch.randn((n, k), generator=generator, dtype=dtype),
                    "logvar": torch.randn((n, k), generator=generator, dtype=dtype)}  # fmt: skip
        options = {
            "beta": draw(st.sampled_from([0.0, 1.0, 4.0])),
            "reduction": draw(st.sampled_from(["sum", "mean", "none"])),
        }
        bad = {"beta": -1.0, "reduction": "batch", "logvar": torch.zeros(n, k + 1, dtype=dtype)}
    else:
        real, generator = _logits(draw, (draw(st.integers(1, 5)), 1), dtype, scale)
        tensors = {"fake": torch.randn((draw(st.integers(1, 5)), 1), generator=generator, dtype=dtype) * scale}
        tensors = ({"real": real} if name == "gan_discriminator_loss" else {}) | tensors
        options = {"reduction": draw(st.sampled_from(["mean", "sum"]))}
        bad = {"reduction": "avg"}
        if name == "gan_discriminator_loss":
            options["label_smoothing"] = draw(st.sampled_from([0.0, 0.1]))
            bad["label_smoothing"] = 1.5
    requires = tuple(k for k in tensors if k != "x" and draw(st.booleans()))
    broken = draw(st.sampled_from([None, None, *bad]))
    if broken in tensors:
        tensors[broken] = bad[broken]
    elif broken is not None:
        options[broken] = bad[broken]
    function = getattr(xent, name)

    def call(t):
        return function(*t.values(), **options)

    def reference(t):
        reduce = {"sum": torch.sum, "mean": torch.mean, "none": lambda loss: loss}[options["reduction"]]
        if name == "vae_loss":
            x, recon, mu, logvar = t["x"], t["recon"], t["mu"], t["logvar"]
            bce = -(x * F.logsigmoid(recon) + (1 - x) * F.logsigmoid(-recon)).sum((1, 2, 3))
            return reduce(bce + options["beta"] * 0.5 * (logvar.exp() + mu**2 - 1 - logvar).sum(1))
        fake = reduce(-F.logsigmoid(-t["fake"]) if "real" in t else -F.logsigmoid(t["fake"]))
        if "real" not in t:
            return fake
        smoothing = options["label_smoothing"]
        real = -((1 - smoothing) * F.logsigmoid(t["real"]) + smoothing * F.logsigmoid(-t["real"]))
        return reduce(real) + fake

    return Case(call, reference, tensors, requires, broken, scale)


@FUZZ
@given(generative_cases())
def test_generative(case):
    check(case)


# --- linear heads -----------------------------------------------------------------------------------------------


@st.composite
def linear_cases(draw):
    name = draw(st.sampled_from(["linear_cross_entropy", *(f"linear_loss:{loss}" for loss in FAMILY)]))
    loss_name = name.split(":")[-1] if ":" in name else "cross_entropy"
    dtype = draw(st.sampled_from(DTYPES))
    n, dim, v = draw(st.integers(0, 6)), draw(st.integers(1, 5)), draw(st.integers(1, 7))
    batch = draw(st.sampled_from([(n,), (2, n)]))
    hidden, generator = _logits(draw, (*batch, dim), dtype, 1.0)
    head = torch.randn(v, dim, generator=generator, dtype=torch.float64) * draw(st.sampled_from([0.3, 3.0]))
    tensors = {"input": hidden, "linear_weight": head.to(dtype)}
    if draw(st.booleans()):
        tensors["linear_bias"] = torch.randn(v, generator=generator, dtype=torch.float64).to(dtype)
    if draw(st.booleans()):
        tensors["weight"] = (torch.rand(v, generator=generator, dtype=torch.float64) + 0.1).to(dtype)
    options = STRATEGIES[loss_name][0](draw, v)
    if ":" in name and loss_name != "cross_entropy":
        options["softcap"] = draw(st.sampled_from([None, 5.0]))
    target = torch.randint(v, batch, generator=generator)
    target[torch.rand(batch, generator=generator) < 0.3] = -100
    poison = draw(st.sampled_from([None, None, "nan", "inf", "masked class"] if v > 1 else [None, "nan", "inf"]))
    if poison in ("nan", "inf"):  # in an ignored token's hidden state
        hidden[target == -100] = math.nan if poison == "nan" else math.inf
    elif poison == "masked class":  # through the bias; the kept tokens target other classes
        tensors["linear_bias"] = tensors.get("linear_bias", torch.zeros(v, dtype=dtype)).clone()
        tensors["linear_bias"][0] = -math.inf
        target[target == 0] = 1
        if "label_smoothing" in options:
            options["label_smoothing"] = 0.0  # smoothing over a masked class is an infinite loss, as in PyTorch
    tensors["target"] = target
    reduction = draw(st.sampled_from(["none", "mean", "sum"]))
    impl = draw(st.sampled_from([None, "reference", "chunked"]))
    chunk_size = draw(st.sampled_from([None, 1, 3]))
    requires = tuple(k for k in tensors if k != "target" and draw(st.booleans()))
    finite = hidden[target != -100]
    scale = float(finite.double().abs().max() * head.abs().sum(1).max()) + 10.0 if finite.numel() else 10.0
    if "softcap" in options and options["softcap"] is not None:
        scale = min(scale, options["softcap"]) + 1.0
    broken = draw(st.sampled_from([None, None, "linear_weight", "target", "chunk_size", "reduction"]))
    if broken == "linear_weight":
        tensors["linear_weight"] = torch.ones(v, dim + 1, dtype=dtype)
    elif broken == "target":
        tensors["target"] = torch.zeros((*batch, 2), dtype=torch.int64)
    elif broken == "chunk_size":
        chunk_size = 0
    elif broken == "reduction":
        reduction = "avg"

    def call(t):
        tensor_options = {k: t[k] for k in ("linear_bias", "weight") if k in t}
        common = {"reduction": reduction, "impl": impl, "chunk_size": chunk_size, **tensor_options, **options}
        if name == "linear_cross_entropy":
            return xent.linear_cross_entropy(t["input"], t["linear_weight"], t["target"], **common)
        return xent.linear_loss(FAMILY[loss_name].function, t["input"], t["linear_weight"], t["target"], **common)

    def reference(t):
        # an ignored token is absent: its hidden state is not read
        kept = (t["target"] != -100).unsqueeze(-1)
        logits = F.linear(torch.where(kept, t["input"], 0.0), t["linear_weight"], t.get("linear_bias"))
        row_options = dict(options)
        if loss_name != "cross_entropy":
            logits = _cap(logits, row_options)
            row_options.pop("softcap", None)
        options64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in row_options.items()}
        return family_reference(
            loss_name, logits, t["target"], t.get("weight"), None, -100, reduction, options64, class_dim=-1
        )

    return Case(call, reference, tensors, requires, broken, scale, half_logits=True)


@FUZZ
@given(linear_cases())
def test_linear_heads(case):
    check(case)


@st.composite
def linear_log_prob_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    n, dim, v = draw(st.integers(0, 6)), draw(st.integers(1, 5)), draw(st.integers(1, 7))
    hidden, generator = _logits(draw, (n, dim), dtype, 1.0)
    tensors = {
        "input": hidden,
        "linear_weight": torch.randn(v, dim, generator=generator, dtype=torch.float64).to(dtype),
    }
    if draw(st.booleans()):
        tensors["linear_bias"] = torch.randn(v, generator=generator, dtype=torch.float64).to(dtype)
    target = torch.randint(v, (n,), generator=generator)
    target[torch.rand(n, generator=generator) < 0.3] = -100
    tensors["target"] = target
    temperature = draw(st.sampled_from([0.5, 1.0, 2.0]))
    chunk_size = draw(st.sampled_from([None, 1, 4]))
    requires = tuple(k for k in tensors if k != "target" and draw(st.booleans()))
    broken = draw(st.sampled_from([None, None, "temperature", "target", "linear_bias"]))
    if broken == "temperature":
        temperature = 0.0
    elif broken == "target":
        tensors["target"] = target.to(dtype)
    elif broken == "linear_bias":
        tensors["linear_bias"] = torch.zeros(v + 1, dtype=dtype)

    def call(t):
        return xent.linear_log_probs(t["input"], t["linear_weight"], t["target"], linear_bias=t.get("linear_bias"),
                                     temperature=temperature, chunk_size=chunk_size)  # fmt: skip

    def reference(t):
        log_p = (F.linear(t["input"], t["linear_weight"], t.get("linear_bias")) / temperature).log_softmax(-1)
        kept = t["target"] != -100
        picked = log_p.gather(-1, torch.where(kept, t["target"], 0)[:, None])[:, 0]
        return torch.where(kept, picked, 0.0), -(log_p.exp() * log_p).sum(-1)

    scale = float(tensors["linear_weight"].double().abs().sum(1).amax()) * 4 / max(temperature, 0.5) if n else 1.0
    out_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype  # as log_softmax(z.float())
    return Case(call, reference, tensors, requires, broken, scale, out_dtype, half_logits=True)


@FUZZ
@given(linear_log_prob_cases())
def test_linear_log_probs(case):
    check(case)


@st.composite
def linear_distillation_cases(draw):
    dtype = draw(st.sampled_from(DTYPES[:2]))
    n, dim, v = draw(st.integers(0, 5)), draw(st.integers(1, 4)), draw(st.integers(1, 6))
    hidden, generator = _logits(draw, (n, dim), dtype, 1.0)
    tensors = {
        "input": hidden,
        "linear_weight": torch.randn(v, dim, generator=generator, dtype=dtype),
        "teacher_input": torch.randn(n, dim + 1, generator=generator, dtype=dtype),
        "teacher_linear_weight": torch.randn(v, dim + 1, generator=generator, dtype=dtype),
    }
    target = None
    if draw(st.booleans()):
        target = torch.randint(v, (n,), generator=generator)
        target[torch.rand(n, generator=generator) < 0.3] = -100
        tensors["target"] = target
    temperature, hard_weight = draw(st.sampled_from([1.0, 2.0])), draw(st.sampled_from([0.0, 0.5]))
    reduction = draw(st.sampled_from(["none", "batchmean", "mean", "sum"]))
    impl = draw(st.sampled_from([None, "reference", "chunked"]))
    requires = tuple(k for k in ("input", "linear_weight") if draw(st.booleans()))
    broken = draw(st.sampled_from([None, None, "teacher_input", "temperature", "hard_weight"]))
    if broken == "teacher_input":  # the teacher is not differentiated: requiring grad is refused
        requires += ("teacher_input",)
    elif broken == "temperature":
        temperature = -1.0
    elif broken == "hard_weight":
        hard_weight = -0.5

    def call(t):
        return xent.linear_distillation_loss(
            t["input"], t["linear_weight"], t["teacher_input"], t["teacher_linear_weight"], target=t.get("target"),
            temperature=temperature, hard_weight=hard_weight, reduction=reduction, impl=impl,
        )  # fmt: skip

    def reference(t):
        z, z_t = t["input"] @ t["linear_weight"].T, t["teacher_input"] @ t["teacher_linear_weight"].T
        q = (z_t / temperature).softmax(-1)
        kl = (torch.xlogy(q, q) - q * (z / temperature).log_softmax(-1)).sum(-1) * temperature**2
        hard = torch.zeros_like(kl)
        if "target" in t:  # ignored tokens drop out of the soft term too
            kl = torch.where(t["target"] != -100, kl, torch.zeros_like(kl))
            hard = family_reference("cross_entropy", z, t["target"], None, None, -100, "none",
                                    {"label_smoothing": 0.0, "z_loss": 0.0}, class_dim=-1)  # fmt: skip
        if reduction == "none":
            return kl + hard_weight * hard
        kept = max(int((t["target"] != -100).sum()), 1) if "target" in t else max(n, 1)
        if reduction == "sum":
            return kl.sum() + hard_weight * hard.sum()
        return (kl.sum() + hard_weight * hard.sum()) / kept

    scale = float(tensors["linear_weight"].abs().sum(1).amax() + tensors["teacher_linear_weight"].abs().sum(1).amax())
    return Case(call, reference, tensors, requires, broken, scale * 4)


@FUZZ
@given(linear_distillation_cases())
def test_linear_distillation(case):
    check(case)


# --- every public callable, fed anything ------------------------------------------------------------------------


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)  # drawn, not global: hypothesis replays a failure exactly


SHAPES = st.lists(st.integers(0, 3), max_size=3).map(tuple)
ANYTHING = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.lists(st.floats(-2, 2), max_size=3),
    st.builds(lambda shape, seed: torch.randn(shape, generator=_seeded(seed)), SHAPES, st.integers(0, 99)),
    st.builds(lambda shape, seed: torch.randint(-1, 3, shape, generator=_seeded(seed)), SHAPES, st.integers(0, 99)),
    st.builds(lambda shape, seed: torch.randn(shape, generator=_seeded(seed)).half(), SHAPES, st.integers(0, 99)),
)
# set_value_checks and value_checks change a global switch: fed a random value they would turn value checks off
CALLABLES = [
    n for n in xent.__all__ if callable(getattr(xent, n)) and n not in ("nn", "set_value_checks", "value_checks")
]
MODULES = [
    name for name, value in vars(xent.nn).items()
    if isinstance(value, type) and issubclass(value, torch.nn.Module) and not name.startswith("_")
]  # fmt: skip


def _fed_anything(draw, function):
    """Positional tensors from ANYTHING (or well-formed ones), and a random subset of the keyword options, each set
    to ANYTHING."""
    parameters = inspect.signature(function).parameters.values()
    positional = [p for p in parameters if p.kind == p.POSITIONAL_OR_KEYWORD and p.default is p.empty]
    keywords = [p.name for p in parameters if p.default is not p.empty]
    args = [draw(ANYTHING) for _ in positional]
    chosen = draw(st.lists(st.sampled_from(keywords), unique=True, max_size=3)) if keywords else []
    return args, {name: draw(ANYTHING) for name in chosen}, [p.name for p in parameters]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_arguments_give_a_result_or_a_named_error(data):
    """Whatever it is fed, a public function returns or raises ValueError/TypeError naming one of its arguments
    (or the problem in its terms) — never an IndexError, a RuntimeError from deep inside, or an assert."""
    name = data.draw(st.sampled_from(CALLABLES + [f"nn.{m}" for m in MODULES]))
    target = getattr(xent.nn, name[3:]) if name.startswith("nn.") else getattr(xent, name)
    args, kwargs, names = _fed_anything(data.draw, target)
    try:
        result = target(*args, **kwargs)
        if name.startswith("nn.") and isinstance(result, torch.nn.Module):
            inputs = [data.draw(ANYTHING) for _ in range(data.draw(st.integers(1, 4)))]
            called = getattr(type(result), "function", result.forward)  # a _Loss forwards to its function
            names += list(inspect.signature(called).parameters)
            result(*inputs)
    except (ValueError, TypeError) as error:
        message = str(error)
        assert "\n" not in message.strip() or len(message) < 400, message
        assert any(n in message for n in names) or "argument" in message or "positional" in message, (
            f"{name}: {type(error).__name__} names no argument: {message}"
        )
