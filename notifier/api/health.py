"""Liveness and readiness: no API key needed."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from notifier.db import database
from notifier.patience import answer_within
from notifier.resilience import probe_write

bp = Blueprint("health", __name__, url_prefix="/api")


@bp.get("/health")
def health():
    """The process is up; checks nothing else so a slow dependency never gets it restarted."""
    return jsonify(status="ok")


@bp.get("/ready")
def ready():
    """Whether the database answers and Redis takes writes; 503 naming each one that does not."""
    checks = {}
    try:
        # A probe that waits longer than the orchestrator's own timeout tells it nothing: a database that
        # stalls (answers nothing, resets nothing) is not ready once DATABASE_CONNECT_TIMEOUT has passed.
        with answer_within(current_app.extensions["notifier"]["settings"].database_connect_timeout):
            database.execute_sql("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        checks["database"] = f"unavailable: {type(exc).__name__}"
    try:
        # A write, as a send's: a Redis out of memory or read-only answers PING and takes no job.
        probe_write(current_app.extensions["notifier"]["redis"])
        checks["redis"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["redis"] = f"unavailable: {type(exc).__name__}"
    failed = sorted(name for name, state in checks.items() if state != "ok")
    if failed:
        body = {
            "error": {
                "code": "not_ready",
                "message": f"unavailable: {', '.join(failed)}",
                "details": checks,
            }
        }
        return jsonify(body), 503
    return jsonify(status="ready", checks=checks)
