"""Progress that reads well on a terminal and in a log file.

On a terminal (stderr is a tty) this is a tqdm bar. Anywhere else (a log file, a pipe, a CI job) tqdm would write a
carriage-return update per step, and ``disable=None`` would write nothing at all; so a small writer prints one
plain line instead: the first, then one every ``INTERVAL_S`` seconds or every ``FRACTION`` of the total (whichever
comes first), then the last, each with the count, the rate and the remaining time, formatted as the bar shows them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TextIO, TypeVar

from tqdm import tqdm

INTERVAL_S = 30.0  # at most this long between two log lines while work advances
FRACTION = 0.05  # ... and a line every 5% of the total

T = TypeVar("T")


class Bar(Protocol):
    """What a manual progress object offers (tqdm's names, so the terminal bar is tqdm itself)."""

    n: int

    def update(self, n: int = 1) -> Any: ...

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> Any: ...

    def close(self) -> Any: ...


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(
    total: int | None,
    desc: str = "",
    unit: str = "it",
    *,
    initial: int = 0,
    enabled: bool = True,
    show_rate: bool = True,
    leave: bool = False,
    stream: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
    **tqdm_options: Any,
) -> Bar:
    """A manual progress object (``update``, ``set_postfix_str``, ``close``): a tqdm bar on a terminal, plain lines
    (``LineProgress``) elsewhere, nothing when not ``enabled``. ``show_rate=False`` leaves the unit rate out of the
    lines (a caller that shows its own speed in the postfix); ``tqdm_options`` go to the bar only."""
    stream = stream if stream is not None else sys.stderr
    if not enabled:
        return _Silent(initial)
    if _is_terminal(stream):
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, file=stream, **tqdm_options)
    return LineProgress(total, desc, unit, initial=initial, stream=stream, clock=clock, show_rate=show_rate)


def progress(
    iterable: Iterable[T],
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    *,
    enabled: bool = True,
    **options: Any,
) -> Iterable[T]:
    """``iterable`` with progress (see ``progress_bar``); ``total`` defaults to its length when it has one."""
    if not enabled:
        return iterable
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    return _counted(iterable, progress_bar(total, desc, unit, **options))


def _counted(iterable: Iterable[T], bar: Bar) -> Iterator[T]:
    try:
        for item in iterable:
            yield item
            bar.update(1)  # after the consumer's work on the item, as tqdm counts
    finally:
        bar.close()


class _Silent:
    """A disabled bar: counts, writes nothing."""

    def __init__(self, initial: int) -> None:
        self.n = initial

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:  # noqa: ARG002 - tqdm's signature
        pass

    def close(self) -> None:
        pass


class LineProgress:
    """Progress as plain lines for a log: the first, one per ``INTERVAL_S`` seconds or ``FRACTION`` of the total,
    and the last. The rate is over the work since the previous line (the current throughput, as the bar's is
    smoothed), and the remaining time is the work left at that rate."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str,
        *,
        initial: int = 0,
        stream: TextIO,
        clock: Callable[[], float] = time.monotonic,
        show_rate: bool = True,
    ) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.stream, self.clock, self.show_rate = stream, clock, show_rate
        self.postfix = ""
        self._start = clock()
        self._initial = initial
        self._last_n, self._last_t = initial, self._start
        self._rate: float | None = None
        self._closed = False
        self._write(self._start)

    def _step(self, n: int) -> int:
        """Which FRACTION of the total ``n`` lies in (or -1 without a total)."""
        return int(n / (self.total * FRACTION)) if self.total else -1

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        finished = self.total is not None and self.n >= self.total
        if finished or now - self._last_t >= INTERVAL_S or self._step(self.n) > self._step(self._last_n):
            self._write(now)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:  # noqa: ARG002 - tqdm's signature
        self.postfix = s

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.n != self._last_n:
            self._write(self.clock())

    def _write(self, now: float) -> None:
        if now > self._last_t and self.n > self._last_n:
            self._rate = (self.n - self._last_n) / (now - self._last_t)
        self._last_n, self._last_t = self.n, now
        parts = [f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        if self._rate and self.show_rate:
            parts.append(
                f"{self._rate:.2f} {self.unit}/s" if self._rate >= 1 else f"{1 / self._rate:.2f} s/{self.unit}"
            )
        parts.append(f"elapsed {tqdm.format_interval(now - self._start)}")
        if self._rate and self.total:
            parts.append(f"ETA {tqdm.format_interval(max(self.total - self.n, 0) / self._rate)}")
        if self.postfix:
            parts.append(self.postfix)
        self.stream.write(f"{self.desc}: {', '.join(parts)}\n" if self.desc else f"{', '.join(parts)}\n")
        self.stream.flush()
