"""A progress line on stderr: done/total, bytes, rate and ETA; silent when quiet or not a TTY."""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def fmt_bytes(n: float, decimals: int = 1) -> str:
    """``n`` bytes in binary units (B, KiB ... TiB) with ``decimals`` places above B."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{decimals}f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def fmt_secs(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class Progress:
    """``with Progress(total_work, label) as p: p.advance(work, item=..., nbytes=...)``.

    ``total`` is in the same units as ``advance`` (weights, bytes or chunks); the
    ETA is ``elapsed * (total - done) / done``. ``count`` counts items (tensors,
    chunks) for the ``i/n`` part of the line.
    """

    def __init__(self, total: float, label: str = "", n_items: Optional[int] = None,
                 unit: str = "", enabled: bool = True, stream: Optional[TextIO] = None,
                 min_interval: float = 0.2):
        self.total = max(float(total), 1.0)
        self.label = label
        self.n_items = n_items
        self.unit = unit
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.is_tty = getattr(self.stream, "isatty", lambda: False)()
        self.min_interval = min_interval if self.is_tty else 5.0
        self.done = 0.0
        self.items = 0
        self.nbytes = 0
        self.item = ""
        self.t0 = time.monotonic()
        self._last = 0.0
        self._drawn = False

    def __enter__(self) -> "Progress":
        self.t0 = time.monotonic()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def advance(self, work: float = 0, *, items: int = 0, nbytes: int = 0, item: Optional[str] = None) -> None:
        self.done += work
        self.items += items
        self.nbytes += nbytes
        if item is not None:
            self.item = item
        now = time.monotonic()
        if self.enabled and (now - self._last >= self.min_interval):
            self._last = now
            self._draw(now)

    def line(self, now: Optional[float] = None) -> str:
        now = now or time.monotonic()
        el = now - self.t0
        frac = min(1.0, self.done / self.total)
        width = 24
        fill = int(frac * width)
        bar = "#" * fill + "-" * (width - fill)
        parts = [f"{self.label} [{bar}] {frac * 100:5.1f}%"]
        if self.n_items is not None:
            parts.append(f"{self.items}/{self.n_items}")
        if self.nbytes:
            rate = self.nbytes / el if el > 0 else 0.0
            parts.append(f"{fmt_bytes(self.nbytes)} {fmt_bytes(rate)}/s")
        if 0 < self.done < self.total and el > 0.5:
            parts.append(f"ETA {fmt_secs(el * (self.total - self.done) / self.done)}")
        else:
            parts.append(f"{fmt_secs(el)}")
        if self.item:
            parts.append(self.item)
        return "  ".join(parts)

    def _draw(self, now: float) -> None:
        text = self.line(now)
        if self.is_tty:
            cols = 120
            self.stream.write("\r" + text[:cols].ljust(cols if self._drawn else 0))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self.enabled and self._drawn and self.is_tty:
            self.stream.write("\n")
            self.stream.flush()
        self._drawn = False

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0
