"""The flags of the trainer's commands — ``xent train``, ``xent eval`` and ``xent compare`` — and what they set.

``xent train`` has one flag per field of :class:`~xent.train.TrainConfig`, grouped and documented by the field's
metadata; ``xent compare`` has the study's own flags and the same fields again, as settings every run of the study
shares (less those the study sets per run: :data:`STUDY_OWNED`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Any

from xent.train.config import TrainConfig
from xent.train.study import STUDIES

STUDY_OWNED = ("out", "name", "resume", "quiet", "seed", "loss")  # set per run by xent compare, not shared flags
DEFAULT_JOBS = max(1, min(4, os.cpu_count() or 1))


def add_train_arguments(parser: argparse.ArgumentParser, *, shared: bool = False) -> None:
    """One flag per field of :class:`xent.train.TrainConfig`, grouped and documented by its metadata; only the flags
    given are set on the namespace (the configuration holds the defaults), so that a flag given at its default value
    still counts as given. ``shared``: the flags as settings of every run of a study — the run's own place,
    resumption and verbosity are the study's."""
    hints = typing.get_type_hints(TrainConfig)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field in dataclasses.fields(TrainConfig):
        if shared and field.name in STUDY_OWNED:
            continue
        group_name = field.metadata["group"]
        group = groups.setdefault(group_name, parser.add_argument_group(group_name))
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        default = field.default
        help_text = field.metadata["help"] + ("" if default in (None, False) else f" (default {default})")
        if shared:
            help_text = field.metadata["help"]
        if kind is bool:
            group.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help_text)
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        group.add_argument(flag, type=base, default=argparse.SUPPRESS, metavar=field.name.upper(), help=help_text)


def given_settings(args: argparse.Namespace, *, leave_out: Collection[str] = ()) -> dict[str, Any]:
    """The :class:`~xent.train.TrainConfig` fields the flags of :func:`add_train_arguments` set, by name: only those
    given, less ``leave_out``."""
    return {field.name: getattr(args, field.name) for field in dataclasses.fields(TrainConfig)
            if hasattr(args, field.name) and field.name not in leave_out}  # fmt: skip


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory written by xent train")
    parser.add_argument("--data", help="evaluate on another data set of the same shape and classes")
    parser.add_argument("--data-dir", help="directory of the data files, if --data needs them")
    parser.add_argument(
        "--temperature-scale",
        action="store_true",
        help="fit a temperature on the validation split (minimising NLL); report test NLL and ECE before and after, "
        "and save them with the temperature to RUN_DIR/calibration.json",
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object instead of a table")


def numbers(text: str) -> list[float]:
    try:
        return [float(value) for value in text.split(",") if value.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    study = parser.add_argument_group("study")
    study.add_argument(
        "--study",
        default="long-tail",
        choices=list(STUDIES),
        help="; ".join(f"{name}: {s.question}" for name, s in STUDIES.items()).replace("%", "%%")
        + " (default long-tail)",
    )
    study.add_argument(
        "--losses",
        type=lambda text: [v for v in text.split(",") if v.strip()],
        help="losses of --loss, comma-separated, each NAME or NAME:FLAG=VALUE "
        "(e.g. ce,ce:label-smoothing=0.1,focal:gamma=1); default: the study's",
    )
    study.add_argument("--seeds", type=int, default=3, help="seeds per loss (default 3)")
    study.add_argument("--imbalance-ratios", type=numbers, help="a grid over --imbalance-ratio, e.g. 10,100")
    study.add_argument("--label-noises", type=numbers, help="a grid over --label-noise, e.g. 0.2,0.4")
    study.add_argument("--jobs", type=int, default=DEFAULT_JOBS,
                       help=f"runs trained at once, by as many worker processes, each training one run after another "
                            f"with cores/JOBS threads (default {DEFAULT_JOBS}: the CPU cores, at most 4)")  # fmt: skip
    study.add_argument("--out", type=Path, help="the study directory (default runs/compare-STUDY); an existing "
                       "one is resumed: finished cells are kept")  # fmt: skip
    add_train_arguments(parser, shared=True)


def varying_setting(args: argparse.Namespace) -> tuple[str, list[float]] | None:
    """The setting a study's grid varies (``--imbalance-ratios`` or ``--label-noises``) with its values, or None.
    Raises ValueError when both are given: a study varies one setting."""
    given = [name for name in ("imbalance_ratios", "label_noises") if getattr(args, name)]
    if len(given) > 1:
        raise ValueError("give one of --imbalance-ratios and --label-noises: a study varies one setting")
    if not given:
        return None
    return {"imbalance_ratios": "imbalance_ratio", "label_noises": "label_noise"}[given[0]], getattr(args, given[0])
