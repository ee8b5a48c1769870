"""The trainer's configuration: one typed dataclass whose fields document the command-line flags.

Fields left at ``None`` are chosen per data set by :func:`resolve` (for example mnist1d gets the optimizer, learning
rate and length of its paper); the resolved configuration is what a run directory records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from xent.train.losses import LOSSES, used_by

DATASETS = ("digits", "mnist1d", "mnist", "fashion-mnist", "cifar10")  # and folder:PATH
MODELS = ("linear", "mlp", "cnn", "resnet20")
OPTIMIZERS = ("sgd", "adam", "nadam", "adamw")
SCHEDULES = ("constant", "step", "cosine", "onecycle")
AUGMENTATIONS = ("flip", "rotate", "crop")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A bad configuration value; the message names the flag."""


def _flag(group: str, help: str, **argparse: Any) -> dict[str, Any]:
    return {"group": group, "help": help, **argparse}


@dataclass
class TrainConfig:
    """Everything ``xent train`` reads: each field is the flag of the same name (``label_smoothing`` is
    ``--label-smoothing``), with the help and groups of :doc:`/cli/train`. ``None`` means "chosen per data set" by
    :func:`resolve`; :func:`train` resolves the configuration itself."""

    # data
    data: str = field(
        default="digits", metadata=_flag("data", "digits | mnist1d | mnist | fashion-mnist | cifar10 | folder:PATH")
    )
    data_dir: str | None = field(
        default=None,
        metadata=_flag("data", "directory of the mnist / fashion-mnist / cifar10 files (default: the cache folder "
                       "$XDG_CACHE_HOME/xent/DATA, i.e. ~/.cache/xent/DATA)"),
    )  # fmt: skip
    download: bool = field(
        default=False,
        metadata=_flag("data", "fetch missing mnist / fashion-mnist / cifar10 files into --data-dir (default: the "
                       "cache folder)"),
    )  # fmt: skip
    val_fraction: float | None = field(
        default=None,
        metadata=_flag("data", "fraction of the training split held out for validation (default: per data set)"),
    )
    classes: str | None = field(
        default=None, metadata=_flag("data", "comma list of classes to keep, e.g. 0,1 for the binary 0-vs-1 task")
    )
    imbalance_ratio: float = field(
        default=1.0,
        metadata=_flag("data", "long-tailed training split: n_i = n_max · R^(-i/(C-1)); 1 keeps it balanced"),
    )
    label_noise: float = field(
        default=0.0, metadata=_flag("data", "fraction of training labels replaced by a uniformly drawn class (seeded)")
    )
    # model
    model: str | None = field(
        default=None, metadata=_flag("model", "linear | mlp | cnn | resnet20 (default: per data set)")
    )
    # loss
    loss: str = field(
        default="ce", metadata=_flag("loss", "; ".join(f"{name}: {loss.summary}" for name, loss in LOSSES.items()))
    )
    label_smoothing: float = field(
        default=0.0, metadata=_flag("loss", "label smoothing ε" + used_by("label_smoothing"))
    )
    gamma: float = field(default=2.0, metadata=_flag("loss", "focal loss γ" + used_by("gamma")))
    beta: float = field(default=0.9999, metadata=_flag("loss", "class-balanced β" + used_by("beta")))
    tau: float = field(default=1.0, metadata=_flag("loss", "logit adjustment τ" + used_by("tau")))
    q: float = field(default=0.7, metadata=_flag("loss", "generalized cross-entropy q" + used_by("q")))
    sce_alpha: float = field(default=0.1, metadata=_flag("loss", "symmetric cross-entropy α" + used_by("sce_alpha")))
    sce_beta: float = field(default=1.0, metadata=_flag("loss", "symmetric cross-entropy β" + used_by("sce_beta")))
    poly_epsilon: float = field(default=1.0, metadata=_flag("loss", "Poly-1 ε" + used_by("poly_epsilon")))
    drw_epoch: int | None = field(
        default=None,
        metadata=_flag("loss", "epoch that switches re-weighting on (default 80%% of --epochs)" + used_by("drw_epoch")),
    )
    # optimization
    optimizer: str | None = field(
        default=None, metadata=_flag("optimization", "sgd | adam | nadam | adamw (default: per data set)")
    )
    lr: float | None = field(default=None, metadata=_flag("optimization", "peak learning rate (default: per data set)"))
    momentum: float = field(default=0.9, metadata=_flag("optimization", "SGD momentum"))
    nesterov: bool = field(default=False, metadata=_flag("optimization", "Nesterov momentum (sgd)"))
    weight_decay: float | None = field(
        default=None, metadata=_flag("optimization", "weight decay (default: per data set)")
    )
    schedule: str | None = field(
        default=None, metadata=_flag("optimization", "constant | step | cosine | onecycle (default: per data set)")
    )
    warmup_epochs: int = field(default=0, metadata=_flag("optimization", "linear learning-rate warm-up, in epochs"))
    epochs: int | None = field(default=None, metadata=_flag("optimization", "training epochs (default: per data set)"))
    batch_size: int | None = field(
        default=None, metadata=_flag("optimization", "batch size per process (default: per data set)")
    )
    grad_clip: float | None = field(
        default=None, metadata=_flag("optimization", "clip the gradient's global norm to this value")
    )
    amp: bool = field(
        default=False,
        metadata=_flag("optimization", "mixed precision: bf16 autocast on CPU, fp16 (with a scaler) on CUDA"),
    )
    compile: bool = field(default=False, metadata=_flag("optimization", "torch.compile the model"))
    # augmentation
    augment: str | None = field(
        default=None, metadata=_flag("augmentation", "comma list of flip, rotate, crop (kornia, training batches only)")
    )
    # runtime
    device: str = field(default="auto", metadata=_flag("runtime", "auto | cpu | cuda"))
    seed: int = field(
        default=0, metadata=_flag("runtime", "seed of every random choice: data split, noise, init, order")
    )
    workers: int = field(default=0, metadata=_flag("runtime", "data-loading worker processes"))
    log_interval: int = field(default=50, metadata=_flag("runtime", "log the running loss every N batches"))
    out: str | None = field(
        default=None,
        metadata=_flag("runtime", "run directory (default: runs/NAME, NAME from --name or the time, data, model, "
                       "loss, imbalance and noise)"),
    )  # fmt: skip
    name: str | None = field(
        default=None, metadata=_flag("runtime", "name of the run directory under runs/ (instead of --out)")
    )
    resume: str | None = field(
        default=None, metadata=_flag("runtime", "continue the run in this directory from its last checkpoint")
    )
    quiet: bool = field(default=False, metadata=_flag("runtime", "no progress bars, only the per-epoch lines"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    @classmethod
    def saved(cls, run_dir: Path, flag: str) -> dict[str, Any]:
        """The configuration a run directory's ``config.json`` holds, or a ConfigError in one line naming the file."""
        path = run_dir / "config.json"
        try:
            saved = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{flag} {run_dir}: no {path} (is it a run directory of xent train?)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(f"{flag} {run_dir}: {path} is unreadable ({error})") from None
        if not isinstance(saved, dict):
            raise ConfigError(f"{flag} {run_dir}: {path} holds a {type(saved).__name__}, not a configuration")
        return saved


# Per data set: what an unset field becomes. mnist1d follows its paper (Greydanus, 2020): all 4,000 training
# examples (no validation split: the last epoch is reported), Adam, lr 1e-2, batch 100, 6,000 steps (150 epochs),
# no weight decay.
DATA_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {
        "val_fraction": 0.1,
        "model": "mlp",
        "optimizer": "adam",
        "lr": 3e-3,
        "weight_decay": 1e-4,
        "schedule": "cosine",
        "epochs": 40,
        "batch_size": 64,
    },
    "mnist1d": {
        "val_fraction": 0.0,
        "model": "mlp",
        "optimizer": "adam",
        "lr": 1e-2,
        "weight_decay": 0.0,
        "schedule": "constant",
        "epochs": 150,
        "batch_size": 100,
    },
    "mnist": {
        "val_fraction": 0.1,
        "model": "cnn",
        "optimizer": "adamw",
        "lr": 2e-3,
        "weight_decay": 5e-4,
        "schedule": "onecycle",
        "epochs": 5,
        "batch_size": 128,
    },
    "fashion-mnist": {
        "val_fraction": 0.1,
        "model": "cnn",
        "optimizer": "adamw",
        "lr": 2e-3,
        "weight_decay": 5e-4,
        "schedule": "onecycle",
        "epochs": 10,
        "batch_size": 128,
    },
    "cifar10": {
        "val_fraction": 0.1,
        "model": "resnet20",
        "optimizer": "sgd",
        "lr": 0.1,
        "weight_decay": 5e-4,
        "schedule": "cosine",
        "epochs": 30,
        "batch_size": 128,
    },
    "folder": {
        "val_fraction": 0.1,
        "model": "cnn",
        "optimizer": "adamw",
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "schedule": "cosine",
        "epochs": 20,
        "batch_size": 32,
    },
}


def data_kind(data: str) -> str:
    return "folder" if data.startswith("folder:") else data


def parse_classes(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        classes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--classes must be a comma list of class indices, got {text!r}") from None
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ConfigError(f"--classes needs at least two distinct classes, got {text!r}")
    return classes


def parse_augment(text: str | None) -> list[str]:
    names = [part.strip() for part in (text or "").split(",") if part.strip()]
    unknown = [name for name in names if name not in AUGMENTATIONS]
    if unknown:
        raise ConfigError(f"--augment {','.join(unknown)} unknown; choose from {', '.join(AUGMENTATIONS)}")
    return names


def _choice(flag: str, value: str, choices: Collection[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{flag} {value} unknown; choose from {', '.join(choices)}")


def resolve(config: TrainConfig) -> TrainConfig:
    """Fill the per-data-set defaults and check every value; raises :class:`ConfigError` naming the flag."""
    kind = data_kind(config.data)
    if kind not in DATA_DEFAULTS:
        raise ConfigError(f"--data {config.data} unknown; choose from {', '.join(DATASETS)} or folder:PATH")
    if kind == "folder" and not config.data[len("folder:") :]:
        raise ConfigError("--data folder:PATH needs a path after 'folder:'")
    resolved = dataclasses.replace(config)
    for name, value in DATA_DEFAULTS[kind].items():
        if getattr(resolved, name) is None:
            setattr(resolved, name, value)
    # every field of DATA_DEFAULTS is set from here on
    _choice("--model", cast(str, resolved.model), MODELS)
    _choice("--loss", resolved.loss, LOSSES)
    _choice("--optimizer", cast(str, resolved.optimizer), OPTIMIZERS)
    _choice("--schedule", cast(str, resolved.schedule), SCHEDULES)
    _choice("--device", resolved.device, DEVICES)
    parse_classes(resolved.classes)
    parse_augment(resolved.augment)
    checks = [
        ("--epochs", resolved.epochs, cast(int, resolved.epochs) >= 1, "must be at least 1"),
        ("--batch-size", resolved.batch_size, cast(int, resolved.batch_size) >= 1, "must be at least 1"),
        (
            "--lr",
            resolved.lr,
            cast(float, resolved.lr) > 0 and math.isfinite(cast(float, resolved.lr)),
            "must be positive",
        ),
        ("--weight-decay", resolved.weight_decay, cast(float, resolved.weight_decay) >= 0, "must be non-negative"),
        ("--momentum", resolved.momentum, 0 <= resolved.momentum < 1, "must be in [0, 1)"),
        ("--warmup-epochs", resolved.warmup_epochs, resolved.warmup_epochs >= 0, "must be non-negative"),
        ("--val-fraction", resolved.val_fraction, 0 <= cast(float, resolved.val_fraction) < 1, "must be in [0, 1)"),
        ("--imbalance-ratio", resolved.imbalance_ratio, resolved.imbalance_ratio >= 1, "must be at least 1"),
        ("--label-noise", resolved.label_noise, 0 <= resolved.label_noise < 1, "must be in [0, 1)"),
        ("--label-smoothing", resolved.label_smoothing, 0 <= resolved.label_smoothing <= 1, "must be in [0, 1]"),
        ("--gamma", resolved.gamma, resolved.gamma >= 0, "must be non-negative"),
        ("--beta", resolved.beta, 0 <= resolved.beta < 1, "must be in [0, 1)"),
        ("--tau", resolved.tau, resolved.tau >= 0, "must be non-negative"),
        ("--q", resolved.q, 0 < resolved.q <= 1, "must be in (0, 1]"),
        ("--poly-epsilon", resolved.poly_epsilon, resolved.poly_epsilon >= -1, "must be at least -1"),
        ("--workers", resolved.workers, resolved.workers >= 0, "must be non-negative"),
        ("--log-interval", resolved.log_interval, resolved.log_interval >= 1, "must be at least 1"),
    ]
    if resolved.grad_clip is not None:
        checks.append(("--grad-clip", resolved.grad_clip, resolved.grad_clip > 0, "must be positive"))
    for flag, value, ok, requirement in checks:
        if not ok:
            raise ConfigError(f"{flag} {requirement}, got {value}")
    if resolved.warmup_epochs >= cast(int, resolved.epochs):
        raise ConfigError(f"--warmup-epochs {resolved.warmup_epochs} must be smaller than --epochs {resolved.epochs}")
    if resolved.out is not None and resolved.name is not None:
        raise ConfigError("give --out or --name, not both")
    if resolved.name is not None and (not resolved.name or "/" in resolved.name or resolved.name in (".", "..")):
        raise ConfigError(f"--name {resolved.name!r} must be a folder name, without '/'")
    if resolved.drw_epoch is None:
        reads_it = "drw_epoch" in LOSSES[resolved.loss].flags
        resolved.drw_epoch = max(1, int(0.8 * cast(int, resolved.epochs))) if reads_it else None
    elif not 0 <= resolved.drw_epoch < cast(int, resolved.epochs):
        raise ConfigError(f"--drw-epoch {resolved.drw_epoch} must be in [0, --epochs {resolved.epochs})")
    return resolved


# Where a run's files are or how it reports, not what it computes: a run moved, resumed on another device or with
# more loader processes is the same run.
NOT_IDENTITY = ("data_dir", "download", "device", "workers", "log_interval", "out", "name", "resume", "quiet")


def run_identity(config: TrainConfig) -> dict[str, Any]:
    """What makes a (resolved) run itself — every field that changes what it computes — with their SHA-256 under
    ``"sha256"``. Each checkpoint carries it: a checkpoint of another run is refused by name, before any model is
    built from it."""
    floats = {f.name for f in dataclasses.fields(TrainConfig) if "float" in str(f.type)}
    fields = {key: float(value) if key in floats and isinstance(value, int) else value  # 10 and 10.0: one run
              for key, value in config.to_dict().items() if key not in NOT_IDENTITY}  # fmt: skip
    text = json.dumps(fields, sort_keys=True)
    return {**fields, "sha256": hashlib.sha256(text.encode()).hexdigest()}


LOSS_FLAGS = tuple(dict.fromkeys(name for loss in LOSSES.values() for name in loss.flags))  # fields only losses read


def refuse_unread_flags(loss: str, given: Collection[str]) -> None:
    """A ConfigError for the first of the ``given`` fields that ``--loss loss`` does not read (``--gamma`` with
    ``--loss ce``): set on the command line, it would be ignored silently. Unknown losses are left to resolve()."""
    if loss not in LOSSES:
        return
    for name in LOSS_FLAGS:
        if name in given and name not in LOSSES[loss].flags:
            readers = ", ".join(key for key, entry in LOSSES.items() if name in entry.flags)
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} is not read by --loss {loss}; it is read by: {readers}")
