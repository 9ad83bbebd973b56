"""Progress in a log: plain lines at the first update, every 30 s or 5%, and the last, with rate and ETA; a tqdm bar
on a terminal; nothing when disabled."""

from __future__ import annotations

import io

import pytest
from tqdm import tqdm

from perceptual_diffusion.runtime import progress as P


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_a_log_gets_a_line_every_5_percent_with_rate_and_eta() -> None:
    stream, clock = io.StringIO(), FakeClock()
    bar = P.progress_bar(200, "sampling", "batch", stream=stream, clock=clock)
    assert isinstance(bar, P.LineProgress)
    assert _lines(stream) == ["sampling: 0/200 batch (0%), elapsed 00:00"]
    for _ in range(9):  # 9 batches at 2 per second: below 5% of 200
        clock.now += 0.5
        bar.update()
    assert len(_lines(stream)) == 1
    clock.now += 0.5
    bar.update()  # the 10th: 5%
    assert _lines(stream)[-1] == "sampling: 10/200 batch (5%), 2.00 batch/s, elapsed 00:05, ETA 01:35"
    for _ in range(190):
        clock.now += 0.25  # faster now: the rate is the current one, not the average since the start
        bar.update()
    lines = _lines(stream)
    assert len(lines) == 1 + 20, "the first line and one per 5%, the last (200/200) among them"
    assert lines[-1] == "sampling: 200/200 batch (100%), 4.00 batch/s, elapsed 00:52, ETA 00:00"
    bar.close()
    assert len(_lines(stream)) == 21, "close does not repeat a line already written"
    assert "\r" not in stream.getvalue()


def test_a_slow_job_gets_a_line_every_30_seconds_and_a_last_one_at_close() -> None:
    stream, clock = io.StringIO(), FakeClock()
    bar = P.progress_bar(10_000, "train mse", "steps", stream=stream, clock=clock, show_rate=False)
    for _ in range(7):  # 7 steps of 10 s: far below 5% of 10,000, so lines come from the clock alone
        clock.now += 10
        bar.update()
    bar.set_postfix_str("loss 0.1234, 51 images/s")
    clock.now += 10
    bar.update()
    lines = _lines(stream)
    assert [line.split(",")[0] for line in lines] == [
        "train mse: 0/10000 steps (0%)",
        "train mse: 3/10000 steps (0%)",  # 30 s
        "train mse: 6/10000 steps (0%)",  # 60 s
    ]
    assert "ETA 27:46:10" in lines[1] and "step/s" not in stream.getvalue() and "s/step" not in stream.getvalue()
    bar.close()
    assert _lines(stream)[-1] == "train mse: 8/10000 steps (0%), elapsed 01:20, ETA 27:45:20, loss 0.1234, 51 images/s"


def test_a_rate_below_one_per_second_reads_as_seconds_per_unit_and_no_total_has_no_eta() -> None:
    stream, clock = io.StringIO(), FakeClock()
    bar = P.progress_bar(None, "encoding latents", "chunk", stream=stream, clock=clock)
    clock.now += 40
    bar.update()
    assert _lines(stream)[-1] == "encoding latents: 1 chunk, 40.00 s/chunk, elapsed 00:40"


def test_the_iterable_form_counts_after_each_item_and_ends_with_the_last_line() -> None:
    stream, clock = io.StringIO(), FakeClock()
    seen = []
    for i in P.progress(range(3), desc="reference features", unit="batch", stream=stream, clock=clock):
        seen.append(i)
        clock.now += 1
    assert seen == [0, 1, 2]
    assert _lines(stream)[-1] == "reference features: 3/3 batch (100%), 1.00 batch/s, elapsed 00:03, ETA 00:00"


def test_a_terminal_gets_the_tqdm_bar() -> None:
    stream = Terminal()
    bar = P.progress_bar(4, "sampling", "batch", stream=stream, mininterval=0)  # tqdm options pass through
    assert isinstance(bar, tqdm)
    bar.update(2)
    bar.close()
    assert "\r" in stream.getvalue() and "2/4" in stream.getvalue()


@pytest.mark.parametrize("stream", [io.StringIO(), Terminal()], ids=["log", "terminal"])
def test_disabled_writes_nothing(stream: io.StringIO) -> None:
    bar = P.progress_bar(4, "sampling", "batch", enabled=False, stream=stream)
    bar.update(4)
    bar.close()
    assert list(P.progress([1, 2], enabled=False, stream=stream)) == [1, 2]
    assert stream.getvalue() == ""
