"""The CPU kernels' block sharing: every block exactly once, the caller's intra-op threads restored, errors raised
in the caller, and the results of the threaded kernels equal to one thread's, bit for bit."""

from __future__ import annotations

import threading

import pytest
import torch

import xent
from xent.kernels.threads import for_each_block


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_every_block_once_on_several_threads_and_the_setting_restored(two_threads):
    seen, names = [], set()

    def body(rows):
        seen.append((rows.start, rows.stop))
        names.add(threading.current_thread().name)
        assert torch.get_num_threads() == 1  # single-threaded operations inside a block
        torch.ones(1000).exp_()  # releases the GIL: the other thread gets a block too

    for_each_block(1000, 7, body, torch.device("cpu"))
    assert sorted(seen) == [(start, min(start + 7, 1000)) for start in range(0, 1000, 7)]
    assert torch.get_num_threads() == 2
    assert len(names) >= 1


def test_an_error_in_a_block_is_raised_in_the_caller(two_threads):
    def body(rows):
        if rows.start == 21:
            raise ValueError("block 21")

    with pytest.raises(ValueError, match="block 21"):
        for_each_block(100, 7, body, torch.device("cpu"))
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference"])
def test_threaded_kernels_equal_one_thread_bit_for_bit(two_threads, mode):
    logits = torch.randn(1400, 3000)  # 4.2 M logits: five blocks of 349 rows
    target = torch.randint(3000, (1400,))
    target[::5] = -100

    def run():
        leaf = logits.clone().requires_grad_(mode == "grad")
        context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference": torch.inference_mode}[mode]
        with context():
            loss = xent.cross_entropy(leaf, target, impl="chunked", label_smoothing=0.1, reduction="none")
        if mode == "grad":
            loss.sum().backward()
            return loss.detach(), leaf.grad
        return (loss,)

    threaded = run()
    torch.set_num_threads(1)
    single = run()
    for a, b in zip(threaded, single, strict=True):
        assert torch.equal(a, b)


def test_small_blocks_shared_out_give_the_linear_heads_and_log_probs_of_one_thread(two_threads, monkeypatch):
    """Blocks of 3 rows: every chunk of the linear head, and of linear_log_probs' two passes, is shared out."""
    from xent.kernels import chunked

    monkeypatch.setattr(chunked, "rows_per_block", lambda num_classes, device=None: 3)
    hidden, head = torch.randn(40, 16), torch.randn(50, 16)
    target = torch.randint(50, (40,))
    target[::7] = -100

    def run():
        h, w = hidden.clone().requires_grad_(), head.clone().requires_grad_()
        loss = xent.linear_loss(xent.focal_loss, h, w, target, gamma=2.0, chunk_size=16)
        log_probs, entropy = xent.linear_log_probs(h, w, target, chunk_size=16)
        (loss + log_probs.sum() + entropy.sum()).backward()
        return loss.detach(), log_probs.detach(), entropy.detach(), h.grad, w.grad

    threaded = run()
    torch.set_num_threads(1)
    for a, b in zip(threaded, run(), strict=True):  # the GEMMs may sum in another order on one thread
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
