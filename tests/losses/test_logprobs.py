"""linear_log_probs' public function (xent.losses.logprobs): exported, and its errors name the argument. Its chunked
kernel is tested in tests/kernels/test_logprobs.py."""

import math

import pytest
import torch

import xent
from tests.kernels.test_logprobs import D, V, _problem, ours


def test_exported():
    assert "linear_log_probs" in xent.__all__ and xent.linear_log_probs is xent.losses.linear_log_probs
    assert "linear_token_outputs" in xent.__all__ and xent.TokenOutputs is xent.losses.TokenOutputs


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"temperature": 0.0}, ValueError, r"temperature must be in \(0, inf\), got 0"),
        ({"temperature": -0.5}, ValueError, r"temperature must be in \(0, inf\), got -0.5"),
        ({"temperature": math.inf}, ValueError, r"temperature must be in \(0, inf\), got inf"),
        ({"temperature": math.nan}, ValueError, "temperature must not be NaN"),
        ({"temperature": "1"}, TypeError, "temperature must be a number, got str"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int, got float 1.5"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int or None, got 0"),
        ({"logit_scale": 0.0}, ValueError, r"logit_scale must be in \(0, inf\), got 0"),
        ({"logit_scale": None}, TypeError, "logit_scale must be a number"),
        ({"softcap": -1.0}, ValueError, r"softcap must be in \(0, inf\), got -1"),
        ({"softcap": math.inf}, ValueError, r"softcap must be in \(0, inf\), got inf"),
        ({"w": torch.randn(V, D + 1, dtype=torch.float64)}, ValueError, r"linear_weight has shape \(13, 7\)"),
        (
            {"w": torch.randn(V, D)},
            TypeError,
            "linear_weight has dtype torch.float32 but input has dtype torch.float64",
        ),
        (
            {"b": torch.randn(V + 1, dtype=torch.float64)},
            ValueError,
            r"linear_bias must have shape \(13,\), got shape \(14,\)",
        ),
        ({"b": torch.randn(V)}, TypeError, "linear_bias has dtype torch.float32"),
        ({"x": torch.tensor(1.0, dtype=torch.float64)}, ValueError, r"input must have shape \(..., D\)"),
        ({"x": torch.randint(3, (4, D))}, TypeError, "input must be a floating-point tensor, got dtype torch.int64"),
        ({"target": torch.zeros(5, dtype=torch.long)}, ValueError, r"target has shape \(5,\) but input has shape"),
        ({"target": torch.full((4,), V)}, ValueError, r"target holds class index 13, outside \[0, 13\)"),
        ({"target": torch.full((4,), -1)}, ValueError, r"target holds class index -1"),
        ({"target": torch.full((4, V), 1.0 / V, dtype=torch.float64)}, TypeError, "linear_log_probs takes class"),
        ({"target": torch.zeros(4, dtype=torch.float64)}, TypeError, "must have an integer dtype"),
    ],
)
def test_errors_name_the_argument(change, error, message):
    x, w, b, target = _problem((4,))
    arguments = {"x": x, "w": w, "b": b, "target": target, **change}
    x, w, b, target = (arguments.pop(key) for key in ("x", "w", "b", "target"))
    with pytest.raises(error, match=message):
        ours(x, w, b, target, **arguments)


@pytest.mark.parametrize(
    ("outputs", "error", "message"),
    [
        (("log_probs", "entropies"), ValueError, "outputs has 'entropies'; expected names among 'log_probs'"),
        ("entropy", TypeError, "outputs must be a collection of output names, not the string 'entropy'"),
        (None, TypeError, "outputs must be a collection of output names, got None"),  # found by the fuzz layer
        ([1], ValueError, "outputs has 1; expected names among"),
    ],
)
def test_token_outputs_errors_name_the_argument(outputs, error, message):
    x, w, b, target = _problem((4,))
    with pytest.raises(error, match=message):
        xent.linear_token_outputs(x, w, target, linear_bias=b, outputs=outputs)
