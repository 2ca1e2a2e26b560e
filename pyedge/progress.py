"""Training progress: a live one-line bar on a terminal, plain log lines otherwise."""
from __future__ import annotations

import math
import os
import shutil
import sys
import time


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """`update(step, loss=..., lr=...)` after each optimizer step; `write(msg)` for messages
    that must not be overwritten by the bar; `close()` at the end.

    On a TTY the bar is redrawn in place (at most `refresh` times per second); otherwise a
    line is printed every `every` steps and at the last step.
    """

    def __init__(self, total: int, initial: int = 0, stream=None, every: int = 10,
                 tty: bool | None = None, refresh: float = 10.0, enabled: bool = True):
        self.total = max(int(total), 0)
        self.stream = stream if stream is not None else sys.stderr
        self.every = max(int(every), 1)
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"
        self.tty = tty
        self.enabled = enabled
        self.min_interval = 1.0 / refresh if refresh > 0 else 0.0
        self.start_step = int(initial)
        self.step = int(initial)
        self.t0 = time.perf_counter()
        self._last_draw = 0.0
        self._drawn = False
        self.loss = float("nan")
        self.extra: dict = {}

    # --- rates -----------------------------------------------------------------------------
    @property
    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        done = self.step - self.start_step
        return done / dt if dt > 0 and done > 0 else float("nan")

    @property
    def eta(self) -> float:
        r = self.rate
        return (self.total - self.step) / r if r and math.isfinite(r) and r > 0 else float("nan")

    def line(self, width: int | None = None) -> str:
        parts = [f"{self.step}/{self.total}", f"loss {self.loss:.4f}"]
        for k, v in self.extra.items():
            parts.append(f"{k} {v:.2e}" if isinstance(v, float) and k == "lr" else
                         f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        r = self.rate
        parts.append(f"{r:.1f} steps/s" if math.isfinite(r) else "- steps/s")
        parts.append(f"ETA {format_duration(self.eta)}")
        text = "  ".join(parts)
        if width is None:
            return text
        bar_w = width - len(text) - 3
        if bar_w >= 10 and self.total > 0:
            bar_w = min(bar_w, 30)
            filled = int(bar_w * min(self.step, self.total) / self.total)
            text = "[" + "#" * filled + "." * (bar_w - filled) + "] " + text
        return text[: max(width - 1, 1)]

    # --- output ----------------------------------------------------------------------------
    def update(self, step: int, loss: float | None = None, **extra) -> None:
        self.step = int(step)
        if loss is not None:
            self.loss = float(loss)
        self.extra.update(extra)
        if not self.enabled:
            return
        if self.tty:
            now = time.perf_counter()
            if now - self._last_draw >= self.min_interval or self.step >= self.total:
                self._draw()
                self._last_draw = now
        elif self.step % self.every == 0 or self.step >= self.total:
            self.stream.write("step " + self.line() + "\n")
            self.stream.flush()

    def _draw(self) -> None:
        width = shutil.get_terminal_size((100, 20)).columns
        self.stream.write("\r" + self.line(width).ljust(width - 1) + "\r")
        self.stream.flush()
        self._drawn = True

    def write(self, msg: str) -> None:
        """A message on its own line (the bar is redrawn below it); printed also when the
        bar itself is disabled."""
        if self.enabled and self.tty and self._drawn:
            width = shutil.get_terminal_size((100, 20)).columns
            self.stream.write("\r" + " " * (width - 1) + "\r")
        self.stream.write(msg + "\n")
        if self.enabled and self.tty and self._drawn:
            self._draw()
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._drawn:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


class Phase:
    """One slow-maybe step before training (importing, adapting, planning a large model):

        with Phase("planning the training step"):
            ...

    prints "<what> ..." on stderr once the step has run `after` seconds, and
    "<what>: done in 12.3 s" when it ends, so a long plan of a large model does not look like
    a hang; a step that ends sooner prints nothing. A timer thread prints the first line (in
    a call that holds the GIL it appears when the call returns). PYEDGE_QUIET=1 silences it.
    """

    def __init__(self, what: str, stream=None, after: float = 2.0):
        self.what = what
        self.stream = stream if stream is not None else sys.stderr
        self.after = after
        self.enabled = os.environ.get("PYEDGE_QUIET", "") in ("", "0")
        self._timer = None
        self._announced = False

    def _announce(self) -> None:
        self._announced = True
        self.stream.write(f"{self.what} ...\n")
        self.stream.flush()

    def __enter__(self) -> "Phase":
        import threading
        self.t0 = time.perf_counter()
        if self.enabled:
            self._timer = threading.Timer(self.after, self._announce)
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer.join()
        dt = time.perf_counter() - self.t0
        if self.enabled and (self._announced or dt >= self.after):
            state = "failed after" if exc[0] is not None else "done in"
            self.stream.write(f"{self.what}: {state} {dt:.1f} s\n")
            self.stream.flush()
