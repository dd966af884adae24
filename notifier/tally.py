"""A warning that can come hundreds of times a second, said at most once per interval per process with
how many times it came: each send Redis refused while it was out of memory logged a line of its own."""

from __future__ import annotations

import threading
import time


class Tally:
    """Counts one kind of event, and says when a line about them is due and how many it stands for: the
    first at once, then at most one line per interval, each counting every event since the line before."""

    def __init__(self, interval: float):
        self.interval = interval
        self._lock = threading.Lock()
        self._count = 0  # events not yet in a line
        self._quiet_until = 0.0  # time.monotonic() before which no line is due

    def add(self, count: int = 1) -> int:
        """Count this many more (0: none, only ask); the number since the last line, these included, when
        a line is due now, else 0. A caller that says nothing when told a number loses it."""
        if not count and not self._count:
            return 0  # the usual answer, without the lock (a count added meanwhile waits for the next ask)
        with self._lock:
            self._count += count
            now = time.monotonic()
            if not self._count or now < self._quiet_until:
                return 0
            self._quiet_until, due, self._count = now + self.interval, self._count, 0
            return due
