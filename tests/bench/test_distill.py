"""xent bench linear-distill: its divergence and top-k flags, TRL's rival row on the same inputs, and the student
head's linear cross-entropy as the table's baseline."""

import csv
import subprocess
import sys

import pytest
import torch

import xent
from xent.bench import Measurement, Problem, run_bench
from xent.bench.cases import IMPLEMENTATIONS, _inputs, _teacher, distill_loss, find_implementation, trl_beta
from xent.bench.problem import DISTILL_TEMPERATURE, NOT_APPLICABLE, NOT_INSTALLED
from xent.bench.report import ratios, verdict

TINY = {"n": 48, "d": 16, "v": 200}
KINDS = [("forward_kl", None), ("reverse_kl", None), ("jsd", None), ("jsd", 0.2)]
TEACHERS = [(None, "renormalize"), (5, "renormalize"), (5, "bucket")]


def _problem(divergence="forward_kl", beta=None, top_k=None, top_k_tail="renormalize"):
    return Problem("linear-distill", **TINY, divergence=divergence, beta=beta, top_k=top_k, top_k_tail=top_k_tail)


@pytest.mark.parametrize(("divergence", "beta"), KINDS)
@pytest.mark.parametrize(("top_k", "tail"), TEACHERS)
def test_every_divergence_and_teacher_runs_and_the_reference_agrees(divergence, beta, top_k, tail):
    """In this process (no workers): xent's fused loss and its reference, as the bench calls them, to the same value
    and gradients; the rows step, the floor too."""
    problem = _problem(divergence, beta, top_k, tail)
    hidden, weight, _ = _inputs(problem)
    fused, reference = (gradients(distill_loss(problem, impl), hidden, weight) for impl in (None, "reference"))
    for ours, theirs in zip(fused, reference, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    for name in ("xent", "xent-reference", "xent-linear-ce", "floor"):
        prepared = find_implementation("linear-distill", name).prepare(problem)
        prepared.reset()
        prepared.step()


def gradients(loss, *inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    value = loss(*leaves)
    return [value.detach(), *torch.autograd.grad(value, leaves)]


def test_a_top_k_teacher_is_the_teacher_heads_most_likely_ids_and_their_log_probs():
    ids_and_log_probs = _teacher(_problem(top_k=5))
    ids, log_probs = ids_and_log_probs["teacher_indices"], ids_and_log_probs["teacher_log_probs"]
    assert ids.shape == log_probs.shape == (TINY["n"], 5) and ids.dtype == torch.int64
    teacher = _teacher(_problem())
    logits = teacher["teacher_input"] @ teacher["teacher_linear_weight"].t()
    torch.testing.assert_close(log_probs, logits.log_softmax(-1).gather(1, ids))
    assert (ids.sort(-1).values.diff(dim=-1) > 0).all()  # distinct
    assert (log_probs.logsumexp(-1) < 0).all()  # a tail left for "bucket"


@pytest.mark.parametrize(("divergence", "beta"), KINDS)
def test_trls_row_computes_xents_divergence_on_the_same_inputs(divergence, beta):
    """TRL's beta 0 / 1 / β is forward KL / reverse KL / JSD β; its per-token divergences summed are xent's "sum"
    over T² (xent carries Hinton's T², TRL does not)."""
    chunked = pytest.importorskip("trl.kernels.chunked_divergence")
    problem = _problem(divergence, beta)
    hidden, weight, _ = _inputs(problem)
    teacher = _teacher(problem)
    theirs = chunked.ChunkedDivergenceFunction.apply(hidden, weight, None, teacher["teacher_input"],
                                                     teacher["teacher_linear_weight"], None, trl_beta(problem),
                                                     DISTILL_TEMPERATURE)[0].sum()  # fmt: skip
    ours = xent.linear_distillation_loss(hidden, weight, **teacher, divergence=divergence, beta=beta,
                                         temperature=DISTILL_TEMPERATURE, reduction="sum")  # fmt: skip
    torch.testing.assert_close(ours / DISTILL_TEMPERATURE**2, theirs, rtol=1e-4, atol=1e-6)
    assert trl_beta(problem) == {"forward_kl": 0.0, "reverse_kl": 1.0}.get(divergence, beta or 0.5)


def test_linear_distill_measures_xent_beside_trl_and_the_baseline():
    names = ["xent", "trl", "xent-linear-ce", "floor"]
    by_name = {m.name: m for m in run_bench(_problem("jsd", 0.3), names, repeat=3)}
    for name in ("xent", "xent-linear-ce", "floor"):
        assert len(by_name[name].times_s) == 3
    assert by_name["xent-linear-ce"].is_baseline and not by_name["xent"].is_baseline
    if by_name["trl"].skipped is None:
        assert len(by_name["trl"].times_s) == 3
    else:
        assert by_name["trl"].skipped.kind == NOT_INSTALLED
    table = ratios(list(by_name.values()))
    assert table["xent"]["vs_baseline"] == pytest.approx(by_name["xent"].time_s / by_name["xent-linear-ce"].time_s)
    assert table["xent-linear-ce"]["vs_baseline"] is None and table["xent-linear-ce"]["vs_best_other"] is None
    top_k = run_bench(_problem(top_k=4), ["trl"], repeat=3)[0]
    assert top_k.skipped.kind in (NOT_APPLICABLE, NOT_INSTALLED)


def test_the_baseline_is_a_yardstick_not_a_contender():
    """Faster than every distillation (it computes less), the baseline is neither ranked in the verdict nor the "best
    other" of any row; the peak column compares with the leanest other library."""
    problem = _problem()

    def row(name, seconds, peak, **kinds):
        return Measurement(problem, name, kinds.get("is_floor", False), times_s=[seconds] * 3, peak_bytes=[peak] * 3,
                           is_baseline=kinds.get("is_baseline", False))  # fmt: skip

    rows = [
        row("xent", 1.4, 100),
        row("trl", 3.0, 800),
        row("xent-linear-ce", 1.0, 90, is_baseline=True),
        row("floor", 0.9, 80, is_floor=True),
    ]
    table = ratios(rows)
    assert table["xent"]["vs_best_other"] == pytest.approx(1.4 / 3.0)
    assert table["xent"]["peak_vs_best_other"] == pytest.approx(100 / 800)
    assert table["xent"]["vs_baseline"] == pytest.approx(1.4)
    assert table["trl"]["vs_best_other"] == pytest.approx(3.0 / 1.4)  # against xent, not the baseline
    assert table["xent-linear-ce"]["vs_floor"] == pytest.approx(1.0 / 0.9)
    assert verdict(rows).startswith("verdict — fastest: xent, 0.47× the time of the runner-up trl")


def test_cli_linear_distill_with_a_top_k_teacher(tmp_path):
    csv_path = tmp_path / "distill.csv"
    result = subprocess.run(
        [sys.executable, "-m", "xent", "bench", "linear-distill", "--n", "48", "--d", "16", "--v", "200",
         "--divergence", "jsd", "--beta", "0.25", "--top-k", "8", "--top-k-tail", "bucket",
         "--impl", "xent,trl,xent-linear-ce,floor", "--csv", str(csv_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    title = "xent bench linear-distill — N=48, V=200, D=16, float32, cpu; jsd β=0.25, T=2, top-8 teacher (bucket)"
    assert title in text and "× baseline" in text and "│ xent-linear-ce (baseline) │" in text
    assert "not run — " in text and "trl (" in text  # folded: TRL takes a teacher head, or is not installed
    assert "verdict — fastest: xent, the only implementation that ran" in text
    rows = list(csv.DictReader(csv_path.open()))
    assert [row["implementation"] for row in rows] == ["xent", "trl", "xent-linear-ce", "floor"]
    assert {row["distillation"] for row in rows} == {"jsd β=0.25, T=2, top-8 teacher (bucket)"}
    assert [row["is_baseline"] for row in rows] == ["False", "False", "True", "False"]
    assert float(rows[0]["vs_baseline"]) > 0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["ce", "--divergence", "jsd"], "--divergence applies to linear-distill only"),
        (["linear-ce", "--top-k", "4"], "--top-k applies to linear-distill only"),
        (["linear-distill", "--beta", "0.5"], "--beta is the JSD's mixture weight: give it with --divergence jsd"),
        (["linear-distill", "--divergence", "jsd", "--beta", "1"], "argument --beta: must be strictly between 0 and 1"),
        (["linear-distill", "--divergence", "kl"], "argument --divergence: invalid choice: 'kl'"),
        (["linear-distill", "--top-k-tail", "bucket"], "give it with --top-k K"),
        (["linear-distill", "--top-k", "64", "--v", "32"], "--top-k 64 is more than the 32 classes of --v"),
        (["linear-distill", "--top-k", "4", "--top-k-tail", "drop"], "argument --top-k-tail: invalid choice"),
    ],
)
def test_cli_distillation_flags_name_the_flag(arguments, message, capsys):
    from xent.cli import main

    try:  # in this process: the flags are refused before anything is measured
        status = main(["bench", *arguments])
    except SystemExit as exit:  # argparse's own errors (a value of the wrong type or choice)
        status = exit.code
    stderr = capsys.readouterr().err
    assert status == 2
    assert message in stderr
    assert "Traceback" not in stderr


def test_the_help_lists_the_distillation_rows():
    names = [implementation.name for implementation in IMPLEMENTATIONS["linear-distill"]]
    assert {"xent", "xent-reference", "trl", "xent-linear-ce", "floor"} <= set(names)
