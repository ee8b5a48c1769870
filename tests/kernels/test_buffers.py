"""The CPU gradient buffer kept between calls (xent.kernels.buffers): handed out again only when nothing else holds
it, never while a gradient on it is alive, and every gradient equal to PyTorch's whatever buffer it is written into.
The size threshold is lowered so that small problems use the cache (for the whole suite: tests/conftest.py)."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

import xent
from xent.kernels import buffers


@pytest.fixture
def cache():
    """The cache on (for every size, as tests/conftest.py sets it), and empty before and after the test."""
    xent.set_buffer_cache(True)
    xent.empty_cache()
    yield
    xent.empty_cache()


def _problem(rows=64, classes=300, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, classes, generator=generator), torch.randint(classes, (rows,), generator=generator)


def _reference_grad(logits, target, **options):
    leaf = logits.double().requires_grad_()
    F.cross_entropy(leaf, target, **options).backward()
    return leaf.grad


def _step(logits, target, **options):
    """A leaf's forward + backward through the fused kernel; the leaf, holding its gradient."""
    leaf = logits.clone().requires_grad_()
    xent.cross_entropy(leaf, target, impl="chunked", **options).backward()
    return leaf


def _storage(tensor):
    return tensor.untyped_storage().data_ptr()


def _kept():
    """The storages the cache keeps (alive while kept: equal pointers are the same storage)."""
    return {storage.data_ptr() for storage in buffers._kept}


def test_a_free_buffer_is_written_again_and_every_gradient_is_exact(cache):
    pointers = []
    for seed in range(4):
        logits, target = _problem(seed=seed)
        leaf = _step(logits, target, label_smoothing=0.1)
        torch.testing.assert_close(leaf.grad.double(), _reference_grad(logits, target, label_smoothing=0.1))
        assert leaf.grad._base is None  # a plain tensor, moved into .grad without a copy
        pointers.append(_storage(leaf.grad))
        del leaf  # the step is over: its gradient is freed, nothing but the cache holds the buffer
    assert set(pointers) == _kept() and len(pointers) == 4
    assert xent.cached_bytes() == 64 * 300 * 4


def test_a_gradient_still_held_keeps_its_buffer(cache):
    first = _step(*_problem(seed=0))
    kept = first.grad.clone()
    assert xent.cached_bytes() == 0  # the buffer is first.grad's
    logits, target = _problem(seed=1)
    second = _step(logits, target)
    assert _storage(second.grad) != _storage(first.grad)
    torch.testing.assert_close(first.grad, kept, rtol=0, atol=0)  # untouched by the second call
    torch.testing.assert_close(second.grad.double(), _reference_grad(logits, target))
    view = second.grad[3:]  # a view holds the storage too
    del second
    third = _step(*_problem(seed=2))
    assert _storage(third.grad) not in (_storage(view), _storage(first.grad))


def test_a_gradient_accumulated_into_a_leaf(cache):
    logits, target = _problem()
    leaf = logits.clone().requires_grad_()
    for _ in range(3):  # no zero_grad: the second and third gradients are added to the first
        xent.cross_entropy(leaf, target, impl="chunked").backward()
    torch.testing.assert_close(leaf.grad.double(), 3 * _reference_grad(logits, target))


def test_a_scaled_gradient_through_a_model(cache):
    """The gradient flows on through a layer (the usual training step) and is scaled by a non-unit grad_output."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 300, dtype=torch.float64)
    inputs, target = torch.randn(64, 16, dtype=torch.float64), torch.randint(300, (64,))
    for _ in range(3):
        layer.zero_grad(set_to_none=True)
        (2.5 * xent.cross_entropy(layer(inputs), target, impl="chunked")).backward()
        got = layer.weight.grad.clone()
        layer.zero_grad(set_to_none=True)
        (2.5 * F.cross_entropy(layer(inputs), target)).backward()
        torch.testing.assert_close(got, layer.weight.grad)
    assert xent.cached_bytes() == 64 * 300 * 8


def test_only_a_buffer_that_fits_is_handed_out_and_at_most_two_are_kept(cache):
    row = 300 * 4  # bytes of one row of the gradient
    big = _step(*_problem(rows=64))
    del big
    small = _step(*_problem(rows=16))  # a quarter: the kept 64 rows would hold 4× the memory asked for
    assert xent.cached_bytes() == 0  # the shapes changed: the free big buffer was let go, the small one is in use
    small_storage = _storage(small.grad)
    del small
    assert xent.cached_bytes() == 16 * row
    other = _step(*_problem(rows=70))  # fits no kept buffer: a new one, the free small one let go
    other_storage = _storage(other.grad)
    del other
    assert xent.cached_bytes() == 70 * row
    fits = _step(*_problem(rows=40))  # 40 ≤ 70 ≤ 80: handed out
    assert _storage(fits.grad) == other_storage != small_storage
    alive = [fits, _step(*_problem(rows=40)), _step(*_problem(rows=40))]  # three in use at once: two are kept
    del fits
    assert len(buffers._kept) == 2 and xent.cached_bytes() == 0
    alive.clear()
    assert xent.cached_bytes() == 70 * row + 40 * row
    for rows in (100, 3, 70, 9, 50):
        _step(*_problem(rows=rows))
        assert xent.cached_bytes() <= 2 * rows * row  # what the last call asked for, at most twice over


def test_a_storage_object_held_or_shared_is_not_handed_out(cache):
    """A caller may hold a gradient's storage object (``untyped_storage()``, the very object the cache keeps) or
    move it to shared memory: neither is written over."""
    first = _step(*_problem(seed=0))
    storage, values = first.grad.untyped_storage(), first.grad.clone()
    del first
    second = _step(*_problem(seed=1))
    assert _storage(second.grad) != storage.data_ptr()
    torch.testing.assert_close(torch.empty(0).set_(storage, 0, values.shape), values, rtol=0, atol=0)
    shared = second.grad.share_memory_()
    del second, shared
    assert xent.cached_bytes() == 0
    third = _step(*_problem(seed=2))
    assert not third.grad.is_shared()


def _child(connection):
    gradient = connection.recv()
    expected = gradient.clone()
    connection.send("received")
    connection.recv()  # the parent has taken its next buffer and written it
    connection.send(torch.equal(gradient, expected))


def test_a_gradient_sent_to_another_process_is_not_written_over(cache):
    context = torch.multiprocessing.get_context("fork")
    parent, child = context.Pipe()
    process = context.Process(target=_child, args=(child,))
    process.start()
    try:
        leaf = _step(*_problem(seed=0))
        parent.send(leaf.grad)  # through shared memory: the child maps the same pages
        assert parent.recv() == "received"
        del leaf
        _step(*_problem(seed=1)).grad.fill_(7.0)
        parent.send("look")
        assert parent.recv() is True
    finally:
        process.join(timeout=30)


def test_linear_heads_take_their_chunks_from_it(cache):
    """A linear head's chunk of logits and a distillation's teacher chunk are kept too: every step, each on a
    buffer that held the last step's values, equals the reference."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(48, 16, dtype=torch.float64), torch.randn(300, 16, dtype=torch.float64)
    teacher_hidden, teacher_weight = torch.randn(48, 8, dtype=torch.float64), torch.randn(300, 8, dtype=torch.float64)
    target = torch.randint(300, (48,))
    for step in range(3):
        scale = 1.0 + step
        leaves = [(scale * hidden).requires_grad_(), weight.clone().requires_grad_()]
        teacher = dict(teacher_input=teacher_hidden, teacher_linear_weight=teacher_weight, divergence="jsd", beta=0.3)
        loss = xent.linear_cross_entropy(*leaves, target, impl="chunked", chunk_size=16)
        loss = loss + xent.linear_distillation_loss(*leaves, **teacher, impl="chunked", chunk_size=16)
        got = torch.autograd.grad(loss, leaves)
        references = [leaf.detach().clone().requires_grad_() for leaf in leaves]
        expected = xent.linear_cross_entropy(*references, target, impl="reference")
        expected = expected + xent.linear_distillation_loss(*references, **teacher, impl="reference")
        torch.testing.assert_close(loss, expected)
        for a, b in zip(got, torch.autograd.grad(expected, references), strict=True):
            torch.testing.assert_close(a, b)
    assert xent.cached_bytes() == 2 * 16 * 300 * 8  # the student's and the teacher's chunk


def test_small_gradients_and_other_devices_are_not_kept(monkeypatch):
    monkeypatch.setattr(buffers, "MIN_BYTES", 16 << 20)  # the library's threshold (tests/conftest.py lowers it)
    xent.empty_cache()
    _step(*_problem())  # 77 KB, far below MIN_BYTES: glibc's heap serves it
    assert xent.cached_bytes() == 0
    monkeypatch.setattr(buffers, "MIN_BYTES", 0)
    meta = torch.empty(64, 300, device="meta")
    assert buffers.empty((64, 300), torch.float32, meta.device).device.type == "meta"
    assert xent.cached_bytes() == 0


def test_the_switch_and_empty_cache(cache):
    _step(*_problem())
    assert xent.empty_cache() == 64 * 300 * 4
    assert xent.cached_bytes() == 0
    _step(*_problem())
    xent.set_buffer_cache(False)  # also frees what was kept
    try:
        assert xent.cached_bytes() == 0
        logits, target = _problem()
        leaf = _step(logits, target)
        torch.testing.assert_close(leaf.grad.double(), _reference_grad(logits, target))
        del leaf
        assert xent.cached_bytes() == 0
    finally:
        xent.set_buffer_cache(True)
    with pytest.raises(TypeError, match="enabled must be True or False, got 'no'"):
        xent.set_buffer_cache("no")


def test_the_environment_turns_it_off():
    code = "import xent.kernels.buffers as b; print(b._enabled)"
    for value, expected in (("0", "False"), ("1", "True")):
        out = subprocess.run(
            [sys.executable, "-c", code], env={"XENT_BUFFER_CACHE": value, "PATH": ""}, capture_output=True, text=True
        )
        assert out.stdout.strip() == expected, out.stderr


def test_threads_never_share_a_buffer(cache):
    results, errors = {}, []

    def worker(seed):
        try:
            for step in range(5):
                logits, target = _problem(seed=10 * seed + step)
                leaf = _step(logits, target)
                torch.testing.assert_close(leaf.grad.double(), _reference_grad(logits, target))
                results[seed, step] = leaf  # alive until the end: no other thread may get its buffer
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    assert len({_storage(leaf.grad) for leaf in results.values()}) == len(results) == 15


def test_compiled_calls_take_the_kept_buffer_too(cache):
    """Inductor runs the operator's in-place scaling on the stored gradient and returns it: the kept buffer, step
    after step."""
    compiled = torch.compile(lambda x, t: xent.cross_entropy(x, t, impl="chunked"), fullgraph=True)
    pointers = []
    for seed in range(3):
        logits, target = _problem(seed=seed)
        leaf = logits.clone().requires_grad_()
        (0.5 * compiled(leaf, target)).backward()
        torch.testing.assert_close(leaf.grad.double(), 0.5 * _reference_grad(logits, target))
        pointers.append(_storage(leaf.grad))
        del leaf
    assert set(pointers) == _kept()
