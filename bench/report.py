"""The one table: each figure, its baseline, the ratio between them, the floor and whether it holds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Row:
    figure: str
    value: float | None
    unit: str = ""
    baseline: float | None = None
    baseline_name: str = ""
    floor: str = ""
    check: Callable[[float, float | None], bool] | None = None
    note: str = ""
    needs_baseline: bool = False  # the floor is relative: no baseline, no verdict

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline

    @property
    def verdict(self) -> str:
        if self.note.startswith("skipped"):
            return "skip"
        if self.value is None or (self.needs_baseline and self.baseline is None):
            return "n/a"
        if self.check is None:
            return ""
        return "pass" if self.check(self.value, self.baseline) else "FAIL"

    def as_dict(self) -> dict:
        return {"figure": self.figure, "value": self.value, "unit": self.unit, "baseline": self.baseline,
                "baseline_name": self.baseline_name, "ratio": _round(self.ratio, 3), "floor": self.floor,
                "verdict": self.verdict, "note": self.note}


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.1f}" if abs(value) >= 10 else f"{value:,.2f}"
    return f"{text} {unit}".rstrip()


def _get(data: dict | None, *path):
    for part in path:
        if data is None:
            return None
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _max(by_pid: dict[str, float] | None) -> float | None:
    return max(by_pid.values()) if by_pid else None


def _growth(idle: dict[str, float] | None, after: dict[str, float] | None) -> float | None:
    """Largest growth of one process from idle to after, in percent ({pid: MB} both)."""
    both = [pid for pid in (idle or {}) if pid in (after or {})]
    return max((after[pid] / idle[pid] - 1) * 100 for pid in both) if both else None


def build_rows(results: dict, opts) -> list[Row]:
    """The table's rows from a run's results; a phase that did not run leaves its rows empty."""
    bare, rq, smtp = results.get("bare"), results.get("raw_rq"), results.get("raw_smtp")
    single, drain, lat, prio, queued = (results.get(k) for k in ("single", "drain", "latency", "priority", "queued"))
    memory, lat_base = results.get("memory"), results.get("latency_baseline")
    rows: list[Row] = []
    short = f" (floor is for 60 s; this ran {opts.duration:g} s)" if opts.duration < 60 else ""
    rows.append(Row("single send: accepted/s", _get(single, "requests_per_s"), "/s",
                    _get(bare, "single", "requests_per_s"), "bare Flask req/s", ">= 1,000/s" + short,
                    lambda v, b: v >= 1000 and not _errors(single)))
    for name in ("p50", "p95", "p99"):
        rows.append(Row(f"single send: {name}", _get(single, "latency_ms", name), "ms",
                        _get(bare, "single", "latency_ms", name), f"bare Flask {name}",
                        "<= 30 ms" if name == "p99" else "",
                        (lambda v, b: v <= 30) if name == "p99" else None))
    accepted = _get(queued, "create")
    rows.append(Row(f"single send, workers paused: accepted/s ({_get(accepted, 'requests') or 0:,} requests)",
                    _get(accepted, "requests_per_s"), "/s", _get(bare, "single", "requests_per_s"), "bare Flask req/s",
                    ">= 1,000/s", lambda v, b: v >= 1000 and not _errors(accepted)))
    rows.append(Row("single send, workers paused: p99", _get(accepted, "latency_ms", "p99"), "ms",
                    _get(bare, "single", "latency_ms", "p99"), "bare Flask p99", "<= 30 ms", lambda v, b: v <= 30))
    rows.append(Row(f"drain, one job each: emails/s ({_get(queued, 'notifications') or opts.backlog} backlog)",
                    _get(queued, "emails_per_s"), "/s", _get(rq, "jobs_per_s"), "raw RQ no-op jobs/s",
                    ">= 0.7 x raw RQ", lambda v, b: v >= 0.7 * b, needs_baseline=True))
    batch = _get(drain, "create") if _get(drain, "created_with") == "batch" and "batch" in opts.phases else None
    rows.append(Row("batch: notifications accepted/s", _get(batch, "items_per_s"), "/s",
                    _get(bare, "batch", "items_per_s"), "bare Flask batch items/s", ">= 10,000/s",
                    lambda v, b: v >= 10000, note=_get(drain, "batch_skipped") or ""))
    delivered = _get(drain, "emails_per_s")
    rows.append(Row(f"drain, batch: emails/s ({_get(drain, 'notifications') or opts.backlog} backlog)", delivered,
                    "/s", _get(smtp, "messages_per_s"), "raw SMTP msgs/s", ">= 600/s or >= 0.75 x SMTP",
                    lambda v, b: v >= 600 or v >= 0.75 * b, needs_baseline=True))
    rate = f"{opts.latency_rate:g}/s"
    for name, limit in (("p50", 15), ("p99", 50)):
        rows.append(Row(f"request->SMTP {name} @ {rate}", _get(lat, "request_to_smtp_ms", name), "ms",
                        _get(lat_base, name), f"HTTP+RQ+SMTP {name}", f"<= {limit} ms",
                        lambda v, b, limit=limit: v <= limit))
    rows.append(Row(f"high priority p99, {_get(prio, 'low') or opts.backlog} low draining",
                    _get(prio, "high_request_to_smtp_ms", "p99"), "ms", _get(lat_base, "p99"), "HTTP+RQ+SMTP p99",
                    "<= 100 ms", lambda v, b: v <= 100))
    jobs = _get(results, "delivery_check", "notifications")
    after_what = f"after {jobs:,} notifications" if jobs else "after the run"
    for role, label, base_key, base_name in (("api_workers", "API worker", "bare", "bare Flask worker"),
                                             ("rq_workers", "RQ worker", "raw_rq", "raw RQ worker")):
        base = results.get(base_key)
        idle, after = _get(memory, "idle", role), _get(memory, "after", role)
        rows.append(Row(f"{label} RSS idle (max)", _max(idle), "MB", _max(_get(base, "rss_idle_mb")), base_name,
                        "<= 60 MB", lambda v, b: v <= 60))
        rows.append(Row(f"{label} RSS {after_what} (max)", _max(after), "MB", _max(_get(base, "rss_after_mb")),
                        base_name, ""))
        rows.append(Row(f"{label} RSS growth (max)", _growth(idle, after), "%",
                        _growth(_get(base, "rss_idle_mb"), _get(base, "rss_after_mb")), base_name, "<= 10%",
                        lambda v, b: v <= 10))
    for role, label in (("api_master", "gunicorn master"), ("scheduler", "scheduler.py"),
                        ("rq_worker_schedulers", "worker's forked scheduler (max)")):
        rows.append(Row(f"{label} RSS {after_what}", _max(_get(memory, "after", role)), "MB",
                        _max(_get(memory, "idle", role)), "its idle RSS"))
    return rows


def _cpu_text(cpu: dict | None) -> str:
    if not cpu:
        return "-"
    parts = sorted(((name, ms) for name, ms in cpu.items() if name not in ("other", "all") and ms >= 0.005),
                   key=lambda part: -part[1])
    parts += [(name, cpu[name]) for name in ("other", "all") if name in cpu]
    return ", ".join(f"{name} {ms:.2f}" for name, ms in parts)


def cpu_lines(results: dict) -> str:
    """Where each phase's CPU went, per item, next to its baseline's: what limits a ratio."""
    bare, rq, smtp = results.get("bare"), results.get("raw_rq"), results.get("raw_smtp")
    queued, drain = results.get("queued"), results.get("drain")
    batch_create = _get(drain, "create") if _get(drain, "created_with") == "batch" else None
    lines = [("single send, workers paused (per request)", _get(queued, "create", "cpu_ms"),
              "bare Flask", _get(bare, "single", "cpu_ms")),
             ("drain, one job each (per email)", _get(queued, "cpu_ms"), "raw RQ no-op", _get(rq, "cpu_ms")),
             ("batch (per notification)", _get(batch_create, "cpu_ms"), "bare Flask batch",
              _get(bare, "batch", "cpu_ms")),
             ("drain, batch (per email)", _get(drain, "cpu_ms"), "raw SMTP", _get(smtp, "cpu_ms"))]
    out = ["CPU ms per item by process (all = the whole machine; other = the load generator or the smtplib "
           "clients, processes that exited meanwhile, the kernel's interrupt work, bench itself; ceiling = "
           "the most the machine's CPUs allow at that cost, and the most the ratio can be where both are "
           "CPU-bound):"]
    for label, cpu, base_label, base in lines:
        if cpu or base:
            out.append(f"  {label}: {_cpu_text(cpu)}{_ceiling(cpu, base, results.get('cpus'))}\n"
                       f"      {base_label}: {_cpu_text(base)}")
    return "\n".join(out) if len(out) > 1 else ""


def _ceiling(cpu: dict | None, base: dict | None, cpus: int | None) -> str:
    """How fast the whole machine's CPU time per item lets a phase go at most: a floor above this
    cannot be reached by waiting less, only by spending less."""
    spent = (cpu or {}).get("all")
    if not spent or not cpus:
        return ""
    text = f"; ceiling {cpus * 1000 / spent:,.0f} /s"
    if (base_spent := (base or {}).get("all")):
        text += f", {base_spent / spent:.2f}x"
    return text


def _errors(load: dict | None) -> bool:
    return bool(load and (load.get("errors") or load.get("ok") != load.get("requests")))


def render(rows: list[Row]) -> str:
    """Plain aligned text."""
    header = ("figure", "value", "baseline", "ratio", "floor", "result")
    table = [header]
    for row in rows:
        baseline = f"{_fmt(row.baseline, row.unit)} ({row.baseline_name})" if row.baseline is not None else "-"
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
        value = _fmt(row.value, row.unit) if row.value is not None else (row.note or "-")
        table.append((row.figure, value, baseline, ratio, row.floor or "-", row.verdict or "-"))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) if i != 1 else cell.rjust(widths[i]) for i, cell in enumerate(r))
             for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def delivery_line(check: dict | None) -> str:
    if not check:
        return "delivery check: not run"
    if check["ok"]:
        return (f"delivery check: {check['notifications']} notifications, all sent, "
                "sink received each exactly once")
    return (f"delivery check: FAILED for {check['notifications']} notifications: {check['not_sent']} not sent, "
            f"{check['missing_at_sink']} never reached the sink, {check['received_more_than_once']} received more "
            f"than once, {check['unknown_at_sink']} unknown ids at the sink, {check['raw_not_exactly_once']} raw "
            f"baseline messages not exactly once; e.g. {check['examples']}")


HOW = """how: single = closed loop on POST /send with the workers running (they share the CPUs, as on one box); single,
workers paused = --backlog sends on --concurrency connections with the workers stopped (SIGSTOP), then drain, one
job each = those notifications from resume until the sink has every one; batch = --batch-backlog via POST /batch
with the workers paused, then drain, batch = the same notifications (a batch's jobs carry BATCH_JOB_SIZE each) from
resume until the sink has every one; request->SMTP = open loop, from writing the request to the sink taking the
message; high priority = open loop of high sends while a low backlog drains; RSS = VmRSS per process, idle = after a
warm-up (100 sends, then batches until every API worker has served one).
baselines: bare Flask = same gunicorn settings, same load; raw RQ = no-op jobs, same worker class, count and queues;
raw SMTP = one reused smtplib connection per RQ worker to the same sink; HTTP+RQ+SMTP = bare HTTP at the same rate +
raw RQ enqueue-to-start + one raw SMTP send."""
