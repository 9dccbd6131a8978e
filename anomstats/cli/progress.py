"""A tiny text progress bar for long command-line runs (no dependency).

It draws on a stream (standard error by default) and only when that stream is a terminal, so
piped or captured output stays clean; pass ``enabled=True`` to force it.
"""

from __future__ import annotations

import sys
from typing import TextIO


class ProgressBar:
    """Single-line progress bar redrawn in place with a carriage return.

    Parameters
    ----------
    total : int
        Number of steps the run will take (must be >= 0).
    stream : file-like, optional
        Where to draw; standard error when omitted.
    enabled : bool, optional
        Draw or not; by default only when ``stream`` is a terminal.
    width : int, optional
        Number of characters of the bar itself.

    Examples
    --------
    >>> import io
    >>> out = io.StringIO()
    >>> bar = ProgressBar(4, stream=out, enabled=True, width=8)
    >>> bar.advance("first")
    >>> bar.close()
    >>> print(out.getvalue().split("\\r")[1].rstrip())
    [##......] 1/4 first
    """

    def __init__(
        self, total: int, *, stream: TextIO | None = None, enabled: bool | None = None, width: int = 30
    ) -> None:
        if total < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.total = int(total)
        self.done = 0
        self.width = int(width)
        self.stream = sys.stderr if stream is None else stream
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty()) if callable(isatty) else False
        self.enabled = enabled
        self._last_len = 0

    def advance(self, label: str = "") -> None:
        """Count one more step done and redraw, showing ``label`` after the counter."""
        self.done = min(self.done + 1, self.total) if self.total else self.done + 1
        self._draw(label)

    def describe(self, label: str) -> None:
        """Redraw with a new label (what is running now) without counting a step."""
        self._draw(label)

    def _draw(self, label: str) -> None:
        if not self.enabled:
            return
        filled = self.width if not self.total else (self.width * self.done) // self.total
        text = f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {label}"
        # Pad with spaces so a shorter label fully overwrites the previous, longer one.
        pad = max(self._last_len - len(text), 0)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self._last_len = len(text)

    def close(self) -> None:
        """Erase the bar so that following output starts on a clean line."""
        if self.enabled and self._last_len:
            self.stream.write("\r" + " " * self._last_len + "\r")
            self.stream.flush()
            self._last_len = 0
