"""What the bench runs: the implementations of each operation, side by side, and the floors they are compared with.

Each implementation is prepared on a :class:`~xent.bench.Problem` and then stepped (:mod:`xent.bench.problem`). A
*floor* is not a loss: it is the least work any implementation must do — for linear cross-entropy the three GEMMs
(logits, d(input), d(weight)); for cross-entropy on given logits one pass that reads two logits-sized tensors and
writes a third, the traffic of "read the logits twice, write the gradient once"; for distilling one head into another
four (the teacher's logits too, none for a top-k teacher). A floor's logits-sized output comes from the buffers
xent's CPU kernels keep between steps (:mod:`xent.kernels.buffers`), as theirs do: the least work does not include
the operating system faulting a new buffer in, page by page, at every step. A *baseline* is not an implementation
either: another loss on the same inputs, the yardstick of the table's "× baseline" column (linear-distill's is the
student head's linear cross-entropy).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F

import xent
from xent.bench.problem import (
    DISTILL_TEMPERATURE,
    LM_BATCH,
    NEEDS_CUDA,
    NOT_APPLICABLE,
    NOT_IN_THIS_TORCH,
    NOT_INSTALLED,
    Implementation,
    Prepared,
    Problem,
    Unavailable,
    jsd_beta,
    lm_config,
    loss_options,
)
from xent.kernels import buffers
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

    def step() -> None:  # read two logits-sized tensors, write a third: into a kept buffer, as xent's kernels do
        out.append(torch.add(logits, other, out=buffers.empty(tuple(logits.shape), logits.dtype, logits.device)))

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


def _logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A floor's ``hidden @ weight.t()``, into a buffer kept between steps as xent's chunks of logits are."""
    logits = buffers.empty((hidden.shape[0], weight.shape[0]), hidden.dtype, hidden.device)
    return torch.mm(hidden, weight.t(), out=logits)


def _linear_floor(problem: Problem) -> Prepared:
    hidden, weight, _ = _inputs(problem)
    out: list[torch.Tensor] = []

    def step() -> None:
        logits = _logits(hidden, weight)  # (N, V)
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


def _lm_step(patch: dict[str, Any] | None, *, compiled: bool = False) -> Callable[[Problem], Prepared]:
    """Forward and backward of the whole model on ``n`` tokens: unpatched (``patch=None``, its own loss on its logits),
    or through ``xent.hf.patch(model, **patch)`` with the problem's loss; ``compiled``: the model under
    ``torch.compile(fullgraph=True)`` (the first step compiles, untimed)."""

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
        forward = torch.compile(model, fullgraph=True) if compiled else model

        def step() -> None:
            forward(input_ids=tokens, labels=tokens).loss.backward()

        return Prepared(step, lambda: model.zero_grad(set_to_none=True))

    return prepare


# --- linear distillation ------------------------------------------------------------------------------------------

TOP_K_BLOCK = 1024  # rows of teacher logits at a time while a top-k teacher is made (untimed)


def _teacher(problem: Problem) -> dict[str, torch.Tensor]:
    """The teacher, as linear_distillation_loss takes it: a head of the student's shape (``teacher_input``,
    ``teacher_linear_weight``), or with ``--top-k`` that head's k most likely ids per token and their
    log-probabilities (``teacher_indices``, ``teacher_log_probs``: what a teacher served offline returns), made here
    a block of rows at a time, before anything is timed."""
    teacher_hidden, teacher_weight, _ = _inputs(problem, seed=1)
    if problem.top_k is None:
        return {"teacher_input": teacher_hidden, "teacher_linear_weight": teacher_weight}
    ids, log_probs = [], []
    for rows in teacher_hidden.split(TOP_K_BLOCK):
        logits = (rows @ teacher_weight.t()).float()
        top = logits.topk(problem.top_k, dim=-1)
        ids.append(top.indices)
        log_probs.append((top.values - logits.logsumexp(-1, keepdim=True)).to(problem.torch_dtype))
    return {"teacher_indices": torch.cat(ids), "teacher_log_probs": torch.cat(log_probs)}


def distill_loss(problem: Problem, impl: Impl | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """linear_distillation_loss of a student's hidden states and head, with the problem's divergence and teacher
    (T = 2)."""
    teacher = _teacher(problem)

    def loss(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return xent.linear_distillation_loss(
            hidden,
            weight,
            teacher.get("teacher_input"),
            teacher.get("teacher_linear_weight"),
            teacher_indices=teacher.get("teacher_indices"),
            teacher_log_probs=teacher.get("teacher_log_probs"),
            top_k_tail=problem.top_k_tail,
            divergence=problem.divergence,
            beta=problem.beta,
            temperature=DISTILL_TEMPERATURE,
            impl=impl,
        )

    return loss


def _distill(impl: Impl | None, *, compiled: bool = False) -> Callable[[Problem], Prepared]:
    def prepare(problem: Problem) -> Prepared:
        hidden, weight, _ = _inputs(problem)
        hidden, weight = _leaves(hidden, weight)
        loss = distill_loss(problem, impl)
        return Prepared(_loss_step(_compiled(loss) if compiled else loss, hidden, weight), _clear(hidden, weight))

    return prepare


def trl_beta(problem: Problem) -> float:
    """TRL's ``beta`` for the problem's divergence: 0 is its forward KL, 1 its reverse KL, between them its JSD."""
    return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(problem.divergence, jsd_beta(problem))


def _trl_distill(problem: Problem) -> Prepared:
    """TRL's ChunkedDivergenceFunction (its DistillationTrainer's loss) on the same hidden states and heads: the
    per-token divergences summed, then backward. Its value is xent's / T² (xent's loss carries Hinton's T²)."""
    chunked = importlib.import_module("trl.kernels.chunked_divergence")  # Any: TRL is optional
    hidden, weight, _ = _inputs(problem)
    teacher = _teacher(problem)
    hidden, weight = _leaves(hidden, weight)
    beta = trl_beta(problem)

    def loss(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        divergence, _entropy = chunked.ChunkedDivergenceFunction.apply(hidden, weight, None, teacher["teacher_input"],
                                                                       teacher["teacher_linear_weight"], None, beta,
                                                                       DISTILL_TEMPERATURE)  # fmt: skip
        return cast(torch.Tensor, divergence.sum())

    return Prepared(_loss_step(loss, hidden, weight), _clear(hidden, weight))


def _distill_baseline(problem: Problem) -> Prepared:
    """xent.linear_cross_entropy of the student's head alone, on the same hidden states and head: the yardstick of
    a fused distillation loss (its floor is four GEMMs to cross-entropy's three, 4/3 of this time)."""
    return _linear(lambda hidden, weight, target: xent.linear_cross_entropy(hidden, weight, target))(problem)


def _distill_floor(problem: Problem) -> Prepared:
    hidden, weight, _ = _inputs(problem)
    teacher_hidden, teacher_weight, _ = _inputs(problem, seed=1)
    out: list[torch.Tensor] = []

    def step() -> None:
        logits = _logits(hidden, weight)  # (N, V)
        if problem.top_k is None:  # the teacher's logits; a top-k teacher comes as k numbers per token
            out.append(_logits(teacher_hidden, teacher_weight))
        out.extend((logits @ weight, logits.t() @ hidden))  # d(input), d(weight)

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


def _needs_trl(problem: Problem) -> Unavailable | None:
    """TRL with its ChunkedDivergenceFunction (TRL 1.16: ``pip install -e ".[trl]"``), on a teacher head. Looked up
    on disk: importing it imports transformers, seconds that every table would pay."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not any(
        Path(folder, "kernels", "chunked_divergence.py").is_file() for folder in spec.submodule_search_locations or []
    ):
        return Unavailable(NOT_INSTALLED, "trl.kernels.chunked_divergence (TRL 1.16)")
    if problem.top_k is not None:
        return Unavailable(NOT_APPLICABLE, "TRL's ChunkedDivergenceFunction takes the teacher's head, not its top-k")
    return None


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
# family loss that no other library has — and, for plain cross-entropy, PyTorch's, Liger's and CCE's; for
# distillation, TRL's fused divergence and, as a yardstick, the student head's own linear cross-entropy.
IMPLEMENTATIONS: dict[str, list[Implementation]] = {
    "ce": [
        Implementation("xent", "ce", _ce_family(None)),
        Implementation("xent-compile", "ce", _ce_family(None, compiled=True), compiles=True),
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
        Implementation("xent-compile", "linear-ce", _linear_family(None, compiled=True), compiles=True),
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
        Implementation("xent-compile", "linear-distill", _distill(None, compiled=True), compiles=True),
        Implementation("xent-chunked", "linear-distill", _distill("chunked"), needs=_needs_cuda),
        Implementation("xent-reference", "linear-distill", _distill("reference")),
        Implementation("reference-compile", "linear-distill", _distill("reference", compiled=True), compiles=True),
        Implementation("trl", "linear-distill", _trl_distill, needs=_needs_trl),
        Implementation("xent-linear-ce", "linear-distill", _distill_baseline, is_baseline=True),
        Implementation("floor", "linear-distill", _distill_floor, is_floor=True),
    ],
    "lm-step": [
        Implementation("xent", "lm-step", _lm_step({}), needs=_needs_package("transformers", cuda=False)),
        Implementation(
            "xent-compile",
            "lm-step",
            _lm_step({}, compiled=True),
            compiles=True,
            needs=_needs_package("transformers", cuda=False),
        ),
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
        Implementation(
            "torch-compile",
            "lm-step",
            _lm_step(None, compiled=True),
            compiles=True,
            needs=_cross_entropy_only(_needs_package("transformers", cuda=False)),
        ),
    ],
}


def find_implementation(operation: str, name: str) -> Implementation:
    for implementation in IMPLEMENTATIONS[operation]:
        if implementation.name == name:
            return implementation
    raise KeyError(name)
