"""Start-up shared by every entry point: settings, logging, database, Redis, and the deliverer."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from ipaddress import ip_address
from urllib.parse import urlsplit

from redis.exceptions import RedisError

from notifier import logs, resilience, schema
from notifier.config import Settings
from notifier.db import UNAVAILABLE_ERRORS, bind, is_postgres
from notifier.errors import ConfigError
from notifier.models import DIGEST_TEMPLATE
from notifier.rules import RULES

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TEMPLATES_DIR = os.path.join(PROJECT_ROOT, "templates")


def load_settings() -> Settings:
    """Settings from the environment, or exit with a message naming the bad setting."""
    try:
        return Settings.from_env()
    except ConfigError as exc:
        print(f"notifier: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def configure_logging(settings: Settings) -> None:
    """One line per event on stderr, at the configured level: JSON, or text (LOG_FORMAT=text)."""
    logs.configure(settings.log_level, settings.log_format)


def warn_about_unsubscribe_links(settings: Settings) -> None:
    """Say so at start when SECRET_KEY is unset: the API checks and the worker signs unsubscribe links
    with it, and the development secret is in this repository, so whoever reads it can sign a link
    that turns any category off for any user of any key, and the API takes it as genuine. And when
    PUBLIC_BASE_URL is plain http on an address others reach: mail clients offer one-click unsubscribe
    (RFC 8058, List-Unsubscribe-Post) only for an https link, so no inbox shows its button."""
    if not settings.secret_key:
        logging.getLogger("notifier").warning(
            "SECRET_KEY is not set: unsubscribe links are signed with the public development secret, so "
            "anyone can forge one; set SECRET_KEY outside development")
    base = urlsplit(settings.public_base_url)
    if base.scheme == "http" and not _loopback(base.hostname or ""):
        logging.getLogger("notifier").warning(
            "PUBLIC_BASE_URL is http, not https: mail clients offer one-click unsubscribe (RFC 8058) only for "
            "an https link, and the link travels in the clear")


def warn_about_smtp_login(settings: Settings) -> None:
    """Say so at start when the worker's login would cross the network in the clear: SMTP_USERNAME set,
    SMTP_SECURITY none and SMTP_HOST another machine. smtplib sends AUTH over whatever connection there
    is, so SMTP_PASSWORD (base64, not hidden) went to anyone on the way without a word."""
    if settings.smtp_username and settings.smtp_security == "none" and not _loopback(settings.smtp_host):
        logging.getLogger("notifier").warning(
            "SMTP_USERNAME is set with SMTP_SECURITY=none: SMTP_PASSWORD goes to %s in the clear; set "
            "SMTP_SECURITY to starttls or ssl", settings.smtp_host)


def warn_about_templates(settings: Settings) -> None:
    """Say so at start when TEMPLATES_DIR lacks a template notifier sends on its own (a folder of an
    operator's templates alone: every digest failed into the dead-letter queue with its items, and an
    event or send-verification was a 422), or TEMPLATE_CATEGORIES names one it does not hold (a typo
    leaves that template `product`)."""
    renderer = make_renderer(settings)
    needed = {DIGEST_TEMPLATE: "every digest"}
    for event, notifies in RULES.items():
        for notify in notifies:
            needed.setdefault(notify.template, f"the event {event}")
    needed["verification"] = "send-verification"
    missing = [f"{name} ({use})" for name, use in needed.items() if not renderer.exists(name)]
    if missing:
        logging.getLogger("notifier").warning(
            "%s lacks templates notifier sends itself, which fail without them: %s; copy them from "
            "templates/email/", templates_dir(settings), ", ".join(missing))
    unknown = [name for name, _ in settings.template_categories if not renderer.exists(name)]
    if unknown:
        logging.getLogger("notifier").warning("TEMPLATE_CATEGORIES names templates %s does not hold: %s",
                                              templates_dir(settings), ", ".join(unknown))


def warn_about_redis_eviction(connection) -> None:
    """Say so when Redis may delete keys to make room (any maxmemory-policy but noeviction), read from
    INFO, which managed Redis services answer where they refuse CONFIG; nothing when it cannot be read."""
    try:
        policy = connection.info("memory").get("maxmemory_policy", "noeviction")
    except RedisError:
        return
    if policy != "noeviction":
        # An evicted queue or job hash only waits for the reconciler; an evicted sent receipt or live
        # worker's key lets it send an email again that a worker had sent or was sending.
        logging.getLogger("notifier").warning(
            "Redis's maxmemory-policy is %s: once it fills, Redis deletes queued jobs (the reconciler queues "
            "them again, up to RECONCILE_INTERVAL late), sent receipts and the keys showing a worker alive (an "
            "email may then be sent twice); set maxmemory-policy noeviction", policy)


def _loopback(host: str) -> bool:
    """Whether host is this machine (development, where nobody else follows the links)."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def open_database(settings: Settings, wait: bool = False):
    """Bind the database proxy and bring the schema up to date. wait: for a long-running process,
    which waits for a PostgreSQL server that does not answer yet (a deploy starting it with the
    database, a database restarting) instead of exiting with a traceback; a command fails at once
    instead. A SQLite file that cannot be opened is a mistake to say at once, not an outage."""
    db = bind(settings.database_url, settings.database_pool_size, settings.database_prepare,
                settings.database_statement_timeout, settings.database_connect_timeout)
    if not wait or not is_postgres(db):
        schema.upgrade(db)
    elif not resilience.wait_until(lambda: schema.upgrade(db), UNAVAILABLE_ERRORS, "the database"):
        raise SystemExit(0)  # asked to stop while it waited
    return db


def wait_for_database(settings: Settings) -> None:
    """open_database(settings, wait=True) in a process that forks those that use it (gunicorn's
    master): no connection of its own stays open for them to inherit."""
    db = open_database(settings, wait=True)
    getattr(db, "close_all", db.close)()  # a pool's connections, or SQLite's one


def templates_dir(settings: Settings) -> str:
    return settings.templates_dir or DEFAULT_TEMPLATES_DIR


def make_renderer(settings: Settings):
    from notifier.rendering import Renderer

    return Renderer(templates_dir(settings), brand_name=settings.brand_name)


def _glibc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to give back this way
        return None


_MALLOC_TRIM = _glibc_trim() if sys.platform.startswith("linux") else None


def release_free_memory() -> None:
    """Hand memory the process has freed back to the system (glibc's malloc_trim).

    A large request (a 1,000-item batch) leaves the heap at its high-water mark after everything in
    it was freed, and glibc keeps that memory; trimming after such a request keeps an API worker's
    resident size where it was before."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def build_deliverer(settings: Settings, mailer=None, redis=None, counts=None, wait: bool = False, stop=None,
                    outage=None):
    """A Deliverer wired to the configured database, Redis, SMTP server and templates (counts, stop,
    outage: see Deliverer; wait: see open_database)."""
    from notifier.jobs import Deliverer
    from notifier.mail import make_mailer
    from notifier.queues import connect_redis

    open_database(settings, wait=wait)
    return Deliverer(
        settings, mailer or make_mailer(settings), make_renderer(settings), redis or connect_redis(settings.redis_url),
        counts, stop, outage,
    )
