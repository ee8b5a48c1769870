"""xent bench: the harness measures what it says, and the CLI writes its table, CSV and plot."""

import csv
import subprocess
import sys

import pytest

from xent.bench import Measurement, Problem, run_bench
from xent.bench.report import ratios

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
    assert "has no logit_adjusted_cross_entropy" in by_name["torch-eager"].skipped
    assert by_name["liger"].skipped
    ce = {m.name: m for m in run_bench(Problem("ce", n=64, d=0, v=300, loss="focal_loss"), ["xent-inplace"], repeat=3)}
    assert "cross_entropy only" in ce["xent-inplace"].skipped


def test_peak_memory_is_measured_per_process():
    """The eager implementation keeps a log-softmax and a gradient (N × V each) alive; the floor allocates one."""
    problem = Problem("ce", n=4096, d=0, v=4096)  # 64 MiB of logits: above glibc's largest mmap threshold
    by_name = {m.name: m for m in run_bench(problem, ["torch-eager", "floor"], repeat=3)}
    logits_bytes = 4096 * 4096 * 4
    assert by_name["torch-eager"].peak >= 1.5 * logits_bytes
    assert 0.5 * logits_bytes <= by_name["floor"].peak <= 1.5 * logits_bytes


def test_lm_step_measures_a_patched_model_beside_the_unpatched_one():
    """A training step of a small Llama: the unpatched model keeps three N × V tensors (logits, log-softmax, their
    gradient), the patched one a single chunk. 64 MiB of logits: above glibc's largest mmap threshold, so that freed
    blocks leave the resident set and each step's peak is its own."""
    pytest.importorskip("transformers")
    problem = Problem("lm-step", n=4096, d=64, v=4096)
    by_name = {m.name: m for m in run_bench(problem, ["xent", "xent-reference", "torch-eager"], repeat=3)}
    logits_bytes = 4096 * 4096 * 4
    assert by_name["xent"].time_s > 0 and by_name["torch-eager"].time_s > 0
    assert "baselines" in by_name["xent-reference"].skipped  # plain cross-entropy: the unpatched model is its baseline
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
         "--impl", "xent,floor", "--csv", str(csv_path), "--plot", str(plot_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "xent bench linear-ce — N=64, V=256, D=16, float32, cpu" in result.stdout
    rows = list(csv.DictReader(csv_path.open()))
    assert [(row["v"], row["implementation"]) for row in rows] == [
        (v, name) for v in ("128", "256") for name in ("xent", "floor")
    ]
    assert all(float(row["median_ms"]) > 0 for row in rows)
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
    assert "xent-inplace" in help_text and "cce-exact" in help_text and "reference-compile" in help_text
