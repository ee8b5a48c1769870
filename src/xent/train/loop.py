"""``xent train``: the training loop, its run directory, checkpoints and exact resume.

A run directory holds ``config.json`` (the resolved configuration), ``metrics.csv`` (one row per completed epoch),
``last.pt`` and ``best.pt`` (atomic checkpoints that carry the run's identity), ``summary.json`` and ``plots/``, and
``.lock``, held by the one process that writes the directory. The best checkpoint is chosen on the validation split
— highest accuracy, then lowest loss — never on the test set; ``summary.json`` reports the test metrics of that
model (of the last epoch when there is no validation split).
"""

from __future__ import annotations

import csv
import gc
import io
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from xent.train import checkpoint, plots
from xent.train.config import ConfigError, TrainConfig, parse_augment, resolve, run_identity
from xent.train.data import DataBundle, Split, as_float, load_data
from xent.train.losses import LOSSES
from xent.train.metrics import Metrics, MetricSet, labelled_bins
from xent.train.models import build_model
from xent.train.objective import Criterion, build_criterion
from xent.train.runtime import (
    Runtime,
    batches,
    build_optimizer,
    build_scheduler,
    epoch_order,
    setup_runtime,
    shutdown,
    steps_per_epoch,
)

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import TaskID

CSV_FIELDS = ["epoch", "lr", "train_loss", "val_loss", "val_accuracy", "test_loss", "test_accuracy",
              "test_balanced_accuracy", "test_macro_f1", "test_nll", "test_ece", "seconds"]  # fmt: skip


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and the batch."""


@dataclass
class Run:
    """Everything a training run holds; built by :func:`prepare`, advanced by :func:`train_epoch`."""

    config: TrainConfig
    runtime: Runtime
    directory: Path
    identity: dict[str, Any]  # run_identity(config): what every checkpoint of this run carries
    lock: checkpoint.Lock | None  # held by the main process for the run's life
    data: DataBundle
    model: nn.Module  # the plain module: what checkpoints hold and evaluation runs
    trainer: nn.Module  # what training calls: compiled and/or DistributedDataParallel around `model`
    criterion: Criterion
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    augment: nn.Module | None
    history: list[dict[str, Any]]
    epoch: int = 0  # completed epochs
    best_val: tuple[float, float] = (-math.inf, -math.inf)  # (accuracy, -loss) of the best epoch so far
    train_seconds: float = 0.0


def _augmentation(names: list[str], input_shape: tuple[int, ...]) -> nn.Module | None:
    if not names:
        return None
    if len(input_shape) != 3:
        raise ConfigError(f"--augment {','.join(names)} needs image data; this data set holds 1-D signals")
    import kornia.augmentation as K

    size = input_shape[1:]
    padding = max(1, size[0] // 8)  # 4 pixels for 32×32, 1 for 8×8
    layers = {"flip": K.RandomHorizontalFlip(p=0.5), "rotate": K.RandomRotation(degrees=10.0, p=0.5),
              "crop": K.RandomCrop(size, padding=padding)}  # fmt: skip
    return nn.Sequential(*(layers[name] for name in names))


def default_run_name(config: TrainConfig) -> str:
    """``20260105-101500-123456-digits-mlp-focal-imbalance100-noise0.2``: the time, then what tells runs apart."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    parts = [stamp, config.data.replace(":", "-").replace("/", "_"), str(config.model), config.loss]
    if config.imbalance_ratio > 1:
        parts.append(f"imbalance{config.imbalance_ratio:g}")
    if config.label_noise > 0:
        parts.append(f"noise{config.label_noise:g}")
    return "-".join(parts)


def _directory(config: TrainConfig) -> Path:
    """The run directory of a resolved configuration: --resume, --out, runs/--name, or a new name under runs/."""
    if config.resume is not None or config.out is not None:
        return Path(cast(str, config.resume or config.out))
    if config.name is not None:
        directory = Path("runs") / config.name
        if (directory / "config.json").is_file():
            raise ConfigError(f"--name {config.name}: {directory} already holds a run; choose another --name, or "
                              f"continue it with --resume {directory}")  # fmt: skip
        return directory
    return Path("runs") / default_run_name(config)


# The files the trainer writes atomically, whose temporary files a killed writer may have left
WRITTEN = (checkpoint.LAST, checkpoint.BEST, "metrics.csv", "summary.json", "config.json")


def prepare(config: TrainConfig) -> Run:
    """Resolve the configuration, lock the run directory, build data, model and optimizer; on ``--resume`` check
    that the checkpoints are this run's and restore the last one. The caller releases ``run.lock``
    (:func:`train` does)."""
    if config.resume is not None:
        directory = Path(config.resume)
        if not (directory / checkpoint.LAST).is_file():
            raise ConfigError(f"--resume {directory}: no checkpoint {directory / checkpoint.LAST} to continue from")
        saved = TrainConfig.saved(directory, "--resume")
        overrides = {
            "quiet": config.quiet,
            "device": config.device,
            "resume": str(directory),
            "workers": config.workers,
        }
        config = TrainConfig.from_dict({**saved, **overrides})
    config = resolve(config)
    directory = _directory(config)
    identity = run_identity(config)
    runtime = setup_runtime(config)
    held = None
    try:
        if config.resume is not None:
            # before anything is read: the checkpoints are this process's to read and write from here on
            held = checkpoint.lock(directory, f"--resume {directory}") if runtime.is_main else None
            state = _resumable_state(directory, identity)
        run = _build(config, runtime, directory, identity)
        if config.resume is None and runtime.is_main:
            flag = f"--out {config.out}" if config.out is not None else f"--name {config.name or directory.name}"
            held = checkpoint.lock(directory, flag)  # makes the directory
        run.lock = held
        if runtime.is_main:
            checkpoint.remove_stale_temporaries(directory, WRITTEN)  # a killed writer's: under the lock, no one's
        if config.resume is not None:
            _restore(run, state)
        elif runtime.is_main:
            checkpoint.write_atomic(directory / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
        return run
    except BaseException:
        if held is not None:
            held.release()
        raise


def _build(config: TrainConfig, runtime: Runtime, directory: Path, identity: dict[str, Any]) -> Run:
    torch.manual_seed(config.seed)
    data = load_data(config)
    # every random state the run can touch is its configuration's — a process that trained another run before
    # (a worker of xent compare) draws as a fresh one; mnist1d's generator seeds these two itself, once per process
    random.seed(config.seed)
    np.random.seed(config.seed % 2**32)
    augment = _augmentation(parse_augment(config.augment), data.input_shape)
    # resolve() has set the model, the batch size and the number of epochs
    model = build_model(
        cast(str, config.model), data.input_shape, data.num_classes, cosine_scale=LOSSES[config.loss].cosine_scale
    )
    model = model.to(runtime.device)
    trainer: nn.Module = model
    if config.compile:
        trainer = cast(nn.Module, torch.compile(trainer))  # an OptimizedModule
    if runtime.distributed:
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        trainer = nn.parallel.DistributedDataParallel(trainer, device_ids=device_ids)
    optimizer = build_optimizer(config, model.parameters())
    scheduler = build_scheduler(
        config, optimizer, steps_per_epoch(len(data.train), cast(int, config.batch_size), runtime)
    )
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=config.amp and runtime.device.type == "cuda")
    return Run(config, runtime, directory, identity, None, data, model, trainer, build_criterion(config, data),
               optimizer, scheduler, scaler, augment, history=[])  # fmt: skip


def _state(run: Run) -> dict[str, Any]:
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "epoch": run.epoch,
        "best_val": list(run.best_val),
        "train_seconds": run.train_seconds,
        "history": run.history,
        "rng": checkpoint.rng_state(),
    }


def _resumable_state(directory: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The last checkpoint of a run directory, once it and the best one are known to be this run's (``identity``);
    else a ConfigError in one line that names the file, what is wrong and the way on (the best checkpoint, or a new
    run). Nothing in the directory is changed."""
    last, best = directory / checkpoint.LAST, directory / checkpoint.BEST
    try:
        state = checkpoint.load(last, run=identity)
    except checkpoint.CheckpointError as error:
        try:
            epoch = checkpoint.load(best, run=identity)["epoch"]
            way_on = f"{best} is intact (epoch {epoch}): copy it over {last} to resume from there"
        except (checkpoint.CheckpointError, FileNotFoundError):
            way_on = "no intact checkpoint is left"
        raise ConfigError(f"--resume {directory}: {error}; {way_on}, or start over with --out NEW_DIR") from None
    if best.is_file():  # checked now, not after training every remaining epoch: finish() reads it
        try:
            checkpoint.load(best, run=identity)
        except checkpoint.CheckpointError as error:
            raise ConfigError(f"--resume {directory}: {error}; this run's best model is not there: start over "
                              "with --out NEW_DIR") from None  # fmt: skip
    return state


def _restore(run: Run, state: dict[str, Any]) -> None:
    try:  # a checkpoint written before run identities can still hold another model
        run.model.load_state_dict(state["model"])
    except RuntimeError as error:
        last = run.directory / checkpoint.LAST
        raise ConfigError(f"--resume {run.directory}: {last} does not fit this run's model ({_first_line(error)}); "
                          "it belongs to another run: start over with --out NEW_DIR") from None  # fmt: skip
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.epoch, run.best_val = state["epoch"], tuple(state["best_val"])
    run.train_seconds, run.history = state["train_seconds"], list(state["history"])
    checkpoint.set_rng_state(state["rng"])


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:160]


def _autocast(run: Run) -> torch.autocast:
    dtype = torch.bfloat16 if run.runtime.device.type == "cpu" else torch.float16
    return torch.autocast(run.runtime.device.type, dtype=dtype, enabled=run.config.amp)


def train_epoch(run: Run, progress: Callable[[int, float, float], None] | None = None) -> float:
    """One pass over the training split; returns the training loss averaged over examples."""
    config, runtime = run.config, run.runtime
    run.trainer.train()
    order = epoch_order(len(run.data.train), config.seed, run.epoch, runtime)
    total = torch.zeros((), dtype=torch.float64, device=runtime.device)
    seen = 0
    started = time.perf_counter()
    for batch_index, (x, y) in enumerate(batches(run.data.train, order, cast(int, config.batch_size), config.workers)):
        x, y = as_float(x.to(runtime.device, non_blocking=True)), y.to(runtime.device, non_blocking=True)
        if run.augment is not None:
            x = run.augment(x)
        with _autocast(run):
            logits = run.trainer(x)  # (B, C)
        loss = run.criterion(logits.float(), y, run.epoch, "mean")
        if not torch.isfinite(loss):  # sync point: one scalar per batch
            raise TrainingDiverged(
                f"the training loss is {loss.item()} at epoch {run.epoch + 1}, batch {batch_index + 1}; stopping. "
                f"The last good checkpoint is {run.directory / checkpoint.LAST}"
            )
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        if config.grad_clip is not None:
            run.scaler.unscale_(run.optimizer)
            nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()
        total += loss.detach().double() * len(y)
        seen += len(y)
        if progress is not None and ((batch_index + 1) % config.log_interval == 0 or seen == len(order)):
            rate = seen * runtime.world_size / (time.perf_counter() - started)
            progress(batch_index + 1, float(total) / seen, rate)
    if runtime.distributed:
        totals = torch.tensor([float(total), seen], dtype=torch.float64, device=runtime.device)
        torch.distributed.all_reduce(totals)
        return float(totals[0] / totals[1])
    return float(total) / max(seen, 1)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, criterion: Criterion, epoch: int, runtime: Runtime,
             batch_size: int, num_classes: int) -> Metrics | None:  # fmt: skip
    """Metrics of ``model`` on ``split`` (sharded across processes, gathered); ``None`` for an empty split.

    Runs the plain module, not the DistributedDataParallel wrapper, so that processes with different numbers of
    batches never wait on each other; restores training mode afterwards.
    """
    if len(split) == 0:
        return None
    was_training = model.training
    model.eval()
    metrics = MetricSet(num_classes, runtime.device)
    order = torch.arange(len(split))[runtime.rank :: runtime.world_size]
    for x, y in batches(split, order, max(batch_size, 256), 0):
        x, y = as_float(x.to(runtime.device)), y.to(runtime.device)
        logits = model(x).float()
        metrics.update(logits, y, criterion(logits, y, epoch, "sum"))
    model.train(was_training)
    return metrics.compute()


def _write_csv(run: Run) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(run.history)
    checkpoint.write_atomic(run.directory / "metrics.csv", buffer.getvalue())


SELECTION = "best epoch: highest validation accuracy, then lowest validation loss; each new best is marked (best)"


def _epoch_line(run: Run, row: dict[str, Any], improved: bool) -> str:
    """The epoch's line: what selects the best epoch first (validation accuracy, then loss), then the test split."""
    parts = [f"epoch {row['epoch']:>3}/{run.config.epochs}", f"train {row['train_loss']:.4f}"]
    if row["val_loss"] is not None:
        parts.append(f"val acc {100 * row['val_accuracy']:.2f}%" + (" (best)" if improved else ""))
        parts.append(f"val loss {row['val_loss']:.4f}")
    parts += [f"test {row['test_loss']:.4f}", f"acc {100 * row['test_accuracy']:.2f}%",
              f"bal {100 * row['test_balanced_accuracy']:.2f}%", f"{row['seconds']:.1f} s"]  # fmt: skip
    return "  ".join(parts)


def fit(run: Run, console: Console | None = None) -> dict[str, Any]:
    """Train the remaining epochs, checkpointing after each, then write the summary and plots (main process)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from xent.train.progress import RunClock

    console = console or Console()
    config, runtime = run.config, run.runtime
    show_progress = runtime.is_main and not config.quiet and console.is_terminal
    log_lines = runtime.is_main and not config.quiet and not console.is_terminal
    steps = steps_per_epoch(len(run.data.train), cast(int, config.batch_size), runtime)  # set by resolve()
    if runtime.is_main and run.epoch:
        console.print(f"resuming {run.directory} after epoch {run.epoch}")
    if runtime.is_main and run.epoch < cast(int, config.epochs):
        console.print(SELECTION if len(run.data.val) else "best epoch: the last (no validation split)")
    run_clock = RunClock(run.epoch, cast(int, config.epochs))
    while run.epoch < cast(int, config.epochs):
        started = time.perf_counter()
        lr = run.optimizer.param_groups[0]["lr"]
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("epoch ETA"),
                      TimeRemainingColumn(), TextColumn("{task.fields[run_eta]}"), console=console,
                      transient=True, disable=not show_progress) as bar:  # fmt: skip
            task = bar.add_task(f"epoch {run.epoch + 1}/{config.epochs}", total=steps, status="",
                                run_eta=run_clock.eta(run.epoch))  # fmt: skip

            def progress(done: int, loss: float, rate: float, task: TaskID = task) -> None:
                status = f"loss {loss:.4f}  {rate:,.0f} samples/s"
                run_eta = run_clock.eta(run.epoch, done / steps)
                if show_progress:
                    bar.update(task, completed=done, status=status, run_eta=run_eta)
                elif log_lines:  # a log file or a pipe: one line every --log-interval batches instead of a bar
                    console.print(
                        f"epoch {run.epoch + 1} batch {done}/{steps}  {status}" + (run_eta and f"  {run_eta}")
                    )

            train_loss = train_epoch(run, progress)
        run.train_seconds += time.perf_counter() - started
        val = evaluate(run.model, run.data.val, run.criterion, run.epoch, runtime, cast(int, config.batch_size),
                       run.data.num_classes)  # fmt: skip
        test = evaluate(run.model, run.data.test, run.criterion, run.epoch, runtime, cast(int, config.batch_size),
                        run.data.num_classes)  # fmt: skip
        test = cast(Metrics, test)  # the test split is never empty
        run.epoch += 1
        row = {"epoch": run.epoch, "lr": lr, "train_loss": train_loss,
               "val_loss": val.loss if val else None, "val_accuracy": val.accuracy if val else None,
               "test_loss": test.loss, "test_accuracy": test.accuracy,
               "test_balanced_accuracy": test.balanced_accuracy, "test_macro_f1": test.macro_f1,
               "test_nll": test.nll, "test_ece": test.ece, "seconds": time.perf_counter() - started}  # fmt: skip
        run.history.append(row)
        score = (val.accuracy, -val.loss) if val is not None else None
        improved = score is None or score > run.best_val
        if score is not None and improved:
            run.best_val = score
        if runtime.is_main:
            state = _state(run)
            best = (run.directory / checkpoint.BEST,) if improved else ()
            checkpoint.save_atomic(state, *best, run.directory / checkpoint.LAST, run=run.identity)
            _write_csv(run)
            console.print(_epoch_line(run, row, improved and score is not None))
    return finish(run, console)


def finish(run: Run, console: Console) -> dict[str, Any]:
    """Evaluate the best checkpoint on the test split; write ``summary.json`` and the plots."""
    runtime = run.runtime
    best = checkpoint.load(run.directory / checkpoint.BEST, run=run.identity) if runtime.is_main else None
    if runtime.distributed:
        payload = [best]
        torch.distributed.broadcast_object_list(payload, src=0)
        best = payload[0]
    best = cast(dict[str, Any], best)  # on every process now: loaded by the main one, broadcast to the others
    run.model.load_state_dict(best["model"])
    test = evaluate(run.model, run.data.test, run.criterion, best["epoch"], runtime, cast(int, run.config.batch_size),
                    run.data.num_classes)  # fmt: skip
    test = cast(Metrics, test)  # the test split is never empty
    summary = {
        **{f"test_{key}": value for key, value in test.headline().items()},
        "test_per_class_accuracy": dict(zip(run.data.class_names, test.per_class_accuracy, strict=True)),
        "test_reliability_bins": labelled_bins(test.reliability),
        # the same bins as [count, Σ confidence, Σ correct]: what xent compare's report reads today
        "test_reliability": test.reliability,
        "best_epoch": best["epoch"],
        "epochs_completed": run.epoch,
        "train_seconds": run.train_seconds,
        "train_examples": len(run.data.train),
        "class_counts": run.data.class_counts().tolist(),
        "run_dir": str(run.directory),
    }
    if runtime.is_main:
        checkpoint.write_atomic(run.directory / "summary.json", json.dumps(summary, indent=2) + "\n")
        plots.curves(run.history, run.directory / "plots" / "curves.png")
        plots.confusion_matrix(test.confusion_matrix, run.data.class_names, run.directory / "plots" / "confusion.png")
        plots.reliability_diagram(test.reliability, test.ece, run.directory / "plots" / "reliability.png")
        console.print(
            f"best epoch {best['epoch']}: test accuracy {100 * test.accuracy:.2f}%, balanced "
            f"{100 * test.balanced_accuracy:.2f}%, macro-F1 {test.macro_f1:.4f}, NLL {test.nll:.4f}, "
            f"ECE {test.ece:.4f} — {run.train_seconds:.1f} s of training. Run directory: {run.directory}"
        )
        untested = [name for name, value in zip(run.data.class_names, test.per_class_accuracy, strict=True)
                    if value is None]  # fmt: skip
        if untested:
            console.print(f"no test example of class {', '.join(map(repr, untested))}: its accuracy is n/a, and "
                          "balanced accuracy averages the other classes")  # fmt: skip
    return summary


class Interrupted(Exception):
    """Training was stopped by Ctrl-C; ``directory`` holds the run and its last checkpoint, if one was written."""

    def __init__(self, directory: Path) -> None:
        super().__init__(str(directory))
        self.directory = directory


def train(config: TrainConfig, console: Console | None = None) -> dict[str, Any]:
    """Run ``xent train`` with this configuration and return the summary (the contents of ``summary.json``).

    Progress goes to ``console`` (a :class:`rich.console.Console`; a new one by default). Ctrl-C raises
    :class:`~xent.train.Interrupted`; a NaN or infinite loss raises :class:`~xent.train.TrainingDiverged`.
    """
    plots.require()
    run = prepare(config)
    try:
        return fit(run, console)
    except KeyboardInterrupt:
        raise Interrupted(run.directory) from None
    finally:
        # DistributedDataParallel's reducer holds the process group; destroyed after the group is gone, its gloo
        # threads wait for a peer that has left, so the wrapper goes first.
        run.trainer = None  # type: ignore[assignment]  # dropped on purpose before the process group goes
        gc.collect()
        shutdown(run.runtime)
        if run.lock is not None:
            run.lock.release()
