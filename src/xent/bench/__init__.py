"""The bench behind ``xent bench``: every implementation of a loss side by side, timed and measured."""

from xent.bench.cases import IMPLEMENTATIONS
from xent.bench.problem import Problem, Unavailable
from xent.bench.runner import Measurement, run_bench

__all__ = ["IMPLEMENTATIONS", "Measurement", "Problem", "Unavailable", "run_bench"]
