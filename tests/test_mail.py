"""Mail: classifying SMTP errors, building the MIME message, and the MemoryMailer test double."""

from __future__ import annotations

import random
import smtplib
import socket
import ssl
import uuid
from email.policy import compat32

import pytest

from notifier.errors import PermanentDeliveryError, TransientDeliveryError
from notifier.mail import (
    _WIRE,
    MemoryMailer,
    OutgoingEmail,
    _headers,
    _library_message,
    _periods_doubled,
    _plain_message,
    build_message,
    classify,
    message_bytes,
    message_id_for,
    names_an_unknown_mailbox,
)
from notifier.rendering import RenderedEmail

MAIL_FROM = "notifier@example.com"
NOTIFICATION_ID = "3f1c2a9e-0000-4000-8000-000000000001"


def outgoing(text: str | None = "Plain body", html: str | None = "<p>HTML body</p>", **fields) -> OutgoingEmail:
    """An email ready to send, with the parts and fields given."""
    values = {
        "notification_id": NOTIFICATION_ID,
        "to": "ada@example.com",
        "content": RenderedEmail(subject="Hello", text=text, html=html),
    } | fields
    return OutgoingEmail(**values)


@pytest.mark.parametrize(
    ("exc", "kind", "code"),
    [
        (smtplib.SMTPResponseException(451, b"try later"), TransientDeliveryError, 451),
        (smtplib.SMTPResponseException(421, b"closing"), TransientDeliveryError, 421),
        (smtplib.SMTPResponseException(550, b"no such user"), PermanentDeliveryError, 550),
        (smtplib.SMTPResponseException(554, b"rejected"), PermanentDeliveryError, 554),
        (smtplib.SMTPDataError(452, b"mailbox full"), TransientDeliveryError, 452),
        (smtplib.SMTPSenderRefused(553, b"bad sender", MAIL_FROM), PermanentDeliveryError, 553),
        (smtplib.SMTPRecipientsRefused({"ada@example.com": (550, b"no such user")}), PermanentDeliveryError, 550),
        (smtplib.SMTPRecipientsRefused({"ada@example.com": (450, b"greylisted")}), TransientDeliveryError, 450),
        (smtplib.SMTPAuthenticationError(535, b"bad credentials"), TransientDeliveryError, 535),
    ],
)
def test_classify_smtp_replies_by_code(exc, kind, code):
    error = classify(exc)

    assert type(error) is kind
    assert error.smtp_code == code


def test_classify_keeps_the_reply_text_in_the_message():
    error = classify(smtplib.SMTPResponseException(550, b"5.1.1 no such user"))

    assert "550" in str(error)
    assert "no such user" in str(error)


@pytest.mark.parametrize(
    "exc",
    [
        smtplib.SMTPServerDisconnected("Connection unexpectedly closed"),
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError("timed out"),  # socket.timeout is this very class since Python 3.10
        socket.gaierror(-2, "Name or service not known"),
        ssl.SSLError("handshake failed"),
        RuntimeError("anything else"),
    ],
)
def test_classify_connection_problems_as_transient(exc):
    error = classify(exc)

    assert type(error) is TransientDeliveryError
    assert error.smtp_code is None


@pytest.mark.parametrize(("reply", "bounce"), [
    (b"5.1.1 no such user", True),  # the mailbox does not exist: the address goes on the suppression list
    (b"no such user", True),  # a server without enhanced status codes says it so
    (b"5.7.1 rejected by policy", False),  # refused, but about this message, not the address
    (b"5.2.2 mailbox full", False),
    (b"No such user (checked by mx 5.9.10.11)", True),  # an address in the text is no status code
])
@pytest.mark.parametrize("code", [550, 554])
def test_only_an_unknown_mailbox_is_a_bounce(reply, bounce, code):
    if code == 554 and not reply[:1].isdigit():
        bounce = False  # a bare 554 is "transaction failed", about the message
    error = classify(smtplib.SMTPRecipientsRefused({"ada@example.com": (code, reply)}))
    assert isinstance(error, PermanentDeliveryError) and error.address_rejected is bounce
    # The reason the suppression stores reads the same way (a schema upgrade unlists what older rules listed).
    assert names_an_unknown_mailbox(str(error)) is bounce
    assert names_an_unknown_mailbox(str(classify(smtplib.SMTPSenderRefused(code, reply, "n@x.io")))) is False


def test_a_non_ascii_address_is_a_permanent_failure():
    with pytest.raises(UnicodeEncodeError) as raised:
        "RCPT TO:<\u00fc@example.com>".encode("ascii")  # what smtplib does with it
    assert isinstance(classify(raised.value), PermanentDeliveryError)


def test_classify_passes_delivery_errors_through():
    original = PermanentDeliveryError("already decided", 550)

    assert classify(original) is original


def test_message_with_text_and_html_is_multipart_alternative_text_first():
    message = build_message(outgoing(), MAIL_FROM)

    assert message.get_content_type() == "multipart/alternative"
    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert parts[0].get_content().strip() == "Plain body"
    assert parts[1].get_content().strip() == "<p>HTML body</p>"


@pytest.mark.parametrize("text", ["Plain body", "Caf\u00e9 " * 400])  # a 7bit part and a quoted-printable one
def test_a_boundary_that_a_body_holds_is_never_used(monkeypatch, text):
    taken = uuid.UUID(int=1)
    html = f"<p>--=_{taken.hex}</p>\n--=_{taken.hex}--"  # the first boundary drawn, as a line of its own
    drawn = iter([taken, uuid.UUID(int=2)])
    monkeypatch.setattr(uuid, "uuid4", lambda: next(drawn))

    message = build_message(outgoing(text=text, html=html), MAIL_FROM)

    assert message.get_boundary() == f"=_{uuid.UUID(int=2).hex}"
    parts = list(message.iter_parts())
    assert parts[0].get_content().replace("\r\n", "\n").rstrip() == text.rstrip()
    assert parts[1].get_content().replace("\r\n", "\n").rstrip() == html


def test_message_without_html_is_only_text_plain():
    message = build_message(outgoing(html=None), MAIL_FROM)

    assert message.get_content_type() == "text/plain"
    assert not message.is_multipart()
    assert message.get_content().strip() == "Plain body"


def test_message_without_text_is_text_html():
    message = build_message(outgoing(text=None), MAIL_FROM)

    assert message.get_content_type() == "text/html"


def test_message_headers_name_sender_recipient_and_subject():
    message = build_message(outgoing(), MAIL_FROM)

    assert message["From"] == MAIL_FROM
    assert message["To"] == "ada@example.com"
    assert message["Subject"] == "Hello"
    assert message["Date"]


def test_a_control_character_a_template_put_in_a_subject_never_reaches_the_wire():
    # The API refuses them in a literal subject; a template's data can still carry one into it.
    content = RenderedEmail(subject="Hi \x07Ann\x1b[31m", text="x", html=None)
    raw = message_bytes(outgoing(content=content), MAIL_FROM)

    head = raw.split(b"\r\n\r\n")[0]
    assert not any(b < 32 and b not in (9, 10, 13) or b == 127 for b in head)
    assert build_message(outgoing(content=content), MAIL_FROM)["Subject"] == "Hi \ufffdAnn\ufffd[31m"


@pytest.mark.parametrize("mail_from", ["Служба поддержки клиентов компании <no-reply@xn--caf-dma.example>",
                                       "Équipe Service Client — Société Générale <support@example.com>"])
def test_a_display_name_beyond_ascii_is_encoded_words_of_at_most_75_on_lines_of_at_most_76(mail_from):
    # One encoded word of any length was written (76 and more): RFC 2047 allows 75.
    head = message_bytes(outgoing(), mail_from).split(b"\r\n\r\n")[0].decode()
    lines = head.split("\r\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("From: "))
    folded = [lines[start]] + [line for line in lines[start + 1:start + 10] if line.startswith(" ")]
    words = [w for line in folded for w in line.split() if w.startswith("=?")]
    assert len(words) > 1 and all(len(w) <= 75 for w in words) and all(len(line) <= 76 for line in folded)
    assert folded[-1].strip() == f"<{mail_from.rpartition('<')[2]}"


def test_message_id_is_stable_for_the_same_notification():
    first = build_message(outgoing(), MAIL_FROM)
    second = build_message(outgoing(), MAIL_FROM)

    assert first["Message-ID"] == second["Message-ID"] == message_id_for(NOTIFICATION_ID, MAIL_FROM)
    assert first["Message-ID"] == f"<{NOTIFICATION_ID}@example.com>"


def test_message_id_differs_between_notifications():
    other = build_message(outgoing(notification_id="another-id"), MAIL_FROM)

    assert other["Message-ID"] != message_id_for(NOTIFICATION_ID, MAIL_FROM)


def test_message_carries_the_notification_id_header():
    assert build_message(outgoing(), MAIL_FROM)["X-Notification-ID"] == NOTIFICATION_ID


def test_message_includes_extra_headers():
    message = build_message(outgoing(headers={"List-Unsubscribe": "<https://example.com/u>"}), MAIL_FROM)

    assert message["List-Unsubscribe"] == "<https://example.com/u>"


def test_non_ascii_content_survives_serialisation():
    message = build_message(outgoing(content=RenderedEmail("Héllo", "Grüße, Zoë", None)), MAIL_FROM)

    assert b"Subject: =?utf-8?" in message.as_bytes()
    assert message.get_content().strip() == "Grüße, Zoë"


def test_memory_mailer_records_each_message():
    mailer = MemoryMailer(MAIL_FROM)

    result = mailer.send(outgoing())

    assert len(mailer.sent) == 1
    assert mailer.sent[0]["To"] == "ada@example.com"
    assert result.message_id == message_id_for(NOTIFICATION_ID, MAIL_FROM)
    assert result.smtp_code == 250


def test_memory_mailer_raises_scripted_failures_in_order_then_sends():
    mailer = MemoryMailer(
        MAIL_FROM,
        failures=[smtplib.SMTPResponseException(451, b"later"), smtplib.SMTPResponseException(550, b"no")],
    )

    with pytest.raises(TransientDeliveryError):
        mailer.send(outgoing())
    with pytest.raises(PermanentDeliveryError):
        mailer.send(outgoing())
    mailer.send(outgoing())

    assert len(mailer.sent) == 1
    assert mailer.failures == []


def test_memory_mailer_does_not_share_the_callers_failure_list():
    failures = [smtplib.SMTPResponseException(451, b"later")]
    mailer = MemoryMailer(MAIL_FROM, failures=failures)

    with pytest.raises(TransientDeliveryError):
        mailer.send(outgoing())

    assert len(failures) == 1


def test_a_long_list_unsubscribe_link_goes_out_verbatim():
    from notifier.mail import OutgoingEmail, build_message
    from notifier.rendering import RenderedEmail
    from notifier.unsubscribe import headers

    url = "https://notify.example.com/unsubscribe/" + "eyJrIjoxLCJ1IjoidTIiLCJjIjoicHJvZHVjdCJ9" * 3
    email = OutgoingEmail("n1", "bob@example.com", RenderedEmail("Hi", "text", "<p>html</p>"), headers(url))
    raw = build_message(email, "notifier@example.com").as_bytes()
    assert f"List-Unsubscribe: <{url}>".encode() in raw
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in raw
    assert b"=?utf-8?" not in raw


@pytest.mark.parametrize("subject", ["a" * 1500, " ".join(["word"] * 300), "Grüße " + "b" * 1200])
def test_no_line_of_a_message_is_longer_than_smtp_allows(subject):
    from notifier.mail import message_bytes

    text = "c" * 600 + "\x0c" + "c" * 600  # a form feed is no line break on the wire
    email = outgoing(text=text, html="<p>" + "d" * 1500 + "</p>", content=RenderedEmail(subject, text, "d" * 1500))
    raw = message_bytes(email, MAIL_FROM)
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    message = build_message(email, MAIL_FROM)
    assert message["Subject"] == subject
    assert [part.get_content() for part in message.iter_parts()] == [text, "d" * 1500]


@pytest.mark.parametrize("value", [
    "", "a", "Hello  world", " lead", "trail ", "tab\there", "a\tb  c   d", "  ", "a " * 480, "=?utf-8?q?x?=",
    "<id@example.com>", "Tue, 01 Dec 2026 00:00:00 GMT", 'a;b, c"d"', "caf\u00e9", "line\r\nbreak", "end\n",
    "a\x0bb", "a\x0cb", "a\x1cb", "a\x1eb",
])
@pytest.mark.parametrize("name", ["Subject", "X-Notification-ID", "List-Unsubscribe"])
def test_headers_are_written_exactly_as_compat32_writes_them(name, value):
    # The writer skips compat32's folding for a header that needs none; it must not change a byte.
    reference = compat32.clone(linesep="\r\n", max_line_length=998)
    assert _WIRE.fold(name, value) == reference.fold(name, value)
    assert _WIRE.fold_binary(name, value) == reference.fold_binary(name, value)


@pytest.mark.parametrize("past", [-1, 0, 1])
@pytest.mark.parametrize("name", ["Subject", "X-Notification-ID", "List-Unsubscribe"])
def test_a_header_around_the_longest_line_is_written_as_compat32_writes_it(name, past):
    value = "x" * (998 - len(name) - len(": ") + past)
    reference = compat32.clone(linesep="\r\n", max_line_length=998)
    assert _WIRE.fold_binary(name, value) == reference.fold_binary(name, value)


# Pieces a body is made of: every kind of line break, lines around SMTP's longest, what a generator
# might treat specially ("From " at a line's start, a lone dot, a boundary-like line), and beyond ASCII.
_BODY_PIECES = ["\n", "\r\n", "\r", "\n\n", "From me", ".", "--=_x", " ", "\t", "plain words", "x" * 997,
                "y" * 998, "z" * 999, "caf\u00e9", "=3D", "\x0b", "\x0c", "\x1c", "\u2028", ""]
_HEADER_VALUES = ["Hello", "", "=?utf-8?q?x?=", "caf\u00e9", "a " * 480, "x" * 990, "tab\there", "Hi\r\nthere"]


def _bodies(rng: random.Random, count: int) -> list[str]:
    return ["".join(rng.choice(_BODY_PIECES) for _ in range(rng.randrange(0, 8))) for _ in range(count)]


def _shapes(rng: random.Random):
    """(parts, headers, boundary) as message_bytes() hands them to either writer."""
    for text, html in zip(_bodies(rng, 400), _bodies(rng, 400), strict=True):
        extra = {"Reply-To": "Help <help@example.com>"} if rng.random() < 0.3 else {}
        if rng.random() < 0.3:
            extra["List-Unsubscribe"] = "<https://example.com/u/" + "t" * rng.choice([10, 980, 2000]) + ">"
        email = outgoing(text=rng.choice([text, None]), html=rng.choice([html, None]),
                         content=RenderedEmail(subject=rng.choice(_HEADER_VALUES), text=text, html=html),
                         to=rng.choice(["ada@example.com", "Ada <ada@example.com>"]), headers=extra)
        kinds = [(subtype, body) for subtype, body in (("plain", text), ("html", html)) if body is not None]
        for parts in (kinds, kinds[:1], kinds[1:] or kinds):
            yield parts, _headers(email, MAIL_FROM), "=_" + uuid.uuid4().hex if len(parts) == 2 else None


def test_the_direct_writer_writes_the_email_packages_bytes_or_leaves_the_message_to_it():
    written = 0
    for parts, headers, boundary in _shapes(random.Random(20261203)):
        direct = _plain_message(parts, headers, boundary)
        if direct is not None:
            written += 1
            assert direct == _library_message(parts, headers, boundary), (parts, headers)
    assert written > 300  # the usual message is written directly, not left to the email package


def test_a_template_email_is_written_directly():
    from notifier.rendering import Renderer

    content = Renderer("templates").render("order_confirmation", {
        "order_id": "A-1001", "name": "Ada", "items": [{"name": "Mug", "quantity": 2, "price": "9.50"}],
        "total": "19.00"},
        "https://example.com/unsubscribe/abc")
    email = outgoing(content=content, headers={"List-Unsubscribe": "<https://example.com/unsubscribe/abc>"})
    parts = [("plain", content.text), ("html", content.html)]
    headers = _headers(email, "Acme Support <support@example.com>")

    direct = _plain_message(parts, headers, "=_b")

    assert direct is not None and direct == _library_message(parts, headers, "=_b")


@pytest.mark.parametrize("body", [b"", b".", b"..", b".a\r\nb", b"a\r\n.b", b"a\n.", b"a.b\r\n", b"a\r.b",
                                  b"a\r\n\r\n.\r\n", b"x" * 5000, b"no dot at a line's start\r\n" * 200 + b"."])
def test_periods_are_doubled_as_smtplib_doubles_them(body):
    assert _periods_doubled(body) == smtplib._quote_periods(body)
