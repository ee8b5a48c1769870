"""What the tests of xent.hf under a training engine through ``transformers.Trainer`` share (ZeRO-3, accelerate's
FSDP2): a fixed data set, the Trainer's arguments, each rank's environment, and the comparison of a patched run with
an unpatched one — per-step losses, every final weight, and every micro-batch fused on the whole head."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch

from tests.integrations.tiny_models import COMMON, VOCAB

WORLD = 2
HEAD_NUMEL = VOCAB * COMMON["hidden_size"]
STEPS, ACCUMULATION, BATCH, LENGTH = 3, 2, 2, 10


class TokenData(torch.utils.data.Dataset):
    """Fixed token ids, their labels partly -100 (unevenly across rows, so that gradient accumulation's
    normalisation by the micro-batches' token count matters)."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(1)
        rows = WORLD * BATCH * ACCUMULATION * STEPS
        self.input_ids = torch.randint(3, VOCAB, (rows, LENGTH), generator=generator)
        self.labels = self.input_ids.clone()
        for row in range(rows):
            self.labels[row, : row % 5] = -100

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index):
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


def arguments(output_dir: str, **engine: Any):
    """The Trainer's arguments, the engine's (``deepspeed=…``, ``fsdp=…``) added."""
    import transformers

    return transformers.TrainingArguments(
        output_dir=output_dir,
        use_cpu=True,  # gloo
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUMULATION,
        max_steps=STEPS,
        learning_rate=1e-3,
        # Adam moves a weight by about the learning rate whatever its gradient's size: a larger epsilon keeps the
        # gradients' last-bit differences (the fused loss sums in another order) from moving tiny-gradient weights
        adam_epsilon=1e-6,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **engine,
    )


def rank_environment(rank: int, world: int, port: int, **extra: str) -> None:
    """What ``torchrun`` would set for the rank; one intra-op thread per rank (two ranks on two cores)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    os.environ.update(extra)
    torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def assert_patched_trains_as_unpatched(
    train: Callable[[bool, bool], tuple[list[float], dict[str, torch.Tensor]]],
    read: Callable[[Any], tuple[Any, ...]],
    expected_read: tuple[Any, ...],
) -> None:
    """For an untied and a tied head: ``train(tied, patched)`` from scratch unpatched, then patched; the per-step
    losses and every final weight agree, and every micro-batch of the patched run fused, ``read(head weight)`` of
    the head xent read being ``expected_read`` (whole, as the engine gathered it)."""
    from xent.integrations.causal_lm_loss import FusedLoss

    fused_calls = []
    original = FusedLoss.causal_lm_loss

    def counted(self, logits, labels, shift_labels, vocab_size, num_items_in_batch, *args):
        # the head as xent read it, and whether the Trainer passed its accumulation's token count
        fused_calls.append((*read(logits.head.weight), num_items_in_batch is not None))
        return original(self, logits, labels, shift_labels, vocab_size, num_items_in_batch, *args)

    FusedLoss.causal_lm_loss = counted
    try:
        for tied in (False, True):
            expected_losses, expected_weights = train(tied, False)
            assert not fused_calls
            losses, weights = train(tied, True)
            assert fused_calls == [(*expected_read, True)] * (STEPS * ACCUMULATION), fused_calls
            fused_calls.clear()
            torch.testing.assert_close(losses, expected_losses, rtol=1e-5, atol=0)
            assert weights.keys() == expected_weights.keys()
            for name, weight in expected_weights.items():
                message = f"tied={tied} {name}"
                torch.testing.assert_close(
                    weights[name], weight, rtol=1e-5, atol=1e-6, msg=lambda detail, m=message: f"{m}: {detail}"
                )
    finally:
        FusedLoss.causal_lm_loss = original
