"""What the bench runs: the implementations of each operation, side by side, and the floors they are compared with.

Each implementation is prepared on a :class:`~xent.bench.Problem` and then stepped (:mod:`xent.bench.problem`). A
*floor* is not a loss: it is the least work any implementation must do — for linear cross-entropy the three GEMMs
(logits, d(input), d(weight)); for cross-entropy on given logits one pass that reads two logits-sized tensors and
writes a third, the traffic of "read the logits twice, write the gradient once".
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F

import xent
from xent.bench.problem import (
    LM_BATCH,
    NEEDS_CUDA,
    NOT_APPLICABLE,
    NOT_IN_THIS_TORCH,
    NOT_INSTALLED,
    Implementation,
    Prepared,
    Problem,
    Unavailable,
    lm_config,
    loss_options,
)
from xent.kernels.dispatch import Impl


def _family(problem: Problem, impl: Impl | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """xent's loss of the problem on given logits, by ``impl``."""
    loss, options = getattr(xent, problem.loss), loss_options(problem)
    return lambda logits, target: loss(logits, target, impl=impl, **options)


def _family_linear(problem: Problem, impl: Impl | None) -> Callable[..., torch.Tensor]:
    """xent.linear_loss of the problem's loss; ``impl="reference"`` is the loss of the materialised logits."""
    options = loss_options(problem)
    return lambda hidden, weight, target: xent.linear_loss(problem.loss, hidden, weight, target, impl=impl, **options)


def _inputs(problem: Problem, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    dtype, device = problem.torch_dtype, problem.device
    target = torch.randint(problem.v, (problem.n,), generator=generator).to(device)
    if problem.operation == "ce":
        logits = torch.randn(problem.n, problem.v, generator=generator).to(device=device, dtype=dtype)
        return logits, target
    hidden = (torch.randn(problem.n, problem.d, generator=generator) * 0.1).to(device=device, dtype=dtype)
    weight = (torch.randn(problem.v, problem.d, generator=generator) * problem.d**-0.5).to(device=device, dtype=dtype)
    return hidden, weight, target


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.requires_grad_() for t in tensors]


def _clear(*tensors: torch.Tensor) -> Callable[[], None]:
    def reset() -> None:
        for t in tensors:
            t.grad = None

    return reset


def _loss_step(loss_fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        loss_fn(*inputs).backward()

    return step


# --- cross-entropy on given logits -------------------------------------------------------------------------------


def _ce(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[Problem], Prepared]:
    def prepare(problem: Problem) -> Prepared:
        logits, target = _inputs(problem)
        (logits,) = _leaves(logits)
        return Prepared(_loss_step(loss_fn, logits, target), _clear(logits))

    return prepare


def _ce_family(impl: Impl | None, *, compiled: bool = False) -> Callable[[Problem], Prepared]:
    def prepare(problem: Problem) -> Prepared:
        loss_fn = _family(problem, impl)
        return _ce(_compiled(loss_fn) if compiled else loss_fn)(problem)

    return prepare


def _ce_inplace(problem: Problem) -> Prepared:
    source, target = _inputs(problem)
    logits = source.clone().requires_grad_()

    def reset() -> None:  # the previous step overwrote the logits with their gradient
        logits.grad = None
        with torch.no_grad():
            logits.copy_(source)

    return Prepared(_loss_step(lambda x, t: xent.cross_entropy(x, t, inplace_backward=True), logits, target), reset)


def _ce_floor(problem: Problem) -> Prepared:
    logits, _ = _inputs(problem)
    other = logits.clone()
    out: list[torch.Tensor] = []

    def step() -> None:
        out.append(torch.add(logits, other))  # read two logits-sized tensors, write a new one

    return Prepared(step, out.clear)


def _liger_ce(problem: Problem) -> Prepared:
    from liger_kernel.transformers import LigerCrossEntropyLoss

    return _ce(LigerCrossEntropyLoss())(problem)


# --- linear cross-entropy ------------------------------------------------------------------------------------------


def _linear(loss_fn: Callable[..., torch.Tensor]) -> Callable[[Problem], Prepared]:
    def prepare(problem: Problem) -> Prepared:
        hidden, weight, target = _inputs(problem)
        hidden, weight = _leaves(hidden, weight)
        return Prepared(_loss_step(loss_fn, hidden, weight, target), _clear(hidden, weight))

    return prepare


def _linear_family(impl: Impl | None, *, compiled: bool = False) -> Callable[[Problem], Prepared]:
    def prepare(problem: Problem) -> Prepared:
        loss_fn = _family_linear(problem, impl)
        return _linear(_compiled(loss_fn) if compiled else loss_fn)(problem)

    return prepare


def _eager_linear(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight), target)


def _torch_chunked_linear(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.linear_cross_entropy(hidden, weight, target, options=torch.nn.LinearCrossEntropyOptions())


def _linear_floor(problem: Problem) -> Prepared:
    hidden, weight, _ = _inputs(problem)
    out: list[torch.Tensor] = []

    def step() -> None:
        logits = hidden @ weight.t()  # (N, V)
        out.extend((logits @ weight, logits.t() @ hidden))  # d(input), d(weight)

    return Prepared(step, out.clear)


def _liger_linear(problem: Problem) -> Prepared:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss()
    return _linear(lambda h, w, t: loss(w, h, t))(problem)


def _cce_linear(filter_eps: str | None) -> Callable[[Problem], Prepared]:
    """cut-cross-entropy as its users run it (``filter_eps="auto"``: backward skips the blocks whose probabilities
    are all below 2⁻¹² in bf16 — nearly all of them when the softmax is flat, as on random inputs) and exact."""

    def prepare(problem: Problem) -> Prepared:
        from cut_cross_entropy import linear_cross_entropy

        return _linear(lambda h, w, t: linear_cross_entropy(h, w, t, impl="cce", filter_eps=filter_eps))(problem)

    return prepare


# --- a language model's training step -------------------------------------------------------------------------------


def _lm_step(patch: dict[str, Any] | None) -> Callable[[Problem], Prepared]:
    """Forward and backward of the whole model on ``n`` tokens: unpatched (``patch=None``, its own loss on its logits),
    or through ``xent.hf.patch(model, **patch)`` with the problem's loss."""

    def prepare(problem: Problem) -> Prepared:
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        # as a Module: transformers' @wraps(nn.Module.to) gives its own `to` the unbound signature
        model = cast(torch.nn.Module, LlamaForCausalLM(lm_config(problem))).to(
            device=problem.device, dtype=problem.torch_dtype
        )
        if patch is not None:
            import xent.hf

            xent.hf.patch(model, loss=problem.loss, **patch, **loss_options(problem))
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(problem.v, (LM_BATCH, problem.n // LM_BATCH), generator=generator).to(problem.device)

        def step() -> None:
            model(input_ids=tokens, labels=tokens).loss.backward()

        return Prepared(step, lambda: model.zero_grad(set_to_none=True))

    return prepare


# --- linear distillation ------------------------------------------------------------------------------------------


def _distill(impl: Impl | None, *, compiled: bool = False) -> Callable[[Problem], Prepared]:
    """linear_distillation_loss with a teacher head of the student's shape (T = 2)."""

    def prepare(problem: Problem) -> Prepared:
        hidden, weight, _ = _inputs(problem)
        teacher_hidden, teacher_weight, _ = _inputs(problem, seed=1)
        hidden, weight = _leaves(hidden, weight)

        def loss(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return xent.linear_distillation_loss(hidden, weight, teacher_hidden, teacher_weight, temperature=2.0,
                                                 impl=impl)  # fmt: skip

        return Prepared(_loss_step(_compiled(loss) if compiled else loss, hidden, weight), _clear(hidden, weight))

    return prepare


def _distill_floor(problem: Problem) -> Prepared:
    hidden, weight, _ = _inputs(problem)
    teacher_hidden, teacher_weight, _ = _inputs(problem, seed=1)
    out: list[torch.Tensor] = []

    def step() -> None:
        logits, teacher = hidden @ weight.t(), teacher_hidden @ teacher_weight.t()  # (N, V) each
        out.extend((teacher, logits @ weight, logits.t() @ hidden))  # d(input), d(weight)

    return Prepared(step, out.clear)


# --- availability ----------------------------------------------------------------------------------------------


def _cross_entropy_only(
    needs: Callable[[Problem], Unavailable | None] = lambda problem: None,
) -> Callable[[Problem], Unavailable | None]:
    """A baseline that has plain cross-entropy only (PyTorch's, Liger's, CCE's)."""

    def needs_cross_entropy(problem: Problem) -> Unavailable | None:
        if problem.loss != "cross_entropy":
            return Unavailable(NOT_APPLICABLE, f"has no {problem.loss}: see xent-reference and reference-compile")
        return needs(problem)

    return needs_cross_entropy


def _inplace_option(problem: Problem) -> Unavailable | None:
    if problem.loss == "cross_entropy":
        return None
    return Unavailable(NOT_APPLICABLE, "inplace_backward is an option of cross_entropy only")


def _family_only(problem: Problem) -> Unavailable | None:
    if problem.loss != "cross_entropy":
        return None
    return Unavailable(NOT_APPLICABLE, "torch-eager and torch-compile are this loss's baselines")


def _needs_package(module: str, *, cuda: bool = True) -> Callable[[Problem], Unavailable | None]:
    def needs(problem: Problem) -> Unavailable | None:
        if importlib.util.find_spec(module) is None:
            return Unavailable(NOT_INSTALLED, module)
        if cuda and problem.device != "cuda":
            return Unavailable(NEEDS_CUDA)
        return None

    return needs


def _needs_cuda(problem: Problem) -> Unavailable | None:
    return None if problem.device == "cuda" else Unavailable(NEEDS_CUDA, "on the CPU, xent is the chunked kernel")


def _needs_torch_linear_cross_entropy(problem: Problem) -> Unavailable | None:
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return Unavailable(NOT_IN_THIS_TORCH, f"torch {torch.__version__} has no F.linear_cross_entropy")
    return None


def _compiled(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``torch.compile(fn)``, made at the first call: importing this table (every ``xent`` command does, for its
    flags) must not import dynamo and inductor, which take seconds."""
    compiled: Callable[..., torch.Tensor] | None = None

    def call(*args: torch.Tensor) -> torch.Tensor:
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn)
        return compiled(*args)

    return call


# Beside xent's automatic choice: its chunked kernel (on GPUs, where the automatic one is Triton), its plain
# reference (the loss of the materialised logits, eager) and torch.compile of that same formula — the baselines of a
# family loss that no other library has — and, for plain cross-entropy, PyTorch's, Liger's and CCE's.
IMPLEMENTATIONS: dict[str, list[Implementation]] = {
    "ce": [
        Implementation("xent", "ce", _ce_family(None)),
        Implementation("xent-inplace", "ce", _ce_inplace, needs=_inplace_option),
        Implementation("xent-chunked", "ce", _ce_family("chunked"), needs=_needs_cuda),
        Implementation("xent-reference", "ce", _ce_family("reference"), needs=_family_only),
        Implementation(
            "reference-compile", "ce", _ce_family("reference", compiled=True), compiles=True, needs=_family_only
        ),
        Implementation("torch-eager", "ce", _ce(F.cross_entropy), needs=_cross_entropy_only()),
        Implementation(
            "torch-compile", "ce", _ce(_compiled(F.cross_entropy)), compiles=True, needs=_cross_entropy_only()
        ),
        Implementation("liger", "ce", _liger_ce, needs=_cross_entropy_only(_needs_package("liger_kernel"))),
        Implementation("floor", "ce", _ce_floor, is_floor=True),
    ],
    "linear-ce": [
        Implementation("xent", "linear-ce", _linear_family(None)),
        Implementation("xent-chunked", "linear-ce", _linear_family("chunked"), needs=_needs_cuda),
        Implementation("xent-reference", "linear-ce", _linear_family("reference"), needs=_family_only),
        Implementation(
            "reference-compile",
            "linear-ce",
            _linear_family("reference", compiled=True),
            compiles=True,
            needs=_family_only,
        ),
        Implementation("torch-eager", "linear-ce", _linear(_eager_linear), needs=_cross_entropy_only()),
        Implementation(
            "torch-compile", "linear-ce", _linear(_compiled(_eager_linear)), compiles=True, needs=_cross_entropy_only()
        ),
        Implementation(
            "torch-chunked",
            "linear-ce",
            _linear(_torch_chunked_linear),
            needs=_cross_entropy_only(_needs_torch_linear_cross_entropy),
        ),
        Implementation("liger", "linear-ce", _liger_linear, needs=_cross_entropy_only(_needs_package("liger_kernel"))),
        Implementation(
            "cce", "linear-ce", _cce_linear("auto"), needs=_cross_entropy_only(_needs_package("cut_cross_entropy"))
        ),
        Implementation(
            "cce-exact", "linear-ce", _cce_linear(None), needs=_cross_entropy_only(_needs_package("cut_cross_entropy"))
        ),
        Implementation("floor", "linear-ce", _linear_floor, is_floor=True),
    ],
    "linear-distill": [
        Implementation("xent", "linear-distill", _distill(None)),
        Implementation("xent-chunked", "linear-distill", _distill("chunked"), needs=_needs_cuda),
        Implementation("xent-reference", "linear-distill", _distill("reference")),
        Implementation("reference-compile", "linear-distill", _distill("reference", compiled=True), compiles=True),
        Implementation("floor", "linear-distill", _distill_floor, is_floor=True),
    ],
    "lm-step": [
        Implementation("xent", "lm-step", _lm_step({}), needs=_needs_package("transformers", cuda=False)),
        Implementation(
            "xent-reference",
            "lm-step",
            _lm_step({"impl": "reference"}),
            needs=lambda problem: _needs_package("transformers", cuda=False)(problem) or _family_only(problem),
        ),
        Implementation(
            "torch-eager",
            "lm-step",
            _lm_step(None),
            needs=_cross_entropy_only(_needs_package("transformers", cuda=False)),
        ),
    ],
}


def find_implementation(operation: str, name: str) -> Implementation:
    for implementation in IMPLEMENTATIONS[operation]:
        if implementation.name == name:
            return implementation
    raise KeyError(name)
