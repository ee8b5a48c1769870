"""``xent bench``'s flags and what they mean: the problems a command line asks for, with the defaults of each
operation, checked before any work — a bad combination is a ValueError that names the flag."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from xent.bench.cases import IMPLEMENTATIONS
from xent.bench.load import SPINNERS_PER_CORE, check_spinners
from xent.bench.problem import DTYPES, JSD_BETA, LM_BATCH, OPERATIONS, SHAPES, Problem
from xent.core.divergence import DIVERGENCES, TOP_K_TAILS
from xent.losses.family import FAMILY

DEFAULTS: dict[str, dict[str, Any]] = {
    "ce": {"n": 8192, "d": 0, "v": "32000"},
    "linear-ce": {"n": 4096, "d": 1024, "v": "32768"},
    "linear-distill": {"n": 4096, "d": 1024, "v": "32768"},
    "lm-step": {"n": 4096, "d": 256, "v": "16384"},  # examples/lm.py's model, 8 sequences of 512 tokens
}


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def unit_interval(text: str) -> float:
    """A number strictly between 0 and 1 (the JSD's β; its endpoints are the two KLs, ``--divergence``)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(
            f"must be strictly between 0 and 1, got {text!r} (β = 0 and 1 are --divergence forward_kl and reverse_kl)"
        )
    return value


def int_list(text: str) -> list[int]:
    return [positive_int(part) for part in text.split(",") if part]


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "operation",
        choices=OPERATIONS,
        help="ce: a loss on given logits; linear-ce: a loss of a linear head (--loss); "
        "linear-distill: distillation of one head into another (--divergence, --top-k), beside TRL's and the student "
        "head's linear cross-entropy; lm-step: a training step of a small Llama "
        "(hidden size --d, 4 layers) patched by xent.hf against the unpatched model (needs transformers)",
    )
    shape = parser.add_argument_group("problem")
    shape.add_argument("--n", type=positive_int, help="rows / tokens (default 8192 for ce, 4096 for the others)")
    shape.add_argument("--d", type=positive_int, help="hidden size; not for ce (default 1024; 256 for lm-step)")
    shape.add_argument("--v", type=int_list, help="classes; a comma list sweeps V (default 32000 / 32768)")
    shape.add_argument("--dtype", choices=list(DTYPES), help="float32 by default (bfloat16 with --shape)")
    shape.add_argument("--shape", choices=list(SHAPES), help="a language-model head: sets --n, --d, --v and bfloat16")
    shape.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    shape.add_argument(
        "--loss",
        choices=list(FAMILY),
        default="cross_entropy",
        help="the family loss to measure (default cross_entropy); beside xent, its materialised reference, eager "
        "and under torch.compile",
    )
    distill = parser.add_argument_group("linear-distill")
    distill.add_argument(
        "--divergence",
        choices=DIVERGENCES,
        help="the divergence of student and teacher (default forward_kl); TRL's row runs its beta 0, 1 or --beta",
    )
    distill.add_argument(
        "--beta",
        type=unit_interval,
        help=f"the JSD's mixture weight, in (0, 1), with --divergence jsd (default {JSD_BETA})",
    )
    distill.add_argument(
        "--top-k",
        type=positive_int,
        metavar="K",
        help="a top-k teacher: K ids and log-probabilities per token (the teacher head's most likely) in place of "
        "the teacher's head",
    )
    distill.add_argument(
        "--top-k-tail",
        choices=TOP_K_TAILS,
        help="with --top-k: renormalize the teacher over its K ids (default) or keep the rest as one tail category",
    )
    run = parser.add_argument_group("run")
    names = "; ".join(f"{op}: {', '.join(i.name for i in impls)}" for op, impls in IMPLEMENTATIONS.items())
    run.add_argument("--impl", help=f"comma list of implementations to run (default: all that are available) — {names}")
    run.add_argument(
        "--repeat",
        type=positive_int,
        default=3,
        help="interleaved timed runs, at least 3; the table shows their median (default %(default)s)",
    )
    run.add_argument(
        "--contend",
        type=int,
        default=0,
        metavar="K",
        help="run K spinning processes beside the measurement, to see each implementation on a busy machine "
        f"(default %(default)s; at most {SPINNERS_PER_CORE} per core)",
    )
    output = parser.add_argument_group("output")
    output.add_argument("--csv", type=Path, help="write every measurement to this CSV file")
    output.add_argument("--plot", type=Path, help="write time and memory against V to this PNG file")


def problems(args: argparse.Namespace) -> list[Problem]:
    """The problems the flags ask for, one per ``--v``, the operation's defaults (or ``--shape``'s) in place of the
    flags not given. Raises ValueError, naming the flag, for flags that do not go together or a device missing."""
    defaults = {**DEFAULTS[args.operation], "dtype": "float32"}
    if args.shape is not None:
        preset = SHAPES[args.shape]
        defaults = {**defaults, **preset, "v": str(preset["v"])}
    if args.repeat < 3:
        raise ValueError(f"--repeat must be at least 3 for a median of interleaved runs, got {args.repeat}")
    check_spinners(args.contend)
    if args.loss != "cross_entropy" and args.operation == "linear-distill":
        raise ValueError("--loss applies to ce and linear-ce; linear-distill measures linear_distillation_loss")
    distill = _distillation(args)
    if args.operation == "lm-step" and args.shape is not None:
        raise ValueError("--shape sets a head's shape; lm-step builds a model: give --n, --d and --v")
    if args.operation == "lm-step" and (args.n or defaults["n"]) % LM_BATCH:
        raise ValueError(f"--n for lm-step must be a multiple of {LM_BATCH} (sequences per step), got {args.n}")
    if (args.d is not None or args.shape is not None) and args.operation == "ce":
        raise ValueError(f"--{'d' if args.d is not None else 'shape'} applies to linear-ce only")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    dtype = args.dtype or defaults["dtype"]
    vocabularies = args.v or int_list(defaults["v"])
    if args.top_k is not None and args.top_k > min(vocabularies):
        raise ValueError(f"--top-k {args.top_k} is more than the {min(vocabularies)} classes of --v")
    n, d = args.n or defaults["n"], args.d or defaults["d"]
    return [Problem(args.operation, n, d, vocab, dtype, device, args.loss, **distill) for vocab in vocabularies]


def _distillation(args: argparse.Namespace) -> dict[str, Any]:
    """The linear-distill flags as Problem fields, checked: none given for another operation, --beta only with the
    JSD, --top-k-tail only with --top-k."""
    given = [flag for flag in ("divergence", "beta", "top_k", "top_k_tail") if getattr(args, flag) is not None]
    if given and args.operation != "linear-distill":
        raise ValueError(f"--{given[0].replace('_', '-')} applies to linear-distill only")
    divergence = args.divergence or "forward_kl"
    if args.beta is not None and divergence != "jsd":
        raise ValueError(f"--beta is the JSD's mixture weight: give it with --divergence jsd, not {divergence}")
    if args.top_k_tail is not None and args.top_k is None:
        raise ValueError("--top-k-tail says how to treat a top-k teacher's tail: give it with --top-k K")
    return {
        "divergence": divergence,
        "beta": args.beta,
        "top_k": args.top_k,
        "top_k_tail": args.top_k_tail or "renormalize",
    }
