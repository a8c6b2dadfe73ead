"""One progress policy for every long job (harvest, train, sweep, ITDA fit, analyze, eval).

- In a Jupyter notebook: a `tqdm.auto` bar (a widget where ipywidgets is installed, else text).
- On a terminal (stderr is a TTY): a live `tqdm` bar, redrawn in place.
- Otherwise (a batch job's log, output piped to a file): plain lines, never carriage returns. A line
  when `interval` seconds have passed since the last one (10 s; `SAEWB_PROGRESS_INTERVAL_S` changes
  it), or when another tenth of the job is done but no sooner than a tenth of that interval; each
  line has the count, the rate and the ETA. When the job ends, one summary line.

So a piped job of T seconds writes at most about T/interval + 10 progress lines and one summary.
Every long job asks `progress_bar` for its bar; nothing else in the workbench prints progress.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol, TextIO

INTERVAL_ENV = "SAEWB_PROGRESS_INTERVAL_S"
DEFAULT_INTERVAL_S = 10.0
STEPS = 10  # a line at each tenth of a job with a known total


class Progress(Protocol):
    """What a job does with its bar (the part of tqdm's interface the workbench uses)."""

    total: float | None

    def update(self, n: float = 1) -> Any: ...

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None: ...

    def close(self) -> None: ...


def in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython's ZMQ shell), where widget bars draw."""
    if "IPython" not in sys.modules:
        return False
    from IPython import get_ipython

    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def interval_s() -> float:
    """Seconds between progress lines in a log (tests shorten it through the environment)."""
    raw = os.environ.get(INTERVAL_ENV)
    try:
        return max(float(raw), 0.0) if raw else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress_bar(
    desc: str,
    total: float | None = None,
    *,
    initial: float = 0,
    unit: str = "it",
    unit_scale: bool = False,
    enabled: bool = True,
) -> Progress:
    """The bar for a long job, following the module's policy; `enabled=False` gives a silent one."""
    from tqdm import tqdm

    if not enabled:
        return tqdm(total=total, initial=initial, disable=True)
    if in_notebook():
        return notebook_bars()(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale)
    if is_terminal(sys.stderr):
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale, smoothing=0.1)
    return LogProgress(desc, total, initial=initial, unit=unit, unit_scale=unit_scale)


def notebook_bars() -> Any:
    """``tqdm.auto``'s bar class. Imported here first (the notebook API does so on import, before
    transformers imports it) so that its warning about a missing ipywidgets stays silent: without
    ipywidgets tqdm.auto falls back to text bars, which is fine."""
    import warnings

    from tqdm import TqdmWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TqdmWarning)
        from tqdm.auto import tqdm as auto_tqdm

    return auto_tqdm


def quiet_library_bars() -> None:
    """Without a terminal, the libraries' own bars (Hugging Face's "Loading weights", dataset downloads)
    would write carriage-return frames into the log: turn them off before those libraries load."""
    if not is_terminal(sys.stderr) and not in_notebook():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


class LogProgress:
    """Progress as plain log lines (see the module docstring for when a line is written)."""

    def __init__(
        self,
        desc: str,
        total: float | None = None,
        *,
        initial: float = 0,
        unit: str = "it",
        unit_scale: bool = False,
        interval: float | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.desc, self.total, self.unit, self.unit_scale = desc, total, unit, unit_scale
        self.n = self.initial = initial
        self.interval = interval_s() if interval is None else interval
        self.stream = stream
        self.clock = clock
        self.t0 = self.last_t = clock()
        self.last_step = self._step()
        self.postfix = ""
        self.lines = 0
        self.closed = False

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _step(self) -> int:
        return int(self.n / self.total * STEPS) if self.total else 0

    def _count(self, value: float) -> str:
        if self.unit_scale:
            from tqdm import tqdm

            return str(tqdm.format_sizeof(value))
        return f"{value:,.0f}" if value >= 100 or float(value).is_integer() else f"{value:.3g}"

    def _write(self, text: str) -> None:
        print(f"{self.desc}: {text}{self.postfix}", file=self.stream or sys.stderr, flush=True)
        self.lines += 1

    def update(self, n: float = 1) -> None:
        self.n += n
        now = self.clock()
        since = now - self.last_t
        step = self._step()
        finished = self.total is not None and self.n >= self.total  # the summary line follows
        if not finished and (
            since >= self.interval or (step > self.last_step and since >= self.interval / STEPS)
        ):
            self.last_t, self.last_step = now, step
            self._write(self._status(now))

    def _status(self, now: float) -> str:
        elapsed = now - self.t0
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        done = (
            f"{self._count(self.n)}/{self._count(self.total)} {self.unit}"
            if self.total
            else f"{self._count(self.n)} {self.unit}"
        )
        pct = f" ({self.n / self.total:.0%})" if self.total else ""
        eta = f", ETA {_duration(max(self.total - self.n, 0) / rate)}" if self.total and rate > 0 else ""
        return f"{done}{pct}, {self._count(rate)} {self.unit}/s{eta}"

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(dict(ordered_dict) if ordered_dict else {}), **kwargs}
        self.postfix = "".join(f", {k}={v}" for k, v in items.items())

    def close(self) -> None:
        """The summary line: what was done, in how long, at what rate (once)."""
        if self.closed:
            return
        self.closed = True
        elapsed = self.clock() - self.t0
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        ended = "done" if not self.total or self.n >= self.total else f"stopped at {self.n / self.total:.0%}"
        self._write(
            f"{ended}, {self._count(self.n)} {self.unit} in {_duration(elapsed)} "
            f"({self._count(rate)} {self.unit}/s)"
        )


def _duration(seconds: float) -> str:
    """3.2 s, 4:05, 1:02:03."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    from tqdm import tqdm

    return str(tqdm.format_interval(seconds))
