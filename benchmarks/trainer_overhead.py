"""Trainer overhead: `xent train`'s epoch against a minimal hand-written PyTorch loop, same model, data and batch.

    python benchmarks/trainer_overhead.py [--data mnist1d] [--model cnn] [--epochs 5] [--rounds 5]

Both run the same number of optimisation steps on the same tensors; rounds alternate between the two and the
medians are compared. The trainer's extra work per step — learning-rate schedule, non-finite check, grad scaler
(disabled), progress callbacks every --log-interval batches — should cost ≤ 10 %.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import xent
from xent.train import TrainConfig
from xent.train.data import as_float
from xent.train.loop import prepare, train_epoch


def minimal_epoch(model, optimizer, x, y, batch_size: int, generator: torch.Generator) -> None:
    """The loop of the PyTorch examples: shuffle, forward, loss, backward, step."""
    model.train()
    for index in torch.randperm(len(y), generator=generator).split(batch_size):
        loss = xent.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mnist1d")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    run = prepare(TrainConfig(data=args.data, model=args.model, quiet=True, out="/tmp/xent-overhead-run",
                              epochs=args.epochs * args.rounds * 2))  # fmt: skip
    model = copy.deepcopy(run.model)
    optimizer = type(run.optimizer)(model.parameters(), **run.optimizer.defaults)
    x, y = as_float(run.data.train.x), run.data.train.y
    generator = torch.Generator().manual_seed(0)
    trainer_times, minimal_times = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        for _ in range(args.epochs):
            train_epoch(run, progress=lambda *state: None)
            run.epoch += 1
        trainer_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(args.epochs):
            minimal_epoch(model, optimizer, x, y, run.config.batch_size, generator)
        minimal_times.append(time.perf_counter() - start)
    trainer, minimal = statistics.median(trainer_times), statistics.median(minimal_times)
    steps = args.epochs * -(-len(y) // run.config.batch_size)
    print(
        f"{args.data} / {args.model}, batch {run.config.batch_size}, {steps} steps per round, torch {torch.__version__}"
    )
    print(f"xent trainer   {trainer:.3f} s   ({' '.join(f'{t:.3f}' for t in trainer_times)})")
    print(f"minimal loop   {minimal:.3f} s   ({' '.join(f'{t:.3f}' for t in minimal_times)})")
    print(f"overhead       {100 * (trainer / minimal - 1):+.1f} %")


if __name__ == "__main__":
    main()
