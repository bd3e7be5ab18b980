"""A download progress bar for people: a live line on a terminal, a log line every 10% elsewhere."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


class ProgressBar:
    """Call with ``(done_bytes, total_bytes, sources)``; ``close()`` ends the line."""

    def __init__(self, label: str, stream=sys.stderr, width: int = 30) -> None:
        self.label, self.stream, self.width = label, stream, width
        self.live = stream.isatty()
        self.began = time.monotonic()
        self._logged_tenth = -1
        self._drawn = 0.0

    def __call__(self, done: int, total: int, sources: int) -> None:
        fraction = done / total if total else 1.0
        elapsed = max(1e-9, time.monotonic() - self.began)
        text = f"{self.label} {done / 1e6:.1f}/{total / 1e6:.1f} MB {done / elapsed / 1e6:.1f} MB/s from {sources} peers"
        if self.live:
            now = time.monotonic()
            if now - self._drawn >= 0.1 or done >= total:
                self._drawn = now
                filled = int(fraction * self.width)
                self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {fraction:4.0%} {text}\033[K")
                self.stream.flush()
        elif int(fraction * 10) > self._logged_tenth:
            self._logged_tenth = int(fraction * 10)
            log.info("%s (%.0f%%)", text, 100 * fraction)

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()
