"""Logging for every process: one JSON object per line on stderr (or readable text), ids bound from
context, and nothing in a line that must not be there (full addresses, API keys, secrets)."""

from __future__ import annotations

import contextvars
import json
import logging
import numbers
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime

from notifier.errors import STOPPING
from notifier.redact import mask_address

FORMATS = ("json", "text")

# What the current request or job is about; every line logged meanwhile carries it.
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
notification_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("notification_id", default=None)
_CONTEXT = {"request_id": request_id, "notification_id": notification_id}


@contextmanager
def bound(**ids: str | None) -> Iterator[None]:
    """Within the block, every log line carries these ids: `with bound(notification_id=nid): ...`."""
    tokens = [(_CONTEXT[name], _CONTEXT[name].set(value)) for name, value in ids.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


# --- redaction -------------------------------------------------------------------------------------

# A local part this short is masked only within its whole address: alone it matches ordinary words.
_SHORTEST_CONCEALED_LOCAL_PART = 3
# Shorter texts of an email ("Hi", "Al") are not looked for in what a mail server wrote.
_SHORTEST_CONCEALED_CONTENT = 4
CONTENT_MASK = "[content]"
# The line a formatted traceback's frames follow: the indented lines after it are code (file, source,
# ^ markers), the first line that is not indented the exception's own text.
_TRACEBACK = "Traceback (most recent call last):"


class _Concealed:
    """The recipients of the job running now, each masked in every form a mail server may echo it: the
    address with characters the address pattern stops at ("=", "/"), in any case, everywhere; and the
    mailbox alone, which may be an ordinary word ("notification", "sent", "default"), only in text a
    mail server may have written (echo())."""

    def __init__(self):
        self.masks: dict[str, str] = {}
        # Those of the masks' forms masked only where a mail server's words may be: a mailbox alone,
        # and the email's own content (set_content()).
        self.mailboxes: set[str] = set()
        self._content: set[str] = set()
        self._patterns: dict[tuple[str, ...], re.Pattern] = {}

    def add(self, address: str) -> None:
        local = address.rpartition("@")[0]
        self.masks.setdefault(address.lower(), mask_address(address))
        if len(local) >= _SHORTEST_CONCEALED_LOCAL_PART and (local.lower() not in self.masks
                                                             or local.lower() in self._content):
            self._content.discard(local.lower())  # a recipient's now, kept when the email's content goes
            self.masks[local.lower()] = f"{local[:1]}***"
            self.mailboxes.add(local.lower())

    def set_content(self, texts: Iterable[str]) -> None:
        """The email being sent now: these texts of it replace the last email's (a mail server answers
        about the message in hand, and a shared job's thousand would slow every line)."""
        for form in self._content:
            del self.masks[form]
        self.mailboxes -= self._content
        # Not a bare address: the address pattern masks those in every line already, and one may be a
        # recipient's, whose masks must outlive this email's. A subject or line naming one is content.
        self._content = {form for t in texts if len(t) >= _SHORTEST_CONCEALED_CONTENT and not _bare_address(t)
                         for form in _content_forms(t)} - self.masks.keys()
        self.masks.update(dict.fromkeys(self._content, CONTENT_MASK))
        self.mailboxes |= self._content

    def present(self, text: str) -> list[str]:
        """The forms text holds, in any case: most lines hold none, and stop at this."""
        lowered = text.lower()
        return [form for form in self.masks if form in lowered]

    def sub(self, text: str, forms: list[str]) -> str:
        """text with these forms masked (those present() found in it, or some of them)."""
        if not forms:
            return text
        present = tuple(sorted(forms, key=len, reverse=True))
        # A pattern of the forms in the line, longest first: one of all of them, made again after each
        # new recipient, cost a shared job of 1,000 whose replies echo each address 25 ms an email.
        pattern = self._patterns.get(present)
        if pattern is None:
            alternatives = "|".join(_caseless(form) for form in present)
            # ASCII case only, as the forms and the masks' keys: beyond it "ſ" matches "s" but does not
            # lower to it, and its mask was not found (KeyError out of the caller's log call).
            pattern = self._patterns[present] = re.compile(rf"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])",
                                                           re.IGNORECASE | re.ASCII)
        # A content form's other cases beyond ASCII (_caseless) may lower to something else ("Σ" at a
        # word's end): its mask is [content] whatever its case.
        return pattern.sub(lambda match: self.masks.get(match.group().lower(), CONTENT_MASK), text)

    def addresses(self, forms: list[str]) -> list[str]:
        """Those of forms masked everywhere: not a mailbox alone."""
        return [form for form in forms if form not in self.mailboxes]

    def echo(self, text: str) -> str:
        """text a mail server may have written, with every form masked; in a traceback, its code only
        with the addresses masked, as the code is ours or a library's, not the server's."""
        forms = self.present(text)
        if not forms or _TRACEBACK not in text:
            return self.sub(text, forms)
        addresses, code = self.addresses(forms), False
        lines = text.split("\n")
        for i, line in enumerate(lines):
            code = line == _TRACEBACK or (code and line.startswith(" "))
            lines[i] = self.sub(line, addresses if code else forms)
        return "\n".join(lines)


def _caseless(form: str) -> str:
    """A pattern of form (lower case) in any case: ASCII letters by the pattern's flag, which keeps "ſ"
    from matching "s"; a letter beyond it by its own upper and title case (an email's content, which
    a mail server may quote as written: "Élection", "Überweisung", "Подтвердите" lower to a form the
    ASCII flag alone never matched), "i̇" also as the "İ" it came from."""
    parts, i = [], 0
    while i < len(form):
        if form.startswith("i\u0307", i):
            parts.append("(?:i\u0307|\u0130)")
            i += 2
            continue
        ch = form[i]
        cases = {ch} if ch.isascii() else {ch, *(c for c in (ch.upper(), ch.title()) if len(c) == 1)}
        parts.append(re.escape(ch) if len(cases) == 1 else "[" + "".join(re.escape(c) for c in sorted(cases)) + "]")
        i += 1
    return "".join(parts)


def _bare_address(text: str) -> bool:
    """Whether an email's text is an address alone (no space in it: an address holds none)."""
    return "@" in text and not any(ch.isspace() for ch in text)


def _escaped(text: str) -> str:
    """text as it stands in a repr() of its UTF-8 bytes: smtplib's exceptions hold a reply as bytes,
    and a traceback (RQ's line for a failed job) shows "\\xc3\\xa9" for "é"."""
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text  # most texts: as they are
    return repr(text.encode("utf-8"))[2:-1]


def _content_forms(text: str) -> set[str]:
    """The forms of an email's text a mail server may quote: the text in any case and, where it differs
    (beyond ASCII, a backslash), as a bytes repr() shows it, as written or lower case (the "\\xNN" of
    "É" is not that of "é")."""
    forms = {text.lower()}
    if _escaped(text) != text:
        forms |= {_escaped(text).lower(), _escaped(text.lower()).lower()}
    return forms


class _Echoed:
    """An argument of a log call that may hold a mail server's words: formatted (%s, %r) with the job's
    recipients masked in every form."""

    __slots__ = ("value", "concealed")

    def __init__(self, value, concealed: _Concealed):
        self.value, self.concealed = value, concealed

    def __str__(self) -> str:
        return self.concealed.echo(_ANSI.sub("", str(self.value)))

    def __repr__(self) -> str:
        return self.concealed.echo(repr(self.value))


def _from_rq(record: logging.LogRecord) -> bool:
    return record.name.partition(".")[0] == "rq"


def _echoes(value, mailboxes: list[str], rq: bool) -> bool:
    """Whether an argument of a log call holds one of these mailboxes and may be a mail server's words."""
    # An exception's text is the mail server's words wherever it goes (RQ's failure line has it as a
    # traceback); RQ's other arguments are its own and the job's names (worker, queue, function, "Job
    # OK"), ours whatever the caller had (a refusal's text among them), but never a number.
    if isinstance(value, str):
        if rq and _TRACEBACK not in value:
            return False
    elif not isinstance(value, BaseException) and (rq or value is None or isinstance(value, numbers.Number)):
        return False
    lowered = str(value).lower()
    for form in mailboxes:
        if form in lowered:
            return True
    return False


def _conceal_message(concealed: _Concealed, record: logging.LogRecord, message: str) -> str:
    """message, the record's formatted, with the job's recipients masked: the address wherever it
    stands, the mailbox alone only in the call's arguments that may hold a mail server's words, not in
    the call's own (record.msg: "notification %s sent" for sent@)."""
    forms = concealed.present(message)
    if not forms:  # most lines
        return message
    mailboxes = [form for form in forms if form in concealed.mailboxes]
    if mailboxes and not isinstance(record.msg, str):  # an exception logged as the message: its text
        return concealed.echo(message)
    if mailboxes and record.args:
        rq, named = _from_rq(record), isinstance(record.args, Mapping)  # named: logger.info("%(x)s", {...})
        args = dict(record.args) if named else dict(enumerate(record.args))
        echoed = {k: _Echoed(v, concealed) for k, v in args.items() if _echoes(v, mailboxes, rq)}
        if echoed:
            args.update(echoed)
            try:
                message = _ANSI.sub("", record.msg % (args if named else tuple(args.values())))
            except STOPPING:
                raise  # RQ stopping the job as the line was made: the job's, not the line's
            except Exception:  # noqa: BLE001 - as getMessage() did: the whole line, then, as the server's
                return concealed.echo(message)
    return concealed.sub(message, concealed.addresses(forms))


_concealed: contextvars.ContextVar[_Concealed | None] = contextvars.ContextVar("concealed", default=None)


@contextmanager
def concealing() -> Iterator[None]:
    """Within the block, every address given to conceal_recipient() is masked in every line, in any form
    (its mailbox alone where a mail server's words may be: see conceal_recipient()).

    The worker opens one around each job, RQ's own line about the job's failure included."""
    token = _concealed.set(_Concealed())
    try:
        yield
    finally:
        _concealed.reset(token)


def conceal_recipient(address: str | None) -> None:
    """Mask address in every line until the concealing() block ends (none: no-op), and its mailbox alone
    where a mail server's words may be: in a log call's arguments and an exception's text, not in the
    call's own words, RQ's names (worker, queue, function) or a traceback's code."""
    concealed = _concealed.get()
    if concealed is not None and address and "@" in address:
        concealed.add(address)


def conceal_content(texts: Iterable[str]) -> None:
    """Mask these texts of the email being sent now (its subject, its template data) where a mail
    server's words may be, as a recipient's mailbox alone, until the next email's replace them: a
    refusal may quote the subject, a link or a code ("550 5.7.1 URL ... blocked"). Texts shorter
    than 4 characters are left; a server quoting some other part of a body is not caught."""
    concealed = _concealed.get()
    if concealed is not None:
        concealed.set_content(texts)


# Local parts may hold more than this, but "/" would swallow the path in front. "=" is in: forwarding
# and bounce addresses (SRS, VERP) hold another address before it; a "to=" in front goes with the rest.
# Each run of those characters is one match, its "@" and domain optional (_mask leaves a run without
# them as it is), so a line is scanned once: with the "@" required, a run not followed by one was tried
# again from each of its characters (a 20 KB line of "a=a=..." took seconds, 100 KB over a minute).
# The domain a name, or an address literal in brackets ([192.0.2.1], [IPv6:...]), which a send takes too.
# A quoted local part ("ada.lovelace"@example.com, which a send takes) counts its quotes in, as written
# or, in a raw request line, percent-encoded (%22).
_DOMAIN = r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[A-Za-z0-9:.]+\])"
# A quoted local part may hold what those runs stop at (a space, a comma, parentheses, an "@"):
# '"ada lovelace"@example.com' was logged as '"ada l***@example.com'. Tried first at a quote, whole,
# to its closing quote (as written, or %22 in a raw request line). Linear: the part between the
# quotes cannot run past a quote (nor past an escaped one, as none starts after a backslash), so each
# quote starts one short scan.
_QUOTED_LOCAL = r'(?:(?<!\\)"(?:[^"\\\r\n]|\\[^\r\n])*+"|%22(?:[^%\s]|%(?!22))*+%22)'
# It is one more element of the run, not an alternative to the run: a run started before the quote
# ('"ada lovelace"@example.com' as a repr, to="ada lovelace"@example.com) took the quote as one of its
# characters and stopped at the space, leaving '"ada l***@example.com'. Only with "@" after it: a
# quoted address ("ada@example.com") is a run of its own, masked as such.
_ADDRESS = re.compile(r"(?:" + _QUOTED_LOCAL + r"(?=@|%40)|[A-Za-z0-9.!#$&'*+=?^_`{|}~\"-]|%22)+"
                      r"(?P<domain>(?:@|%40)" + _DOMAIN + ")?")
# Wherever they start: with a word boundary wanted before them, a key run on from a word of the
# caller's own (an X-Request-ID "req_nfy_..."; "_" is a word character) was logged whole.
_API_KEY = re.compile(r"(nfy_[0-9a-f]+_)[A-Za-z0-9_-]+")
_SECRET = re.compile(r"(whsec_)[A-Za-z0-9_-]+")
# The credentials of an Authorization header (the operators' basic auth: base64 is not a mask) where a
# line quotes the header: gunicorn's refusal of a malformed one ("Invalid HTTP Header: 'Authorization
# Basic b3Bz...'", the colon forgotten) quotes the whole line. A known scheme, or a ":" or "=" after the
# name, must follow, so "authorization failed" stays as it is; after a ":" or "=", any scheme's name is
# passed over (one of the caller's own, "ApiKey", had only its name masked and the credentials logged).
# The name may follow an underscore: WSGI calls the header HTTP_AUTHORIZATION.
# Possessive, each run of blanks read once: with plain \s* around the optional quote, a line of
# "authorization:" and thousands of blanks took seconds, being tried every way of splitting them.
# Without the ":", in a quoted header line as gunicorn's refusal has it ('Authorization ApiKey s3cr3t',
# 'Authorization s3cr3t', Proxy-Authorization's alike), any scheme is passed over too: the quote before
# the name says it is the header.
# A blank is also a tab as repr() writes it, a backslash then "t": gunicorn quotes the refused line
# with %r, so a line of "Authorization", a tab and "Basic b3Bz..." was logged whole.
_BLANK = r"(?:\s|\\t)"
_SCHEME = r"(?:basic|bearer|digest|token|negotiate)" + _BLANK + "++"
_ANY_SCHEME = r"(?:[a-z0-9!#$%&*+.^_`|~-]++" + _BLANK + "++)?"  # RFC 9110's token, then the blank that ends it
# The credentials themselves: a token (Basic's, Bearer's), or a list of parameters as Digest's are
# (username="ops", response="6629..."), every one of them, quoted values whole: only the first token
# of a list was masked, and the response and the rest logged. RFC 7616's username*=UTF-8''..., blanks
# around "=" (RFC 9110's BWS), and a quote escaped, as JSON or a repr with both quotes writes it.
_PARAM = (r"""[a-z0-9_.*-]++\s*+=\s*+(?:"(?:[^"\\\r\n]|\\.)*+"?|\\"(?:[^"\\\r\n]|\\[^"\r\n])*+(?:\\")?"""
          r"""|[a-z0-9_-]++'[a-z0-9-]*+'[^\s'",;]*+|[^\s'",;]*+)""")
_CREDENTIALS = r"(?:" + _PARAM + r"(?:\s*+,\s*+" + _PARAM + r""")*+|[^\s'",;]+)"""
# A header as a pair in a repr ('("Authorization", "Basic b3Bz...")', a list of a request's headers):
# the name is quoted, then a comma, then the quoted value (bytes too: b'Basic b3Bz...').
_AUTHORIZATION = re.compile(r"((?<![a-z0-9])authorization\b['\"]?" + _BLANK + r"*+(?:[:=]\s*+['\"]?\s*+" + _ANY_SCHEME
                            + "|" + _SCHEME + r")|(?<=['\"])(?:proxy-)?authorization(?:" + _BLANK + "++"
                            + r"|['\"]\s*+,\s*+b?['\"]\s*+)" + _ANY_SCHEME + ")" + _CREDENTIALS, re.IGNORECASE)
# An unsubscribe link's token is the credential that unsubscribes (notifier.unsubscribe).
_UNSUBSCRIBE_TOKEN = re.compile(r"(/unsubscribe/)[A-Za-z0-9._~%+=-]+")
# From "://" on, whatever the scheme before it: matched from the scheme, a line of "a.a.a..." was tried
# from each of its words to its end, as above.
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s/]+@")
# PostgreSQL's DETAIL line quotes values: a NOT NULL violation the whole row (body and template data
# included), a unique or foreign key violation the key. The error's first line names the constraint.
_PG_DETAIL_VALUES = re.compile(r"^(DETAIL:\s+(?:Failing row contains |Key \(.*?\)=)).*$", re.MULTILINE)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _mask(match: re.Match) -> str:
    if match.group("domain") is None:
        return match.group(0)
    return mask_address(match.group(0).replace("%40", "@"))


def redact(text: str) -> str:
    """text with passwords in URLs, Authorization headers' credentials, unsubscribe tokens, API keys,
    callback secrets and email addresses masked; within a job, its recipients in every form, as in a
    mail server's words."""
    concealed = _concealed.get()
    if concealed is not None:
        text = concealed.echo(text)
    return _redact_patterns(text)


def _redact_patterns(text: str) -> str:
    text = _PG_DETAIL_VALUES.sub("\\1(…)", text)
    text = _URL_PASSWORD.sub(r"\1***@", text)
    text = _AUTHORIZATION.sub(r"\1[redacted]", text)
    text = _UNSUBSCRIBE_TOKEN.sub(r"\1<token>", text)
    text = _API_KEY.sub(r"\1[redacted]", text)
    text = _SECRET.sub(r"\1[redacted]", text)
    return _ADDRESS.sub(_mask, text) if "@" in text or "%40" in text else text


def _redact_own(text: str) -> str:
    """redact() for words that are not a mail server's: a recipient's mailbox alone stays."""
    concealed = _concealed.get()
    if concealed is not None:
        text = concealed.sub(text, concealed.addresses(concealed.present(text)))
    return _redact_patterns(text)


class RedactingFilter(logging.Filter):
    """Formats each record's message once, redacted; RQ's terminal colours go too."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "peewee" and isinstance(record.msg, tuple) and record.msg:
            # peewee logs each statement at DEBUG as (sql, params): the params are what was written,
            # bodies and template data among them. The statement alone says what ran.
            record.msg, record.args = str(record.msg[0]), None
        try:
            message = record.getMessage()
        except STOPPING:
            raise  # RQ stopping the job as the line was made: the job's, not the line's
        except Exception:  # noqa: BLE001 - a bad format string must not break the caller; log what we have
            message = f"{record.msg} {record.args!r}"
        message = _ANSI.sub("", message)
        concealed = _concealed.get()
        if concealed is not None:
            message = _conceal_message(concealed, record, message)
        record.msg = _redact_patterns(message)
        record.args = None
        return True


class AccessLogFilter(logging.Filter):
    """Drops the werkzeug development server's per-request line; the API logs its own, structured."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.endswith('"%s" %s %s'))


# --- formatting ------------------------------------------------------------------------------------

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged as a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def _safe(value, clean=redact):
    if isinstance(value, str):
        return clean(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, list | tuple):
        return [_safe(item, clean) for item in value]
    if isinstance(value, dict):
        return {str(k): _safe(v, clean) for k, v in value.items()}
    return clean(str(value))


def _fields(record: logging.LogRecord) -> dict:
    found = {name: var.get() for name, var in _CONTEXT.items() if var.get() is not None}
    # RQ's fields name the job (queue, function, arguments: ids), never hold a mail server's words.
    clean = _redact_own if _from_rq(record) else redact
    for name, value in vars(record).items():
        if name not in _STANDARD and not name.startswith("_"):
            found[name] = _safe(value, clean)
    return found


def _exception(formatter: logging.Formatter, record: logging.LogRecord) -> str | None:
    text = formatter.formatException(record.exc_info) if record.exc_info else record.exc_text
    if not text:
        return None
    concealed = _concealed.get()
    # A traceback's last line is the exception's text, which may be a mail server's words.
    return redact(concealed.echo(text) if concealed is not None else text)


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "message", request_id?, notification_id?, exc_info?, extra fields}."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        exc = _exception(self, record)
        if exc:
            line["exc_info"] = exc
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """For people at a terminal: `12:00:01 INFO notifier.jobs [nid=...] message`."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(record)
        text = f"{self.formatTime(record, self.datefmt)} {record.levelname} {record.name}"
        if fields:
            text += " [" + " ".join(f"{k}={v}" for k, v in fields.items()) + "]"
        text += f" {record.getMessage()}"
        exc = _exception(self, record)
        return f"{text}\n{exc}" if exc else text


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time, so a replaced stderr (pytest's) is never stale."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass

    def handleError(self, record: logging.LogRecord) -> None:
        # RQ stops a job by raising wherever it is (its time limit's SIGALRM), a line being formatted
        # or written among those places: logging took that for the line failing, printed "Logging
        # error" and let the job go on with no limit left. It goes on up to RQ instead.
        if isinstance(sys.exc_info()[1], STOPPING):
            raise  # emit() calls this inside its except clause
        super().handleError(record)


def make_handler(fmt: str = "json") -> logging.Handler:
    """The one handler every process logs through: stderr, redacted, JSON or text."""
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(AccessLogFilter())
    handler.addFilter(RedactingFilter())
    return handler


def configure(level: str = "INFO", fmt: str = "json") -> None:
    """Route every logger, ours, RQ's, rq-scheduler's and werkzeug's, through one stderr handler."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, StderrHandler):
            root.removeHandler(handler)
    root.addHandler(make_handler(fmt))
    root.setLevel(level)
    # RQ and rq-scheduler add handlers of their own (to stdout, in their format) unless a handler
    # already catches their loggers; clear any they added before us so lines go through ours.
    for name in ("rq", "rq.worker", "rq.job", "rq.scheduler", "rq_scheduler", "rq_scheduler.scheduler", "werkzeug"):
        logger = logging.getLogger(name)
        for own in list(logger.handlers):
            logger.removeHandler(own)
        logger.propagate = True


def gunicorn_logconfig(level: str = "INFO", fmt: str = "json") -> dict:
    """gunicorn's logconfig_dict: its own lines (booting, worker exits) through the same handler."""
    quiet = {"level": level, "handlers": [], "propagate": True}
    return {
        "root": {"level": level, "handlers": ["notifier"]},
        "loggers": {"gunicorn.error": quiet, "gunicorn.access": quiet},
        "handlers": {"notifier": {"()": make_handler, "fmt": fmt}},
    }
