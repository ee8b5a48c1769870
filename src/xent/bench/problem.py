"""What the bench measures: a problem (operation, shape, dtype, device, loss), what an implementation of it is, and why
one did not run.

An implementation is prepared once (inputs allocated, compiled where it compiles) and then stepped: one step is a
forward and a backward pass. The implementations of each operation are :mod:`xent.bench.cases`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import LlamaConfig

OPERATIONS = ("ce", "linear-ce", "linear-distill", "lm-step")
# Heads of real language models (tokens, hidden size, vocabulary), for `xent bench linear-ce --shape NAME`.
SHAPES = {
    "llama3-8b": {"n": 8192, "d": 4096, "v": 128256, "dtype": "bfloat16"},
    "gemma2-2b": {"n": 8192, "d": 2304, "v": 256000, "dtype": "bfloat16"},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass(frozen=True)
class Problem:
    """One benchmark problem. ``n`` rows (tokens), ``d`` features (not for ce), ``v`` classes."""

    operation: str
    n: int
    d: int
    v: int
    dtype: str = "float32"
    device: str = "cpu"
    loss: str = "cross_entropy"  # any loss linear_loss fuses (`--loss`)
    # linear-distill only: the divergence (`--divergence`, `--beta`) and a top-k teacher (`--top-k`, `--top-k-tail`:
    # k ids and log-probabilities per token instead of the teacher's head)
    divergence: str = "forward_kl"
    beta: float | None = None
    top_k: int | None = None
    top_k_tail: str = "renormalize"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def distillation(self) -> str:
        """linear-distill's options in words, for the table's title and the CSV: ``jsd β=0.5, T=2``, with
        ``, top-8 teacher (renormalize)`` for a top-k teacher; empty for the other operations."""
        if self.operation != "linear-distill":
            return ""
        words = self.divergence + (f" β={jsd_beta(self):g}" if self.divergence == "jsd" else "")
        words += f", T={DISTILL_TEMPERATURE:g}"
        if self.top_k is not None:
            words += f", top-{self.top_k} teacher ({self.top_k_tail})"
        return words

    def floor_bytes(self) -> int:
        """Memory no implementation can avoid beyond its inputs: the gradients it returns."""
        size = torch.tensor([], dtype=self.torch_dtype).element_size()
        if self.operation == "lm-step":
            return lm_parameters(self) * size  # every parameter's gradient
        if self.operation == "ce":
            return self.n * self.v * size  # d(logits)
        # linear-ce and linear-distill (the teacher's head is not differentiated)
        return (self.n * self.d + self.v * self.d) * size  # d(input) + d(weight)


# linear-distill's temperature: it changes no work, only the numbers (xent's loss carries a T² factor, TRL's not)
DISTILL_TEMPERATURE = 2.0
JSD_BETA = 0.5  # xent's default β for divergence="jsd"


def jsd_beta(problem: Problem) -> float:
    """The JSD's mixture weight β of a linear-distill problem (xent's default when ``--beta`` is not given)."""
    return JSD_BETA if problem.beta is None else problem.beta


@dataclass
class Prepared:
    """A ready implementation: ``step`` runs forward + backward once; ``reset`` runs before each step, untimed."""

    step: Callable[[], None]
    reset: Callable[[], None]


# Why an implementation did not run, by kind: the table folds its rows into one line, a kind each.
NOT_INSTALLED, NEEDS_CUDA, NOT_IN_THIS_TORCH, NOT_APPLICABLE, FAILED = (
    "not installed",
    "needs CUDA",
    "not in this torch",
    "not applicable",
    "failed",
)


@dataclass(frozen=True)
class Unavailable:
    """Why an implementation did not run (``Measurement.skipped``): its ``kind`` — ``"not installed"``,
    ``"needs CUDA"``, ``"not in this torch"``, ``"not applicable"`` or ``"failed"`` — and the ``detail`` a user
    needs (the missing package, the loss it lacks, the error it raised; may be empty)."""

    kind: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}" if self.detail else self.kind


@dataclass(frozen=True)
class Implementation:
    """One way to run an operation: ``prepare`` makes it ready on a problem, ``needs`` says why it cannot run there
    (or None); a floor is the least work any implementation must do, not a loss; a baseline is another loss on the
    same inputs, the yardstick its ratio column compares each implementation with (linear-distill's: the student
    head's linear cross-entropy) — neither is ranked."""

    name: str
    operation: str
    prepare: Callable[[Problem], Prepared]
    is_floor: bool = False
    compiles: bool = False
    is_baseline: bool = False  # a yardstick from another operation, not ranked (linear-distill's xent-linear-ce)
    needs: Callable[[Problem], Unavailable | None] = lambda problem: None  # why it cannot run, or None


def loss_options(problem: Problem) -> dict[str, Any]:
    """The options the bench runs a family loss with: the papers' defaults, and Zipf-distributed class counts (a
    long tail over the V classes) for the losses that take them."""
    counts = 1e6 / torch.arange(1, problem.v + 1, dtype=torch.float64)
    by_loss: dict[str, dict[str, Any]] = {
        "focal_loss": {"gamma": 2.0},
        "poly1_cross_entropy": {"epsilon": 1.0},
        "generalized_cross_entropy": {"q": 0.7},
        "logit_adjusted_cross_entropy": {"class_counts": counts},
        "balanced_softmax_cross_entropy": {"class_counts": counts},
        "ldam_loss": {"class_counts": counts},
    }
    return by_loss.get(problem.loss, {})


# --- the model of lm-step -------------------------------------------------------------------------------------

LM_BATCH = 8  # sequences per step: n tokens are LM_BATCH sequences of n / LM_BATCH


def lm_config(problem: Problem) -> LlamaConfig:
    """A Llama of hidden size d (4 layers, heads of 64, SwiGLU width 8d/3) with the problem's vocabulary: the model
    of examples/lm.py at d = 256."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=problem.v,
        hidden_size=problem.d,
        intermediate_size=16 * math.ceil(8 * problem.d / 3 / 16),
        num_hidden_layers=4,
        num_attention_heads=max(1, problem.d // 64),
        max_position_embeddings=problem.n // LM_BATCH,
        tie_word_embeddings=False,
    )


def lm_parameters(problem: Problem) -> int:
    """The parameters of :func:`lm_config`'s model, counted on the meta device (nothing allocated)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return sum(parameter.numel() for parameter in LlamaForCausalLM(lm_config(problem)).parameters())
