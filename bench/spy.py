"""py-spy profiles of the running stack during the accept and drain phases (`--py-spy`).

The issue asks what limits each figure, profiled on the real processes. With --py-spy the bench runs
`py-spy record --gil` against the API workers while they accept and against the RQ workers while they
drain; --gil keeps only samples of a thread holding the GIL, that is Python's own CPU time, not its
waits. The raw stacks (one `frame;frame;... count` line each, for flamegraph tools) go to the run
directory as spy-<phase>-<part>.txt, and the report prints the heaviest frames of each.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

RATE_HZ = 100
ENTRY_SHARE = 0.9
_LINE = re.compile(r":\d+\)$")  # a frame's line number: frames are counted per function
# Where our own code lives, as py-spy names a frame's file.
_OURS = ("(notifier/", "(worker.py", "(app.py")


def py_spy() -> str | None:
    """The py-spy next to this Python (the project's virtualenv), or on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return here if os.path.exists(here) else shutil.which("py-spy")


class Spy:
    """Records phases when enabled; a no-op otherwise."""

    def __init__(self, run_dir: str, enabled: bool):
        self.run_dir = run_dir
        self.binary = py_spy() if enabled else None
        if enabled and self.binary is None:
            raise SystemExit("bench: --py-spy needs py-spy (pip install py-spy, see requirements.txt)")
        self.files: dict[str, list[str]] = {}

    @contextmanager
    def record(self, label: str, pids: list[int]) -> Iterator[None]:
        """Profile pids while the block runs; their stacks are kept under label."""
        if self.binary is None or not pids:
            yield
            return
        running = []
        for pid in pids:
            path = os.path.join(self.run_dir, f"spy-{label}-{pid}.txt")
            log = open(os.path.join(self.run_dir, f"spy-{label}-{pid}.log"), "w")  # noqa: SIM115 - closed below
            argv = [self.binary, "record", "--gil", "--nonblocking", "--rate", str(RATE_HZ), "--format", "raw",
                    "--output", path, "--pid", str(pid)]
            running.append((subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), path, log))
        try:
            yield
        finally:
            for proc, _, _ in running:
                proc.send_signal(signal.SIGINT)  # py-spy writes what it has on Ctrl-C
            for proc, path, log in running:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                log.close()
                if os.path.exists(path):
                    self.files.setdefault(label, []).append(path)

    def report(self, top: int = 12) -> str:
        """The heaviest frames of each recorded phase, as text for the end of the run's output."""
        if not self.files:
            return ""
        out = [f"py-spy --gil (Python CPU, {RATE_HZ} samples/s per process; stacks in spy-*.txt of the run "
               "directory): share of samples in a frame and what it calls; ours first, then where time is spent"]
        for label, paths in self.files.items():
            samples, inclusive, own = profile(paths)
            if not samples:
                continue
            # Ours, below the entry points (worker.py's main loop, the view) that nearly every sample is in.
            ours = [(name, n) for name, n in inclusive.most_common()
                    if n < ENTRY_SHARE * samples and any(part in name for part in _OURS)]
            out.append(f"  {label} ({samples} samples):")
            out.append("    ours: " + ", ".join(f"{name} {100 * n / samples:.0f}%" for name, n in ours[:top]))
            out.append("    self: " + ", ".join(f"{name} {100 * n / samples:.0f}%" for name, n in own.most_common(top)))
        return "\n".join(out)


def profile(paths: list[str]) -> tuple[int, Counter, Counter]:
    """Samples in all, and per function: samples with it anywhere on the stack, and at the top."""
    samples, inclusive, own = 0, Counter(), Counter()
    for path in paths:
        with open(path) as lines:
            for line in lines:
                stack, _, count = line.rstrip("\n").rpartition(" ")
                if not stack or not count.isdigit():
                    continue
                n = int(count)
                frames = [_LINE.sub(")", frame.strip()) for frame in stack.split(";")]
                samples += n
                inclusive.update(dict.fromkeys(set(frames), n))
                own[frames[-1]] += n
    return samples, inclusive, own
