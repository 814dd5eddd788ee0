"""Progress that reads well on a terminal and in a log file.

On a terminal, a tqdm bar. Anywhere else (``make demo > log``, CI, a batch job) a tqdm bar
would write hundreds of carriage-return updates into one line, so this writes one plain line
every ``interval`` seconds instead, and one at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")
LOG_INTERVAL = 30.0  # seconds between progress lines when not on a terminal


class _Lines:
    """tqdm's small interface (update, set_postfix, close, iteration) as periodic lines."""

    def __init__(
        self,
        iterable: Iterable[Any] | None,
        total: int | None,
        desc: str,
        unit: str,
        interval: float,
    ):
        self.iterable, self.desc, self.unit, self.interval = iterable, desc, unit, interval
        self.total = (
            total
            if total is not None
            else (len(iterable) if hasattr(iterable, "__len__") else None)
        )  # type: ignore[arg-type]
        self.n, self.postfix, self.start = 0, "", time.monotonic()
        self.last = self.start

    def _line(self) -> None:
        elapsed = time.monotonic() - self.start
        of = f"/{self.total}" if self.total is not None else ""
        rate = f", {self.n / elapsed:.1f} {self.unit}/s" if elapsed > 0 else ""
        post = f", {self.postfix}" if self.postfix else ""
        print(
            f"{self.desc}: {self.n}{of} {self.unit}{rate}{post} ({elapsed:.0f} s)",
            file=sys.stderr,
            flush=True,
        )

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.n:
            self._line()
            self.n = 0

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update()
        self.close()

    def __enter__(self) -> _Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Off(_Lines):
    def _line(self) -> None:
        pass


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    leave: bool = True,
    interval: float = LOG_INTERVAL,
) -> Any:
    """A progress display over ``iterable`` (or driven by ``update``): a tqdm bar on a
    terminal, a line every ``interval`` seconds elsewhere, nothing when not ``enabled``."""
    if not enabled:
        return _Off(iterable, total, desc, unit, interval)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)
    return _Lines(iterable, total, desc, unit, interval)
