"""Processes the benchmark starts: spawn each in its own session, find its children, read its RSS,
pause and resume it, and stop every one of them however the run ends."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    """Block until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on port {port} within {timeout}s")


def rss_kb(pid: int) -> int | None:
    """VmRSS of a process in kB, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def children(pid: int, live: bool = False) -> list[int]:
    """Direct children of pid, by scanning /proc; live: not those that exited and wait to be reaped."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses; the fields after the last ")" do not.
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[1]) == pid and not (live and fields[0] == "Z"):
            found.append(int(entry))
    return sorted(found)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_times() -> list[int] | None:
    """The machine's CPU time counters (/proc/stat: user nice system idle iowait irq softirq steal),
    or None where there are none."""
    try:
        with open("/proc/stat") as fh:
            return [int(v) for v in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return None


def cpu_delta(start: list[int] | None, end: list[int] | None) -> tuple[int, int, int] | None:
    """(all, busy, stolen) clock ticks between two cpu_times(); busy leaves out idle, iowait and steal."""
    if not start or not end or len(start) < 8 or len(end) < 8:
        return None
    delta = [b - a for a, b in zip(start, end, strict=True)]
    return sum(delta), sum(delta) - delta[3] - delta[4] - delta[7], delta[7]


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process has used, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def named(comm: str) -> list[int]:
    """Every process whose command name is comm (PostgreSQL starts a backend per connection)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as fh:
                    if fh.read().strip() == comm:
                        found.append(int(entry))
            except OSError:
                continue
    return found


class CpuMeter:
    """Where a phase's CPU time went: the CPU seconds each group of processes used between start()
    and per_item(), per item. A group is a function returning its pids, asked at both ends; a process
    that ended in between is not counted in its group. Everything else the machine was busy with is
    "other": the load generator, processes that exited meanwhile (autovacuum workers), the kernel's
    interrupt work (loopback networking), this process, anything else running. "all" is the whole
    machine, from /proc/stat, steal excluded."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]):
        self.groups = groups
        self._start: tuple[dict, list[int] | None] | None = None

    def _snapshot(self) -> dict[str, dict[int, float]]:
        return {name: {pid: used for pid in find() if (used := cpu_seconds(pid)) is not None}
                for name, find in self.groups.items()}

    def start(self) -> CpuMeter:
        """Take the starting counts (again, to reuse the meter for a later phase)."""
        self._start = (self._snapshot(), cpu_times())
        return self

    def per_item(self, items: int) -> dict[str, float] | None:
        """Milliseconds of CPU per item since start(), by group, then "other" and "all"."""
        if self._start is None or items <= 0:
            return None
        before, machine_before = self._start
        after, machine_after = self._snapshot(), cpu_times()
        used = {name: sum(seconds - before[name].get(pid, 0.0) for pid, seconds in after[name].items())
                for name in self.groups}
        if machine := cpu_delta(machine_before, machine_after):
            busy = machine[1] / CLOCK_TICKS
            used["other"] = max(0.0, busy - sum(used.values()))
            used["all"] = busy
        return {name: round(1000 * seconds / items, 3) for name, seconds in used.items()}


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: str
    stopped: bool = False  # paused with SIGSTOP

    @property
    def pid(self) -> int:
        return self.popen.pid


@dataclass
class Procs:
    """Every process this run started, stopped in reverse order by close()."""

    log_dir: str
    env: dict = field(default_factory=lambda: dict(os.environ))
    items: list[Proc] = field(default_factory=list)

    def spawn(self, name: str, args: list[str], env: dict | None = None, python: bool = True) -> Proc:
        """Start args (a Python module or script when python) in its own session, logging to a file."""
        log_path = os.path.join(self.log_dir, f"{name}.log")
        log = open(log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        argv = [sys.executable, *args] if python else args
        popen = subprocess.Popen(argv, env=env or self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        proc = Proc(name, popen, log_path)
        self.items.append(proc)
        return proc

    def pause(self, proc: Proc) -> None:
        """SIGSTOP the process (only it: a worker's scheduler child keeps running)."""
        os.kill(proc.pid, signal.SIGSTOP)
        proc.stopped = True

    def resume(self, proc: Proc) -> None:
        if proc.stopped:
            os.kill(proc.pid, signal.SIGCONT)
            proc.stopped = False

    def stop(self, proc: Proc, timeout: float = 15.0) -> int | None:
        """SIGTERM the process's whole session, then SIGKILL what is left after timeout."""
        if proc in self.items:
            self.items.remove(proc)
        try:
            os.kill(proc.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            code = proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            code = proc.popen.wait(timeout=5)
        # Whatever the leader left behind in its session (a forked scheduler, gunicorn workers).
        _signal_group(proc.pid, signal.SIGKILL)
        return code

    def close(self) -> None:
        """Stop everything still running, newest first; a second Ctrl-C (or kill) does not interrupt this."""
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for proc in reversed(list(self.items)):
                try:
                    self.stop(proc, timeout=10)
                except Exception as exc:  # noqa: BLE001 - keep stopping the others
                    print(f"bench: could not stop {proc.name} ({proc.pid}): {exc}", file=sys.stderr)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
