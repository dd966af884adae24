"""Mailer interface, the SMTP implementation over yagmail's connection, and the test double."""

from __future__ import annotations

import logging
import re
import smtplib
import socket
import ssl
import time
import uuid
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import message_from_bytes
from email.charset import QP, Charset
from email.header import Header
from email.message import EmailMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import SMTP, Compat32
from email.utils import format_datetime, formataddr, parseaddr
from functools import lru_cache
from typing import Protocol

import yagmail

from notifier.config import Settings
from notifier.errors import STOPPING, DeliveryError, PermanentDeliveryError, TransientDeliveryError
from notifier.rendering import RenderedEmail

logger = logging.getLogger(__name__)

# A connection idle longer than this is probed with NOOP before use: servers drop idle clients, and
# a send that fails on a dead connection would cost a whole retry interval.
IDLE_PROBE_SECONDS = 10.0


# The lines of a text body looked for in what a mail server writes back (logs.conceal_content).
_QUOTABLE_LINES = 100
# What a refusal quotes from inside a line: a link (a URL blocklist names it, token and all), a code.
_LINK = re.compile(r"https?://[^\s\"'<>]+")
_CODE = re.compile(r"[0-9]{4,}")


@dataclass(frozen=True)
class OutgoingEmail:
    notification_id: str
    to: str
    content: RenderedEmail
    headers: dict[str, str] = field(default_factory=dict)

    def texts(self) -> list[str]:
        """What a mail server's refusal may quote of this email: its subject, its headers' values
        (the unsubscribe link), its text's lines, each stripped, and the links and numbers of 4 digits
        or more in its body."""
        text, html = self.content.text or "", self.content.html or ""
        lines = text.splitlines()[:_QUOTABLE_LINES]
        # Codes from the text, which says what the HTML does without its colours and widths: from the
        # HTML only when there is no text.
        parts = dict.fromkeys(_LINK.findall(text) + _LINK.findall(html) + _CODE.findall(text or html))
        parts = list(parts)[:_QUOTABLE_LINES]  # a long HTML body's colours and widths: enough of them
        return [t.strip() for t in (self.content.subject, *self.headers.values(), *lines, *parts) if t.strip()]


@dataclass(frozen=True)
class SendResult:
    message_id: str
    smtp_code: int
    smtp_reply: str


class Mailer(Protocol):
    """Sends one email; raises TransientDeliveryError or PermanentDeliveryError."""

    def send(self, email: OutgoingEmail) -> SendResult: ...

    def close(self) -> None: ...


def message_id_for(notification_id: str, mail_from: str) -> str:
    """The same Message-ID on every attempt, so a receiver can drop a duplicate."""
    return f"<{notification_id}@{_domain(mail_from)}>"


@lru_cache(maxsize=16)
def _domain(mail_from: str) -> str:
    return parseaddr(mail_from)[1].rpartition("@")[2]


# Fold only past RFC 5322's hard limit: folding a long token at 78 turns it into an RFC 2047 encoded
# word, and a mail client does not decode those in List-Unsubscribe (RFC 2369), so the link breaks.
SMTP_POLICY = SMTP.clone(max_line_length=998)


# What str.splitlines() breaks an ASCII string at, as compat32's folding does.
_ASCII_LINE_BREAK = re.compile(r"[\n\r\v\f\x1c-\x1e]")


class _Wire(Compat32):
    """compat32, minus the folding of a header that needs none.

    compat32 runs every header through email.header.Header on output, which cost a worker a third of
    its time writing a message; a plain ASCII header that fits on one line comes out of it unchanged,
    so it is written as it is (tests/test_mail.py checks the two agree)."""

    def _fold(self, name, value, sanitize):
        if _fits(name, value, self.max_line_length):
            return f"{name}: {value}{self.linesep}"
        return super()._fold(name, value, sanitize)


def _fits(name: str, value, max_line_length: int | None) -> bool:
    """Whether compat32 writes header name as it stands: plain ASCII on one line within the limit."""
    return (isinstance(value, str) and value.isascii() and not _ASCII_LINE_BREAK.search(value)
            and bool(max_line_length) and len(name) + 2 + len(value) <= max_line_length)


# The message is written with the email package's compat32 classes: its modern API parses every header
# as it is set and re-folds it on output, which cost a worker more than the rest of a delivery.
_WIRE = _Wire(linesep="\r\n", max_line_length=998)
_QUOTED_PRINTABLE = Charset("utf-8")
_QUOTED_PRINTABLE.body_encoding = QP
_SEVEN_BIT = Charset("utf-8")
_SEVEN_BIT.body_encoding = None


# Control characters but the tab, C0, DEL and C1: not in a header (RFC 5322 2.2).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
# SMTP's limit is 998 characters a line (RFC 5322); a header's name and the folding take some.
_LONGEST_WORD = 900
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _header(value: str, name: str) -> str:
    # Line breaks were refused at the API; never let one through to the wire all the same, nor another
    # control character a template's data put into a subject (shown as U+FFFD, and encoded).
    value = _CONTROL.sub("\ufffd", " ".join(value.splitlines()))
    # Text that reads as an RFC 2047 encoded word ("=?utf-8?q?...?=") would be decoded by the reader's
    # client into something else: encoded itself, it arrives as written.
    if (value.isascii() and "=?" not in value
            and all(len(word) <= _LONGEST_WORD for word in value.split())):
        return value  # folded at spaces, if at all, when written
    # Encoded words, which fold anywhere. Told the header's name, Header counts it on the first line:
    # RFC 2047 allows an encoded word 75 characters and a line holding one 76, and without it the
    # words came out 76 long and the first line 85.
    return Header(value, "utf-8", header_name=name).encode(maxlinelen=76)


# Headers whose value is a list of <URL>s (RFC 2369): never RFC 2047 encoded, which is not allowed
# there (RFC 2047 section 5) and which a mail client does not decode, so one-click unsubscribe breaks.
_URL_LIST_HEADERS = frozenset({"List-Unsubscribe"})
# Headers that hold an address with an optional display name, written as From is.
_ADDRESS_HEADERS = frozenset({"Reply-To"})


def _url_list(name: str, value: str) -> str:
    # One line where it fits; a link too long for one (a long user id makes a long token) is folded
    # inside its brackets, where RFC 2369 (section 2) has the reader ignore whitespace.
    value = " ".join(value.splitlines())
    room = _WIRE.max_line_length - len(name) - 2
    if len(value) <= room:
        return value
    chunks = [value[:room]] + [value[i:i + _LONGEST_WORD] for i in range(room, len(value), _LONGEST_WORD)]
    return (_WIRE.linesep + " ").join(chunks)


@lru_cache(maxsize=16)
def _mailbox_header(mail_from: str, header_name: str = "From") -> str:
    # Written again from its parts, whatever MAIL_FROM's spelling: "Acme Inc. <...>" as it stands is
    # RFC 5322's obsolete phrase syntax (a "." outside quotes), which a generator must not produce.
    name, address = parseaddr(" ".join(mail_from.splitlines()))
    if name.isascii():
        return formataddr((name, address))
    # A name beyond ASCII as encoded words of at most 75 characters on lines of at most 76 (RFC 2047),
    # as Subject is: formataddr made one word of any length ("Служба поддержки клиентов" was 76).
    encoded = Header(name, "utf-8", header_name=header_name).encode(maxlinelen=76)
    return f"{encoded}\n <{address}>"


def _address(value: str) -> str:
    value = " ".join(value.splitlines())
    if value.isascii():
        return value
    name, address = parseaddr(value)
    return formataddr((name, address), "utf-8")


def _lines(body: str) -> list[str]:
    """body's lines, split at each line break the email package's generator knows (_LINE_BREAK)."""
    return body.split("\n") if "\r" not in body else _LINE_BREAK.split(body)  # str.split: a tenth of the time


def _seven_bit(body: str, lines: list[str] | None = None) -> bool:
    """Whether SMTP carries body as it is: ASCII, no line over RFC 5322's 998 characters."""
    return body.isascii() and max(map(len, _lines(body) if lines is None else lines)) <= 998


def _part(body: str, subtype: str) -> MIMEText:
    # 7bit where SMTP carries it as it is; quoted-printable for non-ASCII text or over-long lines.
    return MIMEText(body, subtype, _SEVEN_BIT if _seven_bit(body) else _QUOTED_PRINTABLE, policy=_WIRE)


def _boundary(*bodies: str) -> str:
    """A multipart boundary that none of the bodies holds.

    Left to itself the email package finds one by compiling a regular expression for every message,
    a sixth of the time it takes to write one. A quoted-printable part never holds "=_" ("=" is
    always followed by hex digits or a line break) and a 7bit part is the body itself, so looking
    for the boundary in the bodies is enough."""
    while True:
        boundary = "=_" + uuid.uuid4().hex
        if not any(boundary in body for body in bodies):
            return boundary


def message_bytes(email: OutgoingEmail, mail_from: str) -> bytes:
    """The MIME message as sent: multipart/alternative when there is both text and HTML."""
    text, html = email.content.text, email.content.html
    parts = [(subtype, body) for subtype, body in (("plain", text), ("html", html)) if body is not None]
    parts = parts or [("html", "")]
    boundary = _boundary(text, html) if len(parts) == 2 else None
    headers = _headers(email, mail_from)
    return _plain_message(parts, headers, boundary) or _library_message(parts, headers, boundary)


def _headers(email: OutgoingEmail, mail_from: str) -> list[tuple[str, str]]:
    """The message's own headers, each as it is written, in order."""
    headers = [
        ("From", _mailbox_header(mail_from)),
        ("To", _address(email.to)),
        ("Subject", _header(email.content.subject, "Subject")),
        # "+0000", not "GMT": RFC 5322 (4.3) has "GMT" as obsolete syntax that must not be generated.
        ("Date", format_datetime(datetime.now(UTC))),
        ("Message-ID", message_id_for(email.notification_id, mail_from)),
        ("X-Notification-ID", _header(email.notification_id, "X-Notification-ID")),
        # RFC 3834 (5): mail a program sends on its own account says so, and vacation responders and
        # other auto-replies then leave it alone instead of answering to MAIL_FROM.
        ("Auto-Submitted", "auto-generated"),
    ]
    for name, value in email.headers.items():
        if name in _URL_LIST_HEADERS:
            headers.append((name, _url_list(name, value)))
        elif name in _ADDRESS_HEADERS:
            headers.append((name, _mailbox_header(value, name)))
        else:
            headers.append((name, _header(value, name)))
    return headers


def _library_message(parts: list[tuple[str, str]], headers: list[tuple[str, str]], boundary: str | None) -> bytes:
    """The message written by the email package: what any message needs (encoded words, folding,
    quoted-printable bodies)."""
    if boundary is not None:
        msg = MIMEMultipart("alternative", boundary=boundary, policy=_WIRE)
        for subtype, body in parts:
            msg.attach(_part(body, subtype))
    else:
        msg = _part(parts[0][1], parts[0][0])
    for name, value in headers:
        msg[name] = value
    return msg.as_bytes()


_CRLF = _WIRE.linesep
_SEVEN_BIT_HEAD = (f'Content-Type: text/{{}}; charset="utf-8"{_CRLF}MIME-Version: 1.0{_CRLF}'
                   f"Content-Transfer-Encoding: 7bit{_CRLF}")


def _plain_message(parts: list[tuple[str, str]], headers: list[tuple[str, str]], boundary: str | None) -> bytes | None:
    """_library_message()'s bytes, written directly, for the usual message: every header plain ASCII
    on one line and every body 7bit. None for any other, which the email package writes.

    The email package took a worker as long as the rest of a delivery's Python (1.6M of 4.4M
    instructions, by callgrind); tests/test_mail.py checks the two write the same bytes."""
    limit = _WIRE.max_line_length
    if not all(_fits(name, value, limit) for name, value in headers):
        return None
    lines = [_lines(body) for _, body in parts]
    if not all(_seven_bit(body, split) for (_, body), split in zip(parts, lines, strict=True)):
        return None
    # As the generator writes a body: each line break, of whatever kind, as CRLF.
    bodies = [_CRLF.join(split) for split in lines]
    own = "".join(f"{name}: {value}{_CRLF}" for name, value in headers)
    if boundary is None:
        return f"{_SEVEN_BIT_HEAD.format(parts[0][0])}{own}{_CRLF}{bodies[0]}".encode("ascii")
    written = [f"{_SEVEN_BIT_HEAD.format(subtype)}{_CRLF}{body}"
               for (subtype, _), body in zip(parts, bodies, strict=True)]
    delimiter = f"{_CRLF}--{boundary}{_CRLF}"
    return (f'Content-Type: multipart/alternative; boundary="{boundary}"{_CRLF}MIME-Version: 1.0{_CRLF}{own}{_CRLF}'
            f"--{boundary}{_CRLF}{delimiter.join(written)}{_CRLF}--{boundary}--{_CRLF}").encode("ascii")


def _written(email: OutgoingEmail, mail_from: str) -> bytes:
    # A recipient beyond ASCII (stored before the API refused them) fails here, as its To header is
    # written, before smtplib would: a permanent failure all the same, not one retried for hours.
    try:
        return message_bytes(email, mail_from)
    except UnicodeEncodeError as exc:
        raise classify(exc) from exc


def build_message(email: OutgoingEmail, mail_from: str) -> EmailMessage:
    """The message as sent, parsed back (the test double keeps these; tests read them)."""
    return message_from_bytes(_written(email, mail_from), policy=SMTP_POLICY)


def classify(exc: BaseException) -> DeliveryError:
    """Turn what smtplib or the network raised into an error that says whether to retry."""
    if isinstance(exc, DeliveryError):
        return exc
    if isinstance(exc, UnicodeEncodeError):
        # smtplib writes its commands in ASCII: a non-ASCII address (stored before the API refused
        # them) can never be sent, so no retry would help.
        return PermanentDeliveryError("the address is not ASCII, which SMTP without SMTPUTF8 cannot carry")
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        code, reply = next(iter(exc.recipients.values()), (550, b"recipient refused"))
        error = _by_code(code, reply, "recipient refused")
        if isinstance(error, PermanentDeliveryError) and not _ENHANCED_STATUS.match(_text(reply)):
            # A bare 550/551/553 to RCPT is how a server without enhanced status codes says the
            # mailbox is unknown; with one, only the mailbox codes do (5.7.1, a policy refusal, is
            # about this message, not the address).
            error.address_rejected = code in _BAD_MAILBOX_CODES
        return error
    if isinstance(exc, smtplib.SMTPSenderRefused):
        # Refused at MAIL FROM, before the recipient was named: about our sender (MAIL_FROM, the
        # relay's policy), never the recipient's mailbox, whatever its code says.
        error = _by_code(exc.smtp_code, exc.smtp_error, "sender refused")
        error.address_rejected = False
        return error
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        # A login problem is the operator's to fix; retrying gives them the time to.
        return TransientDeliveryError(f"SMTP login failed: {exc.smtp_code} {_text(exc.smtp_error)}", exc.smtp_code,
                                      smtp_reply=_text(exc.smtp_error), operator=True)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TransientDeliveryError(f"the SMTP server's certificate is not trusted ({exc.verify_message}): "
                                      "SMTP_CA_FILE names the certificates to trust", operator=True)
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        # SMTP_SECURITY=starttls, and the server offers no STARTTLS (or login, with SMTP_USERNAME).
        return TransientDeliveryError(f"the SMTP server does not support it: {exc}", operator=True)
    if isinstance(exc, smtplib.SMTPResponseException):
        return _by_code(exc.smtp_code, exc.smtp_error, "SMTP error")
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        if "timed out" in str(exc):  # smtplib's words when SMTP_TIMEOUT ran out waiting for a reply
            return TransientDeliveryError("SMTP timed out")
        return TransientDeliveryError(f"SMTP connection dropped: {exc}")
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return TransientDeliveryError("SMTP timed out")
    if isinstance(exc, (ssl.SSLError, smtplib.SMTPException, OSError)):
        return TransientDeliveryError(f"SMTP connection failed: {type(exc).__name__}: {exc}")
    return TransientDeliveryError(f"unexpected error while sending: {type(exc).__name__}")


def _text(reply) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
    # A server's reply is stored as it came, but PostgreSQL holds no NUL in text: one in a `250`
    # would make the `sent` record fail after the message went out, and the email be sent again.
    return text.replace("\x00", "\ufffd")


# Enhanced status codes (RFC 3463) that mean the mailbox does not exist or never will.
_BAD_MAILBOX = ("5.1.1", "5.1.2", "5.1.3", "5.1.6", "5.1.10")


_BAD_MAILBOX_CODES = (550, 551, 553)
# An enhanced status code opens the reply's text (RFC 3463), as in "5.1.1 no such user".
_ENHANCED_STATUS = re.compile(r"\s*[245]\.\d{1,3}\.\d{1,3}\b")


# A failure's reason as classify wrote it: what was refused, the reply's code, then its text.
_REFUSAL = re.compile(r"(recipient refused|sender refused|SMTP error): ([2-5]\d\d) (.*)", re.DOTALL)


def names_an_unknown_mailbox(reason: str) -> bool:
    """Whether a suppression's reason is one that puts an address on the list today. Releases of schema
    version 6 and before put it there for any permanent refusal of RCPT (a 550 5.7.1 policy refusal of
    one message, a 552 5.2.2 full mailbox), and of 7 and before for a refusal of our sender too. A
    reason this cannot read is taken to be one (it stays)."""
    refusal = _REFUSAL.fullmatch(reason)
    if refusal is None:
        return True
    what, code, text = refusal.group(1), int(refusal.group(2)), refusal.group(3)
    if what == "sender refused":
        return False
    if what == "SMTP error" or code < 500:
        return True  # the DATA reply's rule has not changed; a transient one never suppressed
    enhanced = _ENHANCED_STATUS.match(text)
    return enhanced.group().strip() in _BAD_MAILBOX if enhanced else code in _BAD_MAILBOX_CODES


def _by_code(code: int, reply, what: str) -> DeliveryError:
    text = _text(reply)
    message = f"{what}: {code} {text}"
    if 400 <= code < 500:
        return TransientDeliveryError(message, code, smtp_reply=text)
    enhanced = _ENHANCED_STATUS.match(text)
    bad_mailbox = enhanced is not None and enhanced.group().strip() in _BAD_MAILBOX
    return PermanentDeliveryError(message, code, address_rejected=bad_mailbox, smtp_reply=text)


class SmtpMailer:
    """Sends over one SMTP connection per process, opened by yagmail and reopened when it drops."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._client: yagmail.SMTP | None = None
        self._context: ssl.SSLContext | None = None
        self._sender = parseaddr(settings.mail_from)[1]
        self._last_used = 0.0

    def _tls(self) -> ssl.SSLContext:
        # Verifying the server's certificate and name, as a mail client does: smtplib's own default
        # (what yagmail used) checks neither, and anyone in the way took the mail and SMTP_PASSWORD.
        if self._context is None:
            self._context = ssl.create_default_context(cafile=self.settings.smtp_ca_file or None)
        return self._context

    def _open(self) -> yagmail.SMTP:
        s = self.settings
        client = yagmail.SMTP(
            # As a one-entry dict: given a str, yagmail adds "@gmail.com" to a name without "@",
            # and a relay's login ("apikey", an access key id) was refused.
            user={s.smtp_username: s.smtp_username} if s.smtp_username else None,
            password=s.smtp_password or None,
            host=s.smtp_host,
            port=s.smtp_port,
            smtp_ssl=s.smtp_security == "ssl",
            smtp_starttls={"context": self._tls()} if s.smtp_security == "starttls" else False,
            # Without this yagmail asks the keyring or a terminal for a password and hangs the worker.
            smtp_skip_login=not s.smtp_username,
            soft_email_validation=False,
            timeout=s.smtp_timeout,
            local_hostname=s.smtp_helo_name or None,  # on to smtplib: the name said in EHLO
            **({"context": self._tls()} if s.smtp_security == "ssl" else {}),  # for smtplib.SMTP_SSL
        )
        try:
            client.login()
        except BaseException:
            # Half open (a refused login, RQ's limit cutting in): yagmail would say QUIT when the
            # object is collected, and wait up to SMTP_TIMEOUT for the answer wherever that happens.
            client.is_closed = True
            if getattr(client, "smtp", None) is not None:
                with suppress(OSError):
                    client.smtp.close()
            raise
        return client

    def _connection(self) -> smtplib.SMTP:
        if self._client is not None and time.monotonic() - self._last_used > IDLE_PROBE_SECONDS:
            try:
                if self._client.smtp.noop()[0] != 250:
                    self._drop()
            except (smtplib.SMTPException, OSError):
                self._drop()
        if self._client is None:
            self._client = self._open()
        return self._client.smtp

    def send(self, email: OutgoingEmail) -> SendResult:
        """Send one message; the reply to DATA is what we record."""
        body = _written(email, self.settings.mail_from)
        reused = self._client is not None
        try:
            try:
                code, reply = _transmit(self._connection(), self._sender, email.to, body)
            except _DeadConnection:
                if not reused:
                    raise
                # A kept connection the server had closed meanwhile (it restarted, or dropped us
                # before IDLE_PROBE_SECONDS): nothing of this message reached it, so a new
                # connection sends it now rather than a retry interval later.
                self._drop()
                code, reply = _transmit(self._connection(), self._sender, email.to, body)
        except BaseException as exc:
            self._drop()  # also when the process is made to exit mid-send (a second SIGTERM)
            if isinstance(exc, STOPPING) or not isinstance(exc, Exception):
                raise  # RQ stops the job, or the process exits: not a failure of this email's delivery
            raise classify(exc) from exc
        self._last_used = time.monotonic()
        return SendResult(message_id=message_id_for(email.notification_id, self.settings.mail_from),
                          smtp_code=code, smtp_reply=_text(reply))

    def close(self) -> None:
        """Say QUIT and close the connection; the next send opens a new one. (A failed or cut-off
        connection is dropped without a word instead: _drop.)"""
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail in any way
                logger.debug("closing SMTP connection failed", exc_info=True)

    def _drop(self) -> None:
        # A connection that failed, or whose send was cut off, is closed without QUIT. The server may
        # still be taking a message (a slow answer to DATA, RQ's time limit cutting in): a QUIT waits
        # for that answer, up to SMTP_TIMEOUT, and a server still connected delivers the email we are
        # about to record as not sent, which its retry then sends again. Hanging up first gives a
        # careful server the chance to drop it.
        client, self._client = self._client, None
        if client is not None:
            client.is_closed = True
            with suppress(OSError):
                client.smtp.close()  # the socket only: nothing more is said to the server


class _DeadConnection(smtplib.SMTPServerDisconnected):
    """The connection was gone before MAIL FROM was answered: nothing of the message reached the server."""


def _transmit(smtp: smtplib.SMTP, sender: str, recipient: str, body: bytes) -> tuple[int, bytes]:
    # smtplib.sendmail hides the reply to DATA, which is the receipt we keep; this is its single-
    # recipient core, raising the same exceptions.
    smtp.ehlo_or_helo_if_needed()
    if smtp.does_esmtp and smtp.has_extn("pipelining"):
        return _transmit_pipelined(smtp, sender, recipient, body)
    try:
        code, reply = smtp.mail(sender)
    except (smtplib.SMTPServerDisconnected, ConnectionError) as exc:
        raise _DeadConnection(f"{type(exc).__name__}: {exc}") from exc
    if code != 250:
        _reset(smtp)
        raise smtplib.SMTPSenderRefused(code, reply, sender)
    code, reply = smtp.rcpt(recipient)
    if code not in (250, 251):
        _reset(smtp)
        raise smtplib.SMTPRecipientsRefused({recipient: (code, reply)})
    code, reply = smtp.data(body)
    if code != 250:
        _reset(smtp)
        raise smtplib.SMTPDataError(code, reply)
    return code, reply


def _transmit_pipelined(smtp: smtplib.SMTP, sender: str, recipient: str, body: bytes) -> tuple[int, bytes]:
    """_transmit() where the server offers PIPELINING (RFC 2920), as most do: MAIL, RCPT and DATA go
    in one write and their replies are read in order, two round trips fewer per email (each one the
    server's distance away), with the same outcomes and exceptions. smtplib does not pipeline."""
    commands = f"mail FROM:{_quoted(sender)}\r\nrcpt TO:{smtplib.quoteaddr(recipient)}\r\ndata\r\n"
    if commands.count("\n") != 3 or commands.count("\r") != 3:
        raise ValueError("an address holds a line break")  # as smtplib's putcmd refuses it
    try:
        smtp.send(commands)  # one write: small ones one after another would wait on each other (Nagle)
        mail = smtp.getreply()
    except (smtplib.SMTPServerDisconnected, ConnectionError) as exc:
        raise _DeadConnection(f"{type(exc).__name__}: {exc}") from exc
    rcpt = None
    try:
        rcpt = smtp.getreply()
        data = smtp.getreply()
        if data[0] == 354 and _refusal(sender, mail, recipient, rcpt) is not None:
            # A server that took DATA all the same waits for a message: end it empty; without a
            # recipient it delivers nothing.
            smtp.send(b".\r\n")
            smtp.getreply()
    except smtplib.SMTPServerDisconnected as exc:
        # A server may close right after refusing MAIL or RCPT (a 421 says it will), before the
        # replies to the rest of the group: the refusal is the reason, as one command at a time.
        if (refusal := _refusal(sender, mail, recipient, rcpt)) is not None:
            raise refusal from exc
        raise
    if (refusal := _refusal(sender, mail, recipient, rcpt)) is not None:
        _reset(smtp)
        raise refusal
    if data[0] != 354:
        _reset(smtp)
        raise smtplib.SMTPDataError(*data)
    # What smtplib's data() sends after a 354: the message, its lines that start with "." doubled,
    # then the line with "." alone.
    message = _periods_doubled(body)
    smtp.send(message + (b"" if message.endswith(b"\r\n") else b"\r\n") + b".\r\n")
    code, reply = smtp.getreply()
    if code != 250:
        _reset(smtp)
        raise smtplib.SMTPDataError(code, reply)
    return code, reply


@lru_cache(maxsize=16)
def _quoted(sender: str) -> str:
    # MAIL_FROM's, the same for every email: smtplib parses the address again each time.
    return smtplib.quoteaddr(sender)


def _periods_doubled(body: bytes) -> bytes:
    """smtplib's doubling of a "." that starts a line, done only where one does: its regular expression
    looks at every position of the message, which took longer than the rest of the send's Python."""
    if body.startswith(b".") or b"\n." in body:  # where (?m)^ matches: the start, and after each \n
        return smtplib._quote_periods(body)
    return body


def _refusal(sender: str, mail: tuple[int, bytes], recipient: str,
             rcpt: tuple[int, bytes] | None) -> smtplib.SMTPException | None:
    """What one-command-at-a-time _transmit() raises for these replies to MAIL and RCPT, if anything."""
    if mail[0] != 250:
        return smtplib.SMTPSenderRefused(*mail, sender)
    if rcpt is not None and rcpt[0] not in (250, 251):
        return smtplib.SMTPRecipientsRefused({recipient: rcpt})
    return None


def _reset(smtp: smtplib.SMTP) -> None:
    try:
        smtp.rset()
    except smtplib.SMTPServerDisconnected:
        pass


class MemoryMailer:
    """The test double: keeps what it sends; raises the errors it is given, one per send."""

    def __init__(self, mail_from: str = "notifier@localhost", failures: list[BaseException] | None = None):
        self.mail_from = mail_from
        self.failures = list(failures or [])
        self.sent: list[EmailMessage] = []

    def send(self, email: OutgoingEmail) -> SendResult:
        if self.failures:
            raise classify(self.failures.pop(0))
        message = build_message(email, self.mail_from)
        self.sent.append(message)
        return SendResult(message_id=message["Message-ID"], smtp_code=250, smtp_reply="OK (memory)")

    def close(self) -> None:
        pass


def make_mailer(settings: Settings) -> Mailer:
    """The mailer the settings describe."""
    return SmtpMailer(settings)
