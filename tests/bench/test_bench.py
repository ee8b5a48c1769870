"""xent bench: the harness measures what it says, and the CLI writes its table, CSV and plot."""

import csv
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from xent.bench import Measurement, Problem, run_bench
from xent.bench.load import SPIN, busy_message, max_spinners, spinning
from xent.bench.problem import FAILED, NEEDS_CUDA, NOT_APPLICABLE, NOT_INSTALLED, Unavailable
from xent.bench.report import not_run, ratios, verdict

TINY_CE = Problem("ce", n=64, d=0, v=300)


def test_run_bench_measures_each_implementation_in_interleaved_rounds():
    measurements = run_bench(TINY_CE, ["xent", "torch-eager", "liger", "floor"], repeat=3)  # one process each
    by_name = {m.name: m for m in measurements}
    for name in ("xent", "torch-eager", "floor"):
        assert len(by_name[name].times_s) == 3 and by_name[name].time_s > 0
        assert by_name[name].warmup_s is not None
    assert by_name["liger"].skipped  # not installed here, or not on CUDA: said, not run
    assert by_name["floor"].is_floor


def test_a_family_loss_is_measured_beside_its_materialised_reference():
    problem = Problem("linear-ce", n=64, d=16, v=300, loss="logit_adjusted_cross_entropy")
    names = ["xent", "xent-reference", "torch-eager", "liger"]
    by_name = {m.name: m for m in run_bench(problem, names, repeat=3)}
    assert by_name["xent"].time_s > 0 and by_name["xent-reference"].time_s > 0
    assert by_name["torch-eager"].skipped.kind == NOT_APPLICABLE
    assert "has no logit_adjusted_cross_entropy" in by_name["torch-eager"].skipped.detail
    assert by_name["liger"].skipped
    ce = {m.name: m for m in run_bench(Problem("ce", n=64, d=0, v=300, loss="focal_loss"), ["xent-inplace"], repeat=3)}
    assert "cross_entropy only" in ce["xent-inplace"].skipped.detail


def test_peak_memory_is_measured_per_process():
    """The eager implementation keeps a log-softmax and a gradient (N × V each) alive; the floor writes one, and so
    does xent — the buffer both keep between steps (resident before each measured step) is counted."""
    problem = Problem("ce", n=4096, d=0, v=4096)  # 64 MiB of logits: above glibc's largest mmap threshold
    by_name = {m.name: m for m in run_bench(problem, ["xent", "torch-eager", "floor"], repeat=3)}
    logits_bytes = 4096 * 4096 * 4
    assert by_name["torch-eager"].peak >= 1.5 * logits_bytes
    assert 0.5 * logits_bytes <= by_name["floor"].peak <= 1.5 * logits_bytes
    assert all(0.5 * logits_bytes <= peak <= 1.5 * logits_bytes for peak in by_name["xent"].peak_bytes)


def test_lm_step_measures_a_patched_model_beside_the_unpatched_one():
    """A training step of a small Llama: the unpatched model keeps three N × V tensors (logits, log-softmax, their
    gradient), the patched one a single chunk. 64 MiB of logits: above glibc's largest mmap threshold, so that freed
    blocks leave the resident set and each step's peak is its own."""
    pytest.importorskip("transformers")
    problem = Problem("lm-step", n=4096, d=64, v=4096)
    by_name = {m.name: m for m in run_bench(problem, ["xent", "xent-reference", "torch-eager"], repeat=3)}
    logits_bytes = 4096 * 4096 * 4
    assert by_name["xent"].time_s > 0 and by_name["torch-eager"].time_s > 0
    # plain cross-entropy: the unpatched model is its baseline
    assert "baselines" in by_name["xent-reference"].skipped.detail
    assert by_name["torch-eager"].peak - by_name["xent"].peak >= logits_bytes


def test_ratios_compare_with_the_best_other_and_the_floor():
    def measurement(name, seconds, peak, floor=False):
        return Measurement(TINY_CE, name, floor, times_s=[seconds] * 3, peak_bytes=[peak] * 3)

    gradient = TINY_CE.floor_bytes()
    table = ratios(
        [
            measurement("xent", 1.0, gradient + (1 << 20)),
            measurement("torch-eager", 4.0, 3 * gradient),
            measurement("torch-compile", 2.0, gradient),
            measurement("floor", 0.5, gradient, floor=True),
        ]
    )
    assert table["xent"]["vs_best_other"] == pytest.approx(0.5)
    assert table["xent"]["vs_floor"] == pytest.approx(2.0)
    assert table["xent"]["extra_over_floor_mb"] == pytest.approx(1.0)
    assert table["torch-compile"]["vs_best_other"] == pytest.approx(2.0)
    assert table["floor"]["vs_floor"] is None


def test_cli_writes_table_csv_and_plot(tmp_path):
    csv_path, plot_path = tmp_path / "bench.csv", tmp_path / "bench.png"
    result = subprocess.run(
        [sys.executable, "-m", "xent", "bench", "linear-ce", "--n", "64", "--d", "16", "--v", "128,256",
         "--impl", "xent,floor,liger", "--contend", "1", "--csv", str(csv_path), "--plot", str(plot_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "xent bench linear-ce — N=64, V=256, D=16, float32, cpu; medians of 3 interleaved runs (--repeat 3); " \
        "with 1 spinning process" in " ".join(result.stdout.split())  # fmt: skip
    assert result.stdout.count("verdict — fastest: xent, the only implementation that ran") == 2
    assert result.stdout.count("not run — ") == 2 and "│ liger" not in result.stdout  # folded, not a row
    rows = list(csv.DictReader(csv_path.open()))
    assert [(row["v"], row["implementation"]) for row in rows] == [
        (v, name) for v in ("128", "256") for name in ("xent", "floor", "liger")
    ]
    assert all(float(row["median_ms"]) > 0 for row in rows if row["implementation"] != "liger")
    assert {row["spinning"] for row in rows} == {"1"}
    assert plot_path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["ce", "--repeat", "2"], "--repeat must be at least 3"),
        (["ce", "--impl", "fastest", "--n", "8", "--v", "8"], "--impl fastest unknown for ce; choose from xent"),
        (["ce", "--d", "64"], "--d applies to linear-ce only"),
        (["lm-step", "--n", "100"], "--n for lm-step must be a multiple of 8"),
        (["lm-step", "--shape", "llama3-8b"], "lm-step builds a model"),
        (["softmax"], "invalid choice: 'softmax'"),
        (["ce", "--n", "0"], "argument --n: must be a positive integer, got '0'"),
        (["ce", "--contend", "-1"], f"--contend must be between 0 and {max_spinners()}"),
        (["ce", "--contend", str(max_spinners() + 1)], f"got {max_spinners() + 1}"),
        (["ce", "--contend", "two"], "argument --contend: invalid int value: 'two'"),
    ],
)
def test_cli_errors_name_the_flag(arguments, message):
    result = subprocess.run([sys.executable, "-m", "xent", "bench", *arguments], capture_output=True, text=True)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_noisy_run_is_flagged_and_the_help_lists_every_implementation():
    from rich.console import Console

    from xent.bench.report import noisy, print_table, spread

    steady = Measurement(TINY_CE, "xent", False, times_s=[1.0, 1.1, 1.05], peak_bytes=[0] * 3)
    busy = Measurement(TINY_CE, "torch-eager", False, times_s=[0.4, 3.0, 0.5], peak_bytes=[0] * 3)
    assert spread(steady) == pytest.approx(0.1 / 1.05)
    assert noisy([steady, busy]) == ["torch-eager"]
    console = Console(record=True, width=200)
    print_table([steady, busy], console)
    text = console.export_text()
    assert "warning: the runs of torch-eager vary by more than 50%" in text and "--repeat" in text
    help_text = subprocess.run([sys.executable, "-m", "xent", "bench", "--help"], capture_output=True, text=True,
                               check=True).stdout  # fmt: skip
    names = "".join(help_text.split())  # argparse may wrap a name at its hyphen
    assert all(name in names for name in ("xent-inplace", "xent-compile", "cce-exact", "reference-compile"))
    assert "default 3" in " ".join(help_text.split()) and "--contend K" in help_text


def _spinners() -> list[psutil.Process]:
    """This process's children that spin for --contend."""
    return [child for child in psutil.Process().children(recursive=True) if SPIN in child.cmdline()]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # dead, waiting for a parent to reap it
    except psutil.NoSuchProcess:
        return True


def test_contend_runs_spinners_beside_the_measurement_and_stops_them():
    seen: list[list[int]] = []
    measurements = run_bench(
        TINY_CE, ["floor"], repeat=3, contend=2, progress=lambda message: seen.append([p.pid for p in _spinners()])
    )
    assert all(len(pids) == 2 for pids in seen)  # from the first warm-up to the last round
    assert measurements[0].spinning == 2 and len(measurements[0].times_s) == 3
    assert not _spinners() and all(_gone(pid) for pid in seen[0])


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_spinners_stop_on_an_error_or_ctrl_c(error):
    with pytest.raises(error), spinning(2) as processes:
        assert len(_spinners()) == 2
        raise error
    assert all(process.returncode is not None for process in processes) and not _spinners()
    with pytest.raises(ValueError, match="--contend must be between 0 and"), spinning(-1):
        pass


def test_a_spinner_stops_by_itself_when_the_bench_is_killed():
    """SIGKILL leaves no finally to run: each spinner watches its parent."""
    script = "from xent.bench.load import spinning\nwith spinning(1) as s:\n    print(s[0].pid, flush=True); input()"
    bench = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    spinner = int(bench.stdout.readline())
    os.kill(bench.pid, signal.SIGKILL)
    bench.wait()
    deadline = time.monotonic() + 10
    while not _gone(spinner) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(spinner)


def test_a_busy_machine_is_one_line_of_warning():
    assert busy_message(0.3, cores=2, threads=2) is None
    assert busy_message(3.0, cores=16, threads=8) is None  # torch leaves 8 cores to other work
    line = busy_message(2.0, cores=2, threads=2)
    assert line.startswith("the machine is already busy: a load average of 2.0") and "\n" not in line
    assert busy_message(9.5, cores=16, threads=8) is not None


def _row(name, times, peak=None, *, floor=False, problem=TINY_CE):
    return Measurement(problem, name, floor, times_s=list(times), peak_bytes=[] if peak is None else [peak] * 3)


MIB = 1 << 20
BIG_CE = Problem("ce", n=1024, d=0, v=1024)  # a gradient of 4 MiB


def test_the_verdict_names_the_winner_on_time_and_memory_and_by_how_much():
    rows = [
        _row("torch-eager", [4.0, 4.1, 4.2], 12 * MIB, problem=BIG_CE),
        _row("xent", [1.0, 1.1, 1.2], 4 * MIB, problem=BIG_CE),
        _row("torch-compile", [2.0, 2.1, 2.2], 8 * MIB, problem=BIG_CE),
        _row("floor", [0.1] * 3, 4 * MIB, floor=True, problem=BIG_CE),  # not an implementation: never the winner
    ]
    assert verdict(rows) == (
        "verdict — fastest: xent, 0.52× the time of the runner-up torch-compile (1100 against 2100 ms); "
        "leanest: xent, 4.0 MB above its inputs, 1.00× the gradient it must return and 0.50× the peak of the "
        "runner-up torch-compile (8.0 MB). Ratios below 1 are better."
    )


def test_the_verdict_calls_a_tie_when_the_runs_overlap():
    rows = [_row("xent", [1.0, 1.3, 1.1], 4 * MIB, problem=BIG_CE), _row("torch-compile", [1.2, 1.25, 1.4],
                                                                          4 * MIB + 4096, problem=BIG_CE)]  # fmt: skip
    line = verdict(rows)
    assert "fastest: xent and torch-compile cannot be told apart" in line
    assert "their runs overlap (1000–1300 and 1200–1400 ms; a larger --repeat may separate them)" in line
    assert "leanest: xent and torch-compile tie at 4.0 MB" in line


def test_the_verdict_without_memory_or_with_one_implementation():
    no_memory = verdict([_row("xent", [1.0] * 3), _row("torch-eager", [2.0] * 3)])
    assert "fastest: xent, 0.50× the time of the runner-up torch-eager" in no_memory
    assert "leanest: not measured (no peak memory on this machine)" in no_memory
    alone = verdict([_row("xent", [0.002] * 3, 0), _row("floor", [0.001] * 3, floor=True)])
    assert alone.startswith("verdict — fastest: xent, the only implementation that ran (2.00 ms)")
    assert "leanest: xent, the only one measured (0.0 MB above its inputs, 0.00× the gradient it must return)" in alone
    assert verdict([Measurement(TINY_CE, "liger", False, skipped=Unavailable(NOT_INSTALLED, "liger_kernel"))]) == (
        "verdict: no implementation ran"
    )


def test_rows_that_did_not_run_fold_into_one_line_under_the_table():
    from rich.console import Console

    from xent.bench.report import print_table

    def skipped(name, kind, detail=""):
        return Measurement(TINY_CE, name, False, skipped=Unavailable(kind, detail))

    rows = [
        _row("xent", [1.0] * 3, 0),
        skipped("liger", NOT_INSTALLED, "liger_kernel"),
        skipped("cce", NOT_INSTALLED, "cut_cross_entropy"),
        skipped("cce-exact", NOT_INSTALLED, "cut_cross_entropy"),
        skipped("xent-chunked", NEEDS_CUDA),
        skipped("xent-reference", NOT_APPLICABLE, "torch-eager and torch-compile are this loss's baselines"),
        skipped("torch-compile", FAILED, "BackendCompilerFailed: boom"),
    ]
    line = not_run(rows)
    assert line == (
        "not run — not installed: liger (liger_kernel); cce, cce-exact (cut_cross_entropy) · needs CUDA: xent-chunked"
        " · not applicable: xent-reference (torch-eager and torch-compile are this loss's baselines) · failed: "
        "torch-compile (BackendCompilerFailed: boom)"
    )
    assert not_run(rows[:1]) is None
    console = Console(record=True, width=150)
    print_table(rows, console)
    text = " ".join(console.export_text().split())  # the line wraps at the console's width
    assert line in text and "│ liger" not in text and "│ xent-chunked" not in text
    assert "below 1, faster than all of them" in text  # the footer says which way the ratios point
