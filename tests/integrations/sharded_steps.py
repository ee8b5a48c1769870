"""A training step of a model sharded by an engine, read back whole, and the comparison of two such steps: shared by
the tensor-parallel and FSDP2 × tensor-parallel tests."""

from __future__ import annotations

import torch


def step(model, batch, **kwargs):
    """The loss and every parameter's gradient (a sharded one gathered with ``full_tensor()``)."""
    from torch.distributed.tensor import DTensor

    model.zero_grad(set_to_none=True)
    loss = model(**batch, **kwargs).loss
    loss.backward()
    grads = {}
    for name, parameter in model.named_parameters():
        grads[name] = parameter.grad.full_tensor() if isinstance(parameter.grad, DTensor) else parameter.grad
    return loss.detach(), grads


def assert_same(got, expected, message):
    """Two steps' losses and gradients equal (each gradient relative to its largest entry)."""
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6, msg=message)
    assert got[1].keys() == expected[1].keys()
    for name, grad in expected[1].items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(got[1][name], grad, rtol=1e-4, atol=1e-5 * scale, msg=f"{message} {name}")
