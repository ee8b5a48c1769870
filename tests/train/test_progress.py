"""The time left that xent train and xent compare show on the console."""

import io
import re

from rich.console import Console

from xent.train.progress import RunClock, clock, time_left


def test_time_left_at_the_pace_so_far():
    assert time_left(30.0, 2, 6) == 60.0
    assert time_left(0.0, 0, 6) is None and time_left(5.0, 0, 6) is None  # nothing done: no estimate
    assert time_left(30.0, 6, 6) == 0.0
    assert [clock(s) for s in (0, 59.6, 61, 3725)] == ["0:00", "1:00", "1:01", "1:02:05"]


def test_a_run_of_one_epoch_leaves_the_estimate_to_its_bar():
    assert RunClock(0, 1).eta(0, 0.5) == ""
    assert RunClock(3, 10).eta(3) == ""  # a resumed run estimates from what this process trained: nothing yet
    assert re.fullmatch(r"run ETA \d+:\d\d", RunClock(3, 10).eta(3, 0.5))


def test_the_epoch_bar_shows_the_epochs_and_the_runs_time_left(tmp_path):
    from xent.train import TrainConfig, train

    buffer = io.StringIO()
    train(TrainConfig(out=str(tmp_path / "run"), epochs=2, log_interval=5),
          Console(file=buffer, force_terminal=True, width=200))  # fmt: skip
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buffer.getvalue())
    assert re.search(r"epoch 1/2 .*epoch ETA \d+:\d\d:\d\d run ETA \d+:\d\d", text), text[-2000:]
