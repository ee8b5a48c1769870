"""Where and how a run executes: device, processes under torchrun, optimizer, learning-rate schedule, batches."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import cast

import torch
import torch.distributed as dist

from xent.train.config import ConfigError, TrainConfig
from xent.train.data import Split


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(config: TrainConfig) -> Runtime:
    """Pick the device; under torchrun (WORLD_SIZE > 1) join the process group: gloo on CPU, nccl on CUDA."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Runtime(torch.device("cuda" if use_cuda else "cpu"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return Runtime(device, dist.get_rank(), dist.get_world_size())


def shutdown(runtime: Runtime) -> None:
    """Leave the process group together: rank 0 still writes plots when the others are done, and a process group
    torn down while a peer is still using it can hang the peer."""
    if runtime.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def build_optimizer(config: TrainConfig, parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    lr, decay = cast(float, config.lr), cast(float, config.weight_decay)  # set by resolve()
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            parameters, lr=lr, momentum=config.momentum, nesterov=config.nesterov, weight_decay=decay
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=decay)
    if config.optimizer == "nadam":
        return torch.optim.NAdam(parameters, lr=lr, weight_decay=decay)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=decay)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """The learning rate at ``step`` as a fraction of the peak: linear warm-up, then the schedule over the rest.

    ``step`` drops 10× at 50 % and 75 % of training; ``cosine`` anneals to 0; ``onecycle`` ramps from 1/25 of the
    peak over the first 30 % and anneals to 0 (Smith & Topin, 2019).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if progress < 0.3:  # onecycle
        return 0.04 + 0.96 * progress / 0.3
    return 0.5 * (1.0 + math.cos(math.pi * (progress - 0.3) / 0.7))


def build_scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    # resolve() has set the epochs and the schedule
    total, warmup = cast(int, config.epochs) * steps_per_epoch, config.warmup_epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, cast(str, config.schedule))
    )


def steps_per_epoch(size: int, batch_size: int, runtime: Runtime) -> int:
    """Optimizer steps in one epoch for each process: its padded share of ``size`` examples, in batches."""
    return math.ceil(math.ceil(size / runtime.world_size) / batch_size)


def epoch_order(size: int, seed: int, epoch: int, runtime: Runtime) -> torch.Tensor:
    """This process's example order for ``epoch``: a permutation seeded by (seed, epoch) — so a resumed run sees
    the same order — split across processes like ``DistributedSampler`` (padded so each gets as many)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(size, generator=generator)
    padded = math.ceil(size / runtime.world_size) * runtime.world_size
    order = torch.cat([order, order[: padded - size]])
    return order[runtime.rank :: runtime.world_size]


def batches(split: Split, order: torch.Tensor, batch_size: int, workers: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """``(x, y)`` batches of ``split`` in ``order``; with ``workers`` > 0 through a DataLoader's worker processes."""
    chunks = list(order.split(batch_size))
    if workers == 0:
        for index in chunks:
            yield split.x[index], split.y[index]
        return
    dataset = torch.utils.data.TensorDataset(split.x, split.y)
    yield from torch.utils.data.DataLoader(dataset, batch_sampler=[c.tolist() for c in chunks], num_workers=workers)
