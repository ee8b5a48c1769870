"""Sample options of every loss of the fused family, keyed by the registry's names (:data:`xent.losses.family.FAMILY`),
and the problems the fused kernels' tests run them on.

The tests that hold a guarantee for the whole family (the fused kernels against each loss's plain definition, the
ignored rows, the gradient rule, the vocab-parallel losses, the modules) iterate the registry and take their options
from here: a loss added to the registry fails ``tests/losses/test_family.py`` until it has samples, and then runs
through every one of those tests. Each sample is a call of the loss's own options; per-class options (class counts,
a per-class α) are built for the number of classes a test uses.
"""

from __future__ import annotations

import pytest
import torch

from xent.losses.family import FAMILY


def class_counts(num_classes: int) -> torch.Tensor:
    """A long tail over the classes: C², (C - 1)², …, 1."""
    return torch.arange(num_classes, 0, -1, dtype=torch.float64) ** 2


def per_class_alpha(num_classes: int) -> torch.Tensor:
    return torch.linspace(0.2, 1.0, num_classes, dtype=torch.float64)


def samples(num_classes: int) -> dict[str, list[dict[str, object]]]:
    """Loss name → its sample options over ``num_classes`` classes (fresh tensors on every call)."""
    counts = class_counts(num_classes)
    return {
        "cross_entropy": [
            {"label_smoothing": 0.1, "z_loss": 1e-2},
            {"z_loss": 1e-3, "softcap": 5.0},
        ],
        "focal_loss": [
            {"gamma": 2.0, "alpha": per_class_alpha(num_classes)},
            {"gamma": 0.5, "alpha": 0.25},
            {"gamma": 0.0},
        ],
        "poly1_cross_entropy": [
            {"epsilon": 2.0},
            {"epsilon": -0.5, "label_smoothing": 0.1},
        ],
        "generalized_cross_entropy": [{"q": 0.5}],
        "symmetric_cross_entropy": [{"alpha": 0.5, "beta": 1.0, "log_zero": -4.0}],
        "logit_adjusted_cross_entropy": [
            {"class_counts": counts, "tau": 1.5},
            {"class_counts": counts, "tau": 1.0, "label_smoothing": 0.2},
        ],
        "balanced_softmax_cross_entropy": [{"class_counts": counts}],
        "ldam_loss": [
            {"class_counts": counts, "scale": 2.0},
            {"class_counts": counts, "max_margin": 0.3},  # s = 30, the default
        ],
    }


def sample(name: str, index: int, num_classes: int) -> dict[str, object]:
    """The options of one sample: ``samples(num_classes)[name][index]``."""
    return samples(num_classes)[name][index]


def smooths(options: dict[str, object]) -> bool:
    """Whether a sample smooths the labels: over a masked class (a logit of -inf) that is an infinite loss for every
    row, as in PyTorch — the tests that mask a class leave such samples out."""
    return bool(options.get("label_smoothing"))


def first_unsmoothed(name: str, num_classes: int) -> dict[str, object]:
    """The first sample of ``name`` that does not smooth the labels: the one a test that takes one sample per loss
    and masks a class uses."""
    return next(options for options in samples(num_classes)[name] if not smooths(options))


def _shown(options: dict[str, object]) -> str:
    return ",".join(
        f"{key}=per-class" if isinstance(value, torch.Tensor) else f"{key}={value}" for key, value in options.items()
    )


def cases(names=None) -> list:
    """``(name, index)`` of every sample of every loss of the registry (or of ``names``), as pytest parameters
    named after the loss and its options. A loss without samples has no case here: the guard fails instead."""
    table = samples(2)
    return [
        pytest.param(name, index, id=f"{name}({_shown(options)})")
        for name in (FAMILY if names is None else names)
        for index, options in enumerate(table.get(name, []))
    ]


# --- problems --------------------------------------------------------------------------------------------------

C = 7  # the classes of the problems below


def problem(dtype, weighted, token_weighted):
    """Logits (4, C, 5) with some targets ignored, optionally a class weight and token weights."""
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


def head_problem(dtype, name=None):
    """A linear head over C classes — hidden states (2, 5, 6), its weight and bias — with class and token weights;
    for LDAM (``name="ldam_loss"``) a small head, whose logits are cosine-like."""
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
    if name == "ldam_loss":  # cosine-like logits
        tensors["linear_weight"] = tensors["linear_weight"] * 0.1
    return tensors
