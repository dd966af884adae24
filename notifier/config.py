"""Settings, read once from the environment, with every default in one place."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import getaddresses, parseaddr
from ipaddress import IPv4Network, IPv6Network, ip_network
from urllib.parse import urlparse

from notifier.errors import ConfigError

SMTP_SECURITY_MODES = ("none", "starttls", "ssl")
DEFAULT_RETRY_INTERVALS = (60, 300, 900, 1800, 3600)
DEFAULT_CALLBACK_RETRY_INTERVALS = (10, 60, 300, 1800)
# Where status callbacks never connect: link-local (cloud metadata at 169.254.169.254, and AWS's IPv6 one),
# Alibaba's metadata address, link-local reached through a NAT64 gateway (64:ff9b::169.254.0.0),
# and the unspecified addresses (a connection to 0.0.0.0 reaches this machine). Private ranges and
# loopback stay allowed: notifier runs beside its callers' own backends.
DEFAULT_CALLBACK_DENY_NETWORKS = ("169.254.0.0/16,fe80::/10,0.0.0.0/8,::/128,fd00:ec2::254/128,100.100.100.200/32,"
                                  "64:ff9b::a9fe:0/112")
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
# Signs unsubscribe links when SECRET_KEY is unset; fine on a laptop, forgeable anywhere else.
INSECURE_DEVELOPMENT_SECRET = "notifier-development-secret-do-not-use-in-production"


@dataclass(frozen=True)
class Settings:
    """Everything a process needs to know about its surroundings."""

    database_url: str = "sqlite:///var/notifier.db"
    database_pool_size: int = 16  # 0: no limit, as peewee's pool takes it
    # PostgreSQL connections prepare the statements run per request and per email (notifier.db).
    # Off behind a pooler that shares server sessions between clients (PgBouncer in transaction mode).
    database_prepare: bool = True
    # How long one PostgreSQL statement may run (lock waits included) before the server cancels it: a
    # request then answers 503 and a job fails into its retry, instead of holding a thread or a worker
    # for as long as a stuck lock lasts. Schema upgrades run without it. 0: no limit is sent (PgBouncer
    # refuses a connection that asks for one, unless told to ignore it; and does not apply it).
    database_statement_timeout: float = 30.0
    # How long a process waits to make a PostgreSQL connection, and for a server that went silent
    # mid-statement to take a new one (notifier.patience.Patience): past it the database is unavailable (a
    # request answers 503, a job is retried), as a stalled server sends no error of its own.
    database_connect_timeout: float = 2.0
    redis_url: str = "redis://127.0.0.1:6379/0"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 1025
    smtp_username: str = ""
    smtp_password: str = field(default="", repr=False)
    smtp_security: str = "none"
    # The certificates a TLS server's is checked against (PEM): empty, the system's store. A relay with
    # a certificate of a private CA, or a self-signed one, is trusted by naming it here.
    smtp_ca_file: str = ""
    smtp_timeout: float = 30.0
    # The name this host gives in EHLO/HELO; empty: smtplib's, the machine's fully qualified name.
    smtp_helo_name: str = ""
    mail_from: str = "notifier@localhost"
    reply_to: str = ""  # where replies go, when not to MAIL_FROM (often a no-reply address)
    retry_intervals: tuple[int, ...] = DEFAULT_RETRY_INTERVALS
    port: int = 5000
    max_body_bytes: int = 256 * 1024
    # Seconds gunicorn's worker waits on a client that stalls mid-request or leaves its answer unread.
    client_timeout: float = 10.0
    page_size_max: int = 100
    job_timeout: int = 120
    # How long RQ keeps a job that finished (its hash and result stream: about 6 KB of Redis each),
    # for rq-dashboard's Finished list. PostgreSQL holds every notification's outcome; at an hour, a
    # sustained 300 emails/s kept over a million of them, 6 GB. Failed jobs keep their own TTL.
    finished_job_ttl: int = 60
    # How long RQ's failed registries (the dead-letter queue) keep a failed job: about 6 KB of Redis
    # each, and a bounce is a failure. The failed notification stays in PostgreSQL, requeueable.
    dead_letter_ttl_days: int = 30
    idempotency_ttl_days: int = 7
    # Days a notification is kept after it ended (notifier.retention); 0 keeps every one forever.
    retention_days: int = 0
    verification_ttl_seconds: int = 3600
    schedule_horizon_days: int = 90
    reconcile_interval: int = 30
    reconcile_grace_seconds: int = 30
    sending_timeout: int = 300
    callback_timeout: float = 5.0
    callback_retry_intervals: tuple[int, ...] = DEFAULT_CALLBACK_RETRY_INTERVALS
    callback_deny_networks: tuple[IPv4Network | IPv6Network, ...] = field(
        default_factory=lambda: _networks({}, "CALLBACK_DENY_NETWORKS", DEFAULT_CALLBACK_DENY_NETWORKS))
    secret_key: str = field(default="", repr=False)
    # Keys SECRET_KEY was before: links they made still verify, new ones use SECRET_KEY alone.
    secret_key_fallbacks: tuple[str, ...] = field(default=(), repr=False)
    # HTTP basic auth for /rq (the RQ dashboard) and /metrics; while either is empty nobody gets in.
    operator_username: str = ""
    operator_password: str = field(default="", repr=False)
    # Failed operator logins allowed per client address; past it, that address gets 429 until the
    # window moves on, right password or not. Empty: no limit.
    operator_auth_limit: str = "10/minute"
    # How many reverse proxies in front set X-Forwarded-For/-Proto; 0 trusts neither header.
    proxy_hops: int = 0
    public_base_url: str = "http://127.0.0.1:5000"
    digest_time: str = "08:00"
    digest_weekday: int = 0  # Monday
    digest_grace_seconds: int = 60
    # A digest lists at most this many of its items, then says how many more it took: a week of held
    # mail with no recipient cap would otherwise make one message too big for any mail server.
    digest_max_items: int = 100
    welcome_delay_seconds: int = 600
    rate_limit: str = "100/second"
    batch_max: int = 1000
    # A batch's notifications go to the workers this many to a job; small enough that a high-priority
    # email never waits long behind a chunk of low ones.
    batch_job_size: int = 25
    recipient_cap: str = "20/hour"
    templates_dir: str = ""
    # TEMPLATE_CATEGORIES: (template, category) of each template given one there, over rules.TEMPLATE_CATEGORIES.
    template_categories: tuple[tuple[str, str], ...] = ()
    brand_name: str = "notifier"
    log_level: str = "INFO"
    log_format: str = "json"  # or "text", for people reading a terminal

    @property
    def max_attempts(self) -> int:
        """The first attempt plus one per retry interval."""
        return 1 + len(self.retry_intervals)

    @property
    def signing_key(self) -> str:
        """What signs unsubscribe links."""
        return self.secret_key or INSECURE_DEVELOPMENT_SECRET

    @property
    def verifying_keys(self) -> tuple[str, ...]:
        """What an unsubscribe link may have been signed with: the signing key, then the ones before it."""
        return (self.signing_key, *(key for key in self.secret_key_fallbacks if key != self.signing_key))

    @property
    def max_callback_attempts(self) -> int:
        return 1 + len(self.callback_retry_intervals)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from environment variables; raise ConfigError naming the bad one."""
        env = os.environ if environ is None else environ
        defaults = cls()
        operator_username, operator_password = _operator_credentials(env)
        settings = cls(
            database_url=_database_url(env.get("DATABASE_URL", defaults.database_url)),
            database_pool_size=_int(env, "DATABASE_POOL_SIZE", defaults.database_pool_size, 0, 1000),
            database_prepare=_choice(env, "DATABASE_PREPARE", "on", ("on", "off")) == "on",
            database_statement_timeout=_float(env, "DATABASE_STATEMENT_TIMEOUT", defaults.database_statement_timeout,
                                              86400, zero=True),
            database_connect_timeout=_float(env, "DATABASE_CONNECT_TIMEOUT", defaults.database_connect_timeout, 600),
            redis_url=_redis_url(env.get("REDIS_URL", defaults.redis_url)),
            smtp_host=env.get("SMTP_HOST", defaults.smtp_host).strip() or defaults.smtp_host,
            smtp_port=_int(env, "SMTP_PORT", defaults.smtp_port, 1, 65535),
            smtp_username=env.get("SMTP_USERNAME", ""),
            smtp_password=_password(env),
            smtp_security=_choice(env, "SMTP_SECURITY", defaults.smtp_security, SMTP_SECURITY_MODES),
            smtp_ca_file=_ca_file(env.get("SMTP_CA_FILE", "").strip()),
            smtp_timeout=_float(env, "SMTP_TIMEOUT", defaults.smtp_timeout, 3600),
            smtp_helo_name=_helo_name(env.get("SMTP_HELO_NAME", "").strip()),
            mail_from=_mail_from(env.get("MAIL_FROM", defaults.mail_from)),
            reply_to=_mail_from(env["REPLY_TO"], "REPLY_TO") if env.get("REPLY_TO", "").strip() else "",
            retry_intervals=_intervals(env, "RETRY_INTERVALS", DEFAULT_RETRY_INTERVALS),
            idempotency_ttl_days=_int(env, "IDEMPOTENCY_TTL_DAYS", defaults.idempotency_ttl_days, 1, 3650),
            retention_days=_int(env, "RETENTION_DAYS", defaults.retention_days, 0, 36500),
            verification_ttl_seconds=_int(env, "VERIFICATION_TTL_SECONDS", defaults.verification_ttl_seconds, 1,
                                          30 * 86400),
            schedule_horizon_days=_int(env, "SCHEDULE_HORIZON_DAYS", defaults.schedule_horizon_days, 1, 3650),
            reconcile_interval=_int(env, "RECONCILE_INTERVAL", defaults.reconcile_interval, 1, 3600),
            reconcile_grace_seconds=_int(env, "RECONCILE_GRACE_SECONDS", defaults.reconcile_grace_seconds, 0, 3600),
            sending_timeout=_int(env, "SENDING_TIMEOUT", defaults.sending_timeout, 1, 86400),
            callback_timeout=_float(env, "CALLBACK_TIMEOUT", defaults.callback_timeout, 3600),
            callback_retry_intervals=_intervals(env, "CALLBACK_RETRY_INTERVALS", DEFAULT_CALLBACK_RETRY_INTERVALS),
            callback_deny_networks=_networks(env, "CALLBACK_DENY_NETWORKS", DEFAULT_CALLBACK_DENY_NETWORKS),
            port=_int(env, "PORT", defaults.port, 1, 65535),
            max_body_bytes=_int(env, "MAX_BODY_BYTES", defaults.max_body_bytes, 1024, 64 * 1024 * 1024),
            client_timeout=_float(env, "CLIENT_TIMEOUT", defaults.client_timeout, 3600),
            page_size_max=_int(env, "PAGE_SIZE_MAX", defaults.page_size_max, 1, 1000),
            job_timeout=_int(env, "JOB_TIMEOUT", defaults.job_timeout, 1, 3600),
            finished_job_ttl=_int(env, "FINISHED_JOB_TTL", defaults.finished_job_ttl, 0, 7 * 86400),
            dead_letter_ttl_days=_int(env, "DEAD_LETTER_TTL_DAYS", defaults.dead_letter_ttl_days, 1, 3650),
            secret_key=env.get("SECRET_KEY", ""),
            secret_key_fallbacks=tuple(key for key in (part.strip() for part in env.get(
                "SECRET_KEY_FALLBACKS", "").split(",")) if key),
            operator_username=operator_username,
            operator_password=operator_password,
            operator_auth_limit=_rate(env, "OPERATOR_AUTH_LIMIT", defaults.operator_auth_limit, allow_empty=True),
            proxy_hops=_int(env, "PROXY_HOPS", defaults.proxy_hops, 0, 10),
            public_base_url=_base_url(env.get("PUBLIC_BASE_URL", defaults.public_base_url)),
            digest_time=_clock(env, "DIGEST_TIME", defaults.digest_time),
            digest_weekday=WEEKDAYS.index(_choice(env, "DIGEST_WEEKDAY", "monday", WEEKDAYS)),
            digest_grace_seconds=_int(env, "DIGEST_GRACE_SECONDS", defaults.digest_grace_seconds, 0, 3600),
            digest_max_items=_int(env, "DIGEST_MAX_ITEMS", defaults.digest_max_items, 1, 1000),
            welcome_delay_seconds=_int(env, "WELCOME_DELAY_SECONDS", defaults.welcome_delay_seconds, 0, 30 * 86400),
            rate_limit=_rate(env, "RATE_LIMIT", defaults.rate_limit, allow_empty=False),
            batch_max=_int(env, "BATCH_MAX", defaults.batch_max, 1, 10000),
            batch_job_size=_int(env, "BATCH_JOB_SIZE", defaults.batch_job_size, 1, 1000),
            recipient_cap=_rate(env, "RECIPIENT_CAP", defaults.recipient_cap, allow_empty=True),
            templates_dir=_templates_dir(env.get("TEMPLATES_DIR", defaults.templates_dir)),
            template_categories=_template_categories(env.get("TEMPLATE_CATEGORIES", "")),
            brand_name=env.get("BRAND_NAME", defaults.brand_name).strip() or defaults.brand_name,
            log_level=_choice(env, "LOG_LEVEL", defaults.log_level, ("DEBUG", "INFO", "WARNING", "ERROR")),
            log_format=_choice(env, "LOG_FORMAT", defaults.log_format, ("json", "text")),
        )
        if settings.welcome_delay_seconds > settings.schedule_horizon_days * 86400:
            # Every signup was then a 422 naming a delay_seconds the caller never sent.
            days = settings.schedule_horizon_days
            raise ConfigError("WELCOME_DELAY_SECONDS", f"must be within SCHEDULE_HORIZON_DAYS "
                                                       f"({days} day{'' if days == 1 else 's'})")
        return settings


def _networks(env: Mapping[str, str], name: str, default: str) -> tuple[IPv4Network | IPv6Network, ...]:
    """A comma-separated list of networks (CIDR, or one address); empty: none."""
    raw = env.get(name, default)
    networks = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        try:
            networks.append(ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(name, f"must be comma-separated networks like 169.254.0.0/16 or fe80::/10, "
                                    f"got {_quoted(item)}") from None
    return tuple(networks)


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"must be a whole number, got {_quoted(raw)}") from None
    if not low <= value <= high:
        raise ConfigError(name, f"must be between {low} and {high}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, high: float, zero: bool = False) -> float:
    """zero: 0 is allowed too (it turns the limit off)."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"must be a number, got {_quoted(raw)}") from None
    if zero and value == 0:
        return 0.0
    # float() also takes "nan", "inf" and "1e400": as a socket timeout each fails every send.
    if not 0 < value <= high:
        lowest = "0 (off), or above 0" if zero else "above 0"
        raise ConfigError(name, f"must be a number of seconds {lowest} and at most {high:g}, got {_quoted(raw)}")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    value = raw.upper() if choices[0].isupper() else raw.lower()
    if value not in choices:
        raise ConfigError(name, f"must be one of {', '.join(choices)}, got {_quoted(raw)}")
    return value


def _intervals(env: Mapping[str, str], name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    raw = env.get(name)
    if raw is None:
        return default
    if raw.strip() == "":
        return ()
    try:
        values = tuple(int(part) for part in raw.split(","))
    except ValueError:
        raise ConfigError(name, f"must be comma-separated whole seconds, got {_quoted(raw)}") from None
    if any(v < 0 for v in values):
        raise ConfigError(name, "intervals cannot be negative")
    return values


def _database_url(raw: str) -> str:
    scheme = urlparse(raw).scheme
    if scheme not in ("sqlite", "postgres", "postgresql"):
        raise ConfigError("DATABASE_URL", f"must start with sqlite:// or postgresql://, got scheme {scheme!r}")
    if scheme == "sqlite":
        return raw
    # Read as libpq reads it (notifier.db does the same), so that what it allows works: several hosts
    # (host1:5432,host2:5432 with ?target_session_attrs=read-write), a percent-encoded user or password,
    # libpq's query parameters. Imported here, where the URL is PostgreSQL's.
    from psycopg2 import ProgrammingError
    from psycopg2.extensions import parse_dsn

    hint = "percent-encode any / # ? @ or : in its user name and password"
    try:
        params = parse_dsn(raw)
    except ProgrammingError as exc:
        # libpq names the parameter, which may be the password's end ("u:pw/x?secret=1@db"): only
        # peewee's own, which its db_url took and libpq does not, are named.
        unknown = str(exc).partition("invalid URI query parameter: ")[2].strip().strip('"')
        reason = (f"has {unknown}, a parameter of peewee's, not libpq's (DATABASE_POOL_SIZE sets the pool)"
                  if unknown in _PEEWEE_URL_PARAMETERS else "has a query parameter libpq does not know"
                  if unknown else "is not a URL libpq reads")
        raise ConfigError("DATABASE_URL", f"{reason}; {hint}") from None
    # libpq checks these only as it connects. An unescaped "/", "#" or "?" in the password ends the
    # host part early, leaving the password's start where the port goes; libpq ends the user part at
    # the first "@", where urllib (and peewee) took the last, leaving the password's end in the host:
    # never quote either.
    if not all(re.fullmatch(r"[0-9]{1,5}", port) and 0 < int(port) < 65536
               for port in params.get("port", "5432").split(",") if port):
        raise ConfigError("DATABASE_URL", f"has a port that is not a number; {hint}")
    if "@" in params.get("host", ""):
        raise ConfigError("DATABASE_URL", f"has an @ in its host; {hint}")
    if not params.get("dbname"):
        raise ConfigError("DATABASE_URL", "names no database: postgresql://user@host:5432/dbname")
    # The URL's connect_timeout replaces DATABASE_CONNECT_TIMEOUT, within the same bounds: libpq's 0
    # (wait for ever) would leave a stalled server's wait with no end.
    timeout = params.get("connect_timeout")
    if timeout is not None and not (re.fullmatch(r"[0-9]{1,3}", timeout) and 0 < int(timeout) <= 600):
        raise ConfigError("DATABASE_URL", "has a connect_timeout that is not whole seconds from 1 to 600")
    return raw


# What peewee's db_url took from a URL's query string for itself, and libpq refuses.
_PEEWEE_URL_PARAMETERS = frozenset({"max_connections", "stale_timeout", "timeout", "autoconnect", "autorollback",
                                    "thread_safe", "register_unicode", "server_side_cursors", "isolation_level"})


def _redis_url(raw: str) -> str:
    if urlparse(raw).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError("REDIS_URL", "must start with redis://, rediss:// or unix://")
    return _readable_port("REDIS_URL", raw)


def _readable_port(name: str, raw: str) -> str:
    # An unescaped "/", "#" or "?" in the password ends the host part early, and what came before it
    # is read as the port: the client's ValueError then quoted the password at start. Never quote it.
    try:
        _ = urlparse(raw).port
    except ValueError:
        raise ConfigError(name, "has a port that is not a number; percent-encode any / # ? @ or : in its "
                                "user name and password") from None
    return raw


def _mail_from(raw: str, name: str = "MAIL_FROM") -> str:
    # "Acme <no-reply@acme.test>" and a bare address are both fine; the address part must be whole, and
    # one: parseaddr took the first of "a@x.example, b@y.example" and dropped the rest without a word.
    address = parseaddr(raw)[1]
    local, _, domain = address.rpartition("@")
    if (not local or not domain or any(c in raw for c in "\r\n") or any(c.isspace() for c in address)
            or len(getaddresses([raw])) != 1):
        raise ConfigError(name, f"must be one email address, got {_quoted(raw)}")
    if not address.isascii():
        # MAIL_FROM's address goes into MAIL FROM, the From header and every Message-ID, none of which
        # carries it without SMTPUTF8: every email would fail (a Reply-To header neither). The display
        # name may be anything.
        raise ConfigError(name, f"must be an ASCII address (write an international domain in its xn-- "
                                f"form), got {_quoted(raw)}")
    return raw


# A domain name, or an address literal ("[192.0.2.1]", "[IPv6:2001:db8::1]"), as RFC 5321 has EHLO
# name the client: nothing that could end the command line early.
_HELO_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[(?:IPv6:)?[0-9A-Fa-f:.]+\]")


def _helo_name(name: str) -> str:
    if name and not _HELO_NAME.fullmatch(name):
        raise ConfigError("SMTP_HELO_NAME", f"must be a host name such as mail.example.com, or an address literal "
                                            f"such as [192.0.2.1], got {name!r}")
    return name


def _ca_file(path: str) -> str:
    if not path:
        return ""
    import ssl

    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("SMTP_CA_FILE", f"must be a readable file of PEM certificates, got {path!r} "
                                          f"({type(exc).__name__})") from None
    return path


def _templates_dir(path: str) -> str:
    # Wrong, every template send was a 422 "no template named ..." with an empty list of known ones.
    if path and not os.path.isdir(os.path.join(path, "email")):
        hint = " (name the folder that holds email/, not email/ itself)" if os.path.basename(
            os.path.normpath(path)) == "email" else ""
        raise ConfigError("TEMPLATES_DIR", f"must be a folder holding an email/ folder of templates{hint}, "
                                           f"got {path!r}")
    return path


def _template_categories(raw: str) -> tuple[tuple[str, str], ...]:
    """Each template's category, from pairs like "invoice=transactional, news=marketing": for
    templates of an operator's own, which are otherwise `product`, or to move a shipped one."""
    # Imported here: notifier.models imports notifier.db, which imports this module.
    from notifier.models import DIGEST_TEMPLATE, Category
    from notifier.rendering import TEMPLATE_NAME

    categories = [c.value for c in Category]
    pairs: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, sep, category = (side.strip() for side in item.partition("="))
        if not sep or not TEMPLATE_NAME.match(name) or category not in categories:
            raise ConfigError("TEMPLATE_CATEGORIES", f"must be comma-separated TEMPLATE=CATEGORY pairs, each "
                                                     f"category one of {', '.join(categories)}, got {_quoted(item)}")
        if name == DIGEST_TEMPLATE or name in pairs:
            # A digest holds mail of every category: consent decides per item, never by the digest's.
            raise ConfigError("TEMPLATE_CATEGORIES", f"names {name!r} twice" if name != DIGEST_TEMPLATE else
                              "cannot name the digest, whose items keep their own categories")
        pairs[name] = category
    return tuple(pairs.items())


def _password(env: Mapping[str, str]) -> str:
    password = env.get("SMTP_PASSWORD", "")
    # yagmail would otherwise fall back to the keyring or a terminal prompt and hang the worker.
    if env.get("SMTP_USERNAME") and not password:
        raise ConfigError("SMTP_PASSWORD", "is required when SMTP_USERNAME is set")
    return password


def _operator_credentials(env: Mapping[str, str]) -> tuple[str, str]:
    username, password = env.get("OPERATOR_USERNAME", "").strip(), env.get("OPERATOR_PASSWORD", "")
    if ":" in username:
        raise ConfigError("OPERATOR_USERNAME", "cannot contain ':' (basic auth separates name and password with it)")
    # Half a pair would lock everyone out while looking configured: say so at start instead.
    if username and not password:
        raise ConfigError("OPERATOR_PASSWORD", "is required when OPERATOR_USERNAME is set")
    if password and not username:
        raise ConfigError("OPERATOR_USERNAME", "is required when OPERATOR_PASSWORD is set")
    return username, password


def parse_clock(raw: str) -> tuple[int, int] | None:
    """(hour, minute) of an "HH:MM" string, or None when it is not one."""
    parts = raw.strip().split(":")
    # ASCII digits only: isdigit() also takes superscripts (which int() refuses) and other scripts' digits.
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
        return None
    hour, minute = int(parts[0]), int(parts[1])
    return (hour, minute) if 0 <= hour < 24 and 0 <= minute < 60 else None


def clock_text(clock: tuple[int, int]) -> str:
    """(hour, minute) as "HH:MM", the one form times of day are compared and shown in."""
    return f"{clock[0]:02d}:{clock[1]:02d}"


def _clock(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip() or default
    clock = parse_clock(raw)
    if clock is None:
        raise ConfigError(name, f"must be a time of day like 08:00, got {_quoted(raw)}")
    return clock_text(clock)  # 8:00 as 08:00


# Where a value quoted in an error stops: a line break, or what reads as the next setting. An env file
# or a compose entry with a quote left open runs the settings after it into this one's value, and the
# error would print them, SMTP_PASSWORD's too.
_RUN_ON = re.compile(r"[\r\n\v\f]|\s+(?:export\s+)?[A-Za-z_][A-Za-z0-9_]*=")
_SHOWN_CHARS = 100


def _quoted(raw: str) -> str:
    """raw quoted for an error, up to what may be other settings run into it, and at most _SHOWN_CHARS."""
    end = min(len(raw), _SHOWN_CHARS, *(match.start() for match in [_RUN_ON.search(raw)] if match))
    return repr(raw[:end]) + (f" (and {len(raw) - end} more characters, not shown)" if end < len(raw) else "")


def _shown_url(raw: str) -> str:
    """raw quoted for an error, with all that stands between the scheme and its last @ (a user and a
    password, even one holding an unescaped / ? # or @) as ***."""
    before, at, after = raw.rpartition("@")
    if not at:
        return repr(raw)
    scheme, sep, _ = before.partition("://")
    return repr(f"{scheme}{sep}***@{after}" if sep else f"***@{after}")


def _base_url(raw: str) -> str:
    parsed = urlparse(raw)
    got = _shown_url(raw)  # a URL refused for another reason may hold a password too: never quote it
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError("PUBLIC_BASE_URL", f"must be an http(s) URL, got {got}")
    if not raw.isascii() or any(c.isspace() or not c.isprintable() or c in '<>"' for c in raw):
        # It goes into every List-Unsubscribe header, which carries a URL as it is or not at all.
        raise ConfigError("PUBLIC_BASE_URL", f"must be written in ASCII, without spaces (an international domain "
                                             f"in its xn-- form, the rest percent-encoded), got {got}")
    if parsed.query or parsed.fragment or raw.endswith(("?", "#")) or parsed.params:
        # Links are made by appending a path: "https://x/?a=1" gave https://x/?a=1/unsubscribe/<token>.
        raise ConfigError("PUBLIC_BASE_URL", f"must be the URL links begin with, without ?query, ;params or "
                                             f"#fragment, got {got}")
    try:
        parsed.port  # noqa: B018 - read to check it: out of range or not a number raises
    except ValueError:
        raise ConfigError("PUBLIC_BASE_URL", f"has a port that is not one (1-65535), got {got}") from None
    if parsed.username is not None or parsed.password is not None:
        # Not quoted: what stands before the @ may be a password.
        raise ConfigError("PUBLIC_BASE_URL", "must not hold a user or password: every email would show it")
    if parsed.port == 0:
        raise ConfigError("PUBLIC_BASE_URL", f"has a port that is not one (1-65535), got {got}")
    return raw.rstrip("/")


def _rate(env: Mapping[str, str], name: str, default: str, allow_empty: bool) -> str:
    raw = env.get(name)
    if raw is None:
        return default
    raw = raw.strip()
    if not raw and allow_empty:
        return ""  # no cap
    from notifier.ratelimit import check_rate

    try:
        check_rate(raw)
    except ValueError:
        raise ConfigError(name, f"must be one rate of 1 to 10^12 per a period of at most 1,000 years, like "
                                f"100/second or 20/hour, got {_quoted(raw)}") from None
    return raw
