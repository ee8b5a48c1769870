"""The module of several losses at once (:mod:`xent.nn`): :class:`WeightedSum`, a weighted sum of named losses that
take the same inputs."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from xent.losses import combine


class WeightedSum(torch.nn.Module):
    r"""A weighted sum :math:`\sum_k \lambda_k \mathcal{L}_k` of named losses that take the same inputs.

    Every call computes each term on the same arguments and keeps their values (detached) in ``last_terms``
    for logging. For terms with different inputs use :func:`xent.weighted_sum`.

    Example:
        >>> criterion = xent.nn.WeightedSum({"ce": (1.0, xent.nn.CrossEntropyLoss()),
        ...                                  "focal": (0.5, xent.nn.FocalLoss(gamma=2.0))})
        >>> logits, target = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]]), torch.tensor([0, 1])
        >>> criterion(logits, target)
        tensor(2.3761)
        >>> criterion.last_terms
        {'ce': tensor(1.6681), 'focal': tensor(1.4160)}

    Args:
        terms: by name, a pair (weight, loss); losses that are Modules are registered as sub-modules, so their
            buffers follow ``.to(device)``.
    """

    def __init__(self, terms: Mapping[str, tuple[float, Callable[..., torch.Tensor]]]) -> None:
        super().__init__()
        combine.check_mapping("terms", terms)
        if not terms:
            raise ValueError("terms must name at least one loss")
        for name, term in terms.items():
            if not (isinstance(term, tuple) and len(term) == 2 and callable(term[1])):
                raise TypeError(f"terms[{name!r}] must be a pair (weight, loss) with a callable loss, got {term!r}")
        self.weights = combine.check_term_weights({name: weight for name, (weight, _) in terms.items()})
        self.losses = torch.nn.ModuleDict(
            {name: fn for name, (_, fn) in terms.items() if isinstance(fn, torch.nn.Module)}
        )
        self._functions = {name: fn for name, (_, fn) in terms.items() if not isinstance(fn, torch.nn.Module)}
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        named: tuple[tuple[str, Callable[..., torch.Tensor]], ...] = (*self.losses.items(), *self._functions.items())
        terms = {name: fn(*inputs) for name, fn in named}
        self.last_terms = {name: value.detach() for name, value in terms.items()}
        return combine.weighted_sum(terms, self.weights)

    def extra_repr(self) -> str:
        return f"weights={self.weights!r}"
