"""Delivery on real parts: PostgreSQL, Redis, an RQ worker and a real SMTP server receiving the mail."""

from __future__ import annotations

import gc
import re
import socket
import threading
import time
from dataclasses import replace
from datetime import timedelta

import pytest
from rq import Queue
from rq.timeouts import JobTimeoutException, UnixSignalDeathPenalty

from app import create_app
from notifier import devmail, jobs, unsubscribe
from notifier.db import database
from notifier.errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from notifier.jobs import Deliverer
from notifier.mail import OutgoingEmail, SmtpMailer
from notifier.models import Notification, utcnow
from notifier.queues import QUEUE_NAMES, enqueue_delivery, job_id_for
from notifier.reconciler import BATCH, reconcile
from notifier.rendering import literal
from notifier.runtime import make_renderer
from tests.helpers import LITERAL, VERIFICATION, installed_deliverer, make_notification, reload, run_worker_until_idle

pytestmark = pytest.mark.integration


def _email(to: str) -> OutgoingEmail:
    return OutgoingEmail(notification_id=f"n-{to}", to=to, content=literal("Hello", "Hello there.", None))


def _send(client, headers, path="/api/notifications/send", **payload):
    response = client.post(path, json=payload, headers=headers)
    assert response.status_code == 202, response.get_data(as_text=True)
    return response.get_json()["id"]


def test_sent_email_has_headers_and_both_parts(client, headers, deliverer, smtp, redis_conn):
    notification_id = _send(client, headers, "/api/notifications/send-verification", **VERIFICATION)
    run_worker_until_idle(redis_conn)

    (received,) = smtp.wait_for(1)
    message = received.message
    assert received.rcpt_tos == ["ada@example.com"]
    assert message["To"] == "ada@example.com"
    assert message["From"] == "notifier@example.com"
    assert message["Subject"] == "Verify your email address"
    assert message["X-Notification-ID"] == notification_id
    assert message["Message-ID"] == f"<{notification_id}@example.com>"
    assert message.get_content_type() == "multipart/alternative"
    text, html = message.get_payload()
    assert text.get_content_type() == "text/plain" and "123456" in text.get_content()
    assert html.get_content_type() == "text/html" and "123456" in html.get_content()
    assert "Ada" in text.get_content()

    notification = reload(notification_id)
    assert notification.status == "sent"
    assert notification.attempts == 1
    assert notification.message_id == message["Message-ID"]
    assert notification.sent_at is not None
    detail = client.get(f"/api/notifications/{notification_id}", headers=headers).get_json()
    assert [e["status"] for e in detail["history"]] == ["queued", "sending", "sent"]
    assert detail["history"][-1]["smtp_code"] == 250


def test_date_gives_its_zone_as_an_offset_not_the_obsolete_gmt(client, headers, deliverer, smtp, redis_conn):
    _send(client, headers, **LITERAL)
    run_worker_until_idle(redis_conn)

    (received,) = smtp.wait_for(1)
    (date,) = [line for line in received.data.split(b"\r\n") if line.startswith(b"Date:")]
    assert re.fullmatch(rb"Date: \w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} \+0000", date), date
    assert received.message["Date"].datetime.utcoffset() == timedelta(0)


@pytest.mark.parametrize("subject", ["=?utf-8?q?You_won?= (not really)", "Re: =?x?= and =?utf-8?b?SGk=?="])
def test_a_subject_that_reads_as_an_encoded_word_arrives_as_written(client, headers, deliverer, smtp,
                                                                     redis_conn, subject):
    _send(client, headers, **{**LITERAL, "subject": subject})
    run_worker_until_idle(redis_conn)

    (received,) = smtp.wait_for(1)
    assert received.message["Subject"] == subject
    assert not received.message.defects


def test_the_text_part_made_from_html_only_keeps_where_its_links_go(client, headers, deliverer, smtp, redis_conn):
    html = ("<p>Confirm your address: <a href='https://example.com/confirm?t=abc&amp;u=1'>Confirm</a></p>"
            "<table><tr><td>Mug</td><td>2</td></tr></table><p><a href='#top'>Back to top</a></p>")
    _send(client, headers, to="bob@example.com", subject="Confirm", html=html)
    run_worker_until_idle(redis_conn)

    text, _ = smtp.wait_for(1)[0].message.get_payload()
    assert text.get_content().splitlines() == [
        "Confirm your address: Confirm <https://example.com/confirm?t=abc&u=1>", "", "Mug 2", "", "Back to top"]


@pytest.mark.parametrize("length", [100, 980, 2000])
def test_list_unsubscribe_is_never_encoded_and_a_long_link_is_folded_inside_its_brackets(pg_settings, smtp, length):
    # A token this long comes from a user_id of 200 characters beyond the Basic Multilingual Plane.
    url = "https://example.com/unsubscribe/" + "A" * length
    email = OutgoingEmail(notification_id="n-unsubscribe", to="ann@example.com",
                          content=literal("Hello", "Hello there.", None), headers=unsubscribe.headers(url))
    mailer = SmtpMailer(pg_settings)
    try:
        mailer.send(email)
    finally:
        mailer.close()

    (received,) = smtp.wait_for(1)
    assert max(map(len, received.data.split(b"\r\n"))) <= 998
    head = received.data.split(b"\r\n\r\n", 1)[0]
    assert b"=?" not in head
    field = str(received.message["List-Unsubscribe"])
    assert "".join(field.split()) == f"<{url}>"  # RFC 2369: whitespace inside the brackets is ignored
    assert (" " in field) == (length > 900)  # folded only where one line cannot hold it
    assert received.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_the_ehlo_name_is_smtp_helo_name_when_set(pg_settings, smtp):
    # smtplib gives the machine's fully qualified name, or an address literal ([127.0.0.1]) in a
    # container without one, which spam filters score against the mail.
    email = OutgoingEmail(notification_id="n-helo", to="ann@example.com", content=literal("Hi", "Hi.", None))
    mailer = SmtpMailer(replace(pg_settings, smtp_helo_name="mail.notifier.example"))
    try:
        mailer.send(email)
    finally:
        mailer.close()
    (received,) = smtp.wait_for(1)
    assert received.helo == "mail.notifier.example"


class _SevenBitOnly(devmail.CaptureHandler):
    """A server that offers neither 8BITMIME nor SMTPUTF8 (aiosmtpd offers 8BITMIME unasked)."""

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        responses = await super().handle_EHLO(server, session, envelope, hostname, responses)
        return [line for line in responses if "8BITMIME" not in line and "SMTPUTF8" not in line]


def test_mail_beyond_ascii_goes_out_in_seven_bits_to_a_server_without_8bitmime(pg_settings):
    handler = _SevenBitOnly()
    server = devmail.start(handler)
    html = "<p dir='auto'>שלום, Ωmega 👩‍👩‍👧‍👦 <a href='https://example.com/ü'>weiter</a></p>"
    email = OutgoingEmail(notification_id="n-seven-bit", to="ann@example.com",
                          content=literal("Grüße 🎉 " + "é" * 300, "Zoë " + "ø" * 2000 + "\n", html))
    mailer = SmtpMailer(replace(pg_settings, mail_from='"Café Ünïcode, Ltd" <no-reply@example.com>',
                                smtp_port=server.port))
    try:
        mailer.send(email)
    finally:
        mailer.close()
        server.stop()

    (received,) = handler.messages
    assert received.data.isascii()
    assert max(map(len, received.data.split(b"\r\n"))) <= 998
    message = received.message
    assert message["Subject"] == "Grüße 🎉 " + "é" * 300
    assert message["From"].addresses[0].display_name == "Café Ünïcode, Ltd"
    text, html_part = message.get_payload()
    assert text.get_content().replace("\r\n", "\n") == "Zoë " + "ø" * 2000 + "\n"
    assert html_part.get_content().strip() == html
    assert not any(part.defects for part in message.walk())


@pytest.mark.parametrize("to", ["jösé@example.com", "ada@bücher.example"])
def test_an_address_beyond_ascii_stored_before_the_api_refused_them_fails_at_once(api_key, deliverer, smtp,
                                                                                   redis_conn, to):
    # No retry can send it: SMTP without SMTPUTF8 carries no such address, and the message's To header
    # could not even be written. It used to count as transient and use up every retry first.
    notification = make_notification(api_key[0], to=to)
    enqueue_delivery(redis_conn, deliverer.settings, notification.id, notification.priority, 0)
    run_worker_until_idle(redis_conn)

    failed = reload(notification.id)
    assert (failed.status, failed.attempts) == ("failed", 1)
    assert "not ASCII" in failed.last_error
    assert smtp.count() == 0


@pytest.mark.parametrize(("mail_from", "written", "name"), [
    ("Acme Inc. <no-reply@example.com>", b'"Acme Inc." <no-reply@example.com>', "Acme Inc."),
    ("no-reply@example.com (Acme)", b"Acme <no-reply@example.com>", "Acme"),
    ("no-reply@example.com", b"no-reply@example.com", ""),
    ('"O\'Brien, \\"Ops\\"" <no-reply@example.com>', b'"O\'Brien, \\"Ops\\"" <no-reply@example.com>',
     'O\'Brien, "Ops"'),
])
def test_from_is_written_in_current_syntax_whatever_mail_froms_spelling(pg_settings, smtp, mail_from, written, name):
    mailer = SmtpMailer(replace(pg_settings, mail_from=mail_from))
    try:
        mailer.send(_email("ann@example.com"))
    finally:
        mailer.close()

    (received,) = smtp.wait_for(1)
    assert f"From: {written.decode()}\r\n".encode() in received.data
    (sender,) = received.message["From"].addresses
    assert (sender.display_name, sender.addr_spec) == (name, "no-reply@example.com")
    assert not received.message["From"].defects
    assert received.mail_from == "no-reply@example.com"


def test_every_email_says_it_is_auto_generated_and_carries_reply_to_when_set(api_key, pg_settings, pg_db, smtp,
                                                                              redis_conn):
    # Auto-Submitted (RFC 3834) keeps vacation responders from answering MAIL_FROM; REPLY_TO is where a
    # reader's answer goes, its display name written as From's is, beyond ASCII too.
    settings = replace(pg_settings, reply_to="Équipe d'aide <help@example.com>")
    mailer = SmtpMailer(settings)
    jobs.install(Deliverer(settings, mailer, make_renderer(settings)))
    try:
        notification = make_notification(api_key[0])
        enqueue_delivery(redis_conn, settings, notification.id, notification.priority, 0)
        run_worker_until_idle(redis_conn)
    finally:
        jobs.install(None)
        mailer.close()

    (received,) = smtp.wait_for(1)
    assert received.message["Auto-Submitted"] == "auto-generated"
    (reply_to,) = received.message["Reply-To"].addresses
    assert (reply_to.display_name, reply_to.addr_spec) == ("Équipe d'aide", "help@example.com")
    assert received.data.split(b"\r\n\r\n", 1)[0].isascii()


def test_no_reply_to_header_unless_reply_to_is_set(api_key, deliverer, smtp, redis_conn):
    notification = make_notification(api_key[0])
    enqueue_delivery(redis_conn, deliverer.settings, notification.id, notification.priority, 0)
    run_worker_until_idle(redis_conn)

    (received,) = smtp.wait_for(1)
    assert received.message["Reply-To"] is None and received.message["Auto-Submitted"] == "auto-generated"


@pytest.mark.parametrize("subject", ["Grüße " * 30, "é" * 500, "👩‍👩‍👧‍👦" * 40, "a" * 990 + " é", "Ωmega " + "x" * 950])
def test_encoded_words_of_a_subject_keep_to_rfc_2047s_lengths(client, headers, deliverer, smtp, redis_conn, subject):
    _send(client, headers, **{**LITERAL, "subject": subject})
    run_worker_until_idle(redis_conn)

    (received,) = smtp.wait_for(1)
    head = received.data.split(b"\r\n\r\n", 1)[0].decode("ascii")
    lines = head.split("\r\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("Subject:"))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith(" "))
    words = re.findall(r"=\?[^?]+\?[bqBQ]\?[^?]*\?=", "\r\n".join(lines[start:end]))
    assert words and max(map(len, words)) <= 75  # RFC 2047 section 2
    assert max(len(line) for line in lines[start:end]) <= 76  # "each line ... is limited to 76 characters"
    assert received.message["Subject"] == " ".join(subject.split())


def test_caller_data_is_escaped_in_html(client, headers, deliverer, smtp, redis_conn):
    _send(client, headers, "/api/notifications/send-verification", **{**VERIFICATION, "name": "<script>x</script>"})
    run_worker_until_idle(redis_conn)
    _, html = smtp.wait_for(1)[0].message.get_payload()
    assert "<script>" not in html.get_content()
    assert "&lt;script&gt;" in html.get_content()


def test_literal_email_is_sent_as_given(client, headers, deliverer, smtp, redis_conn):
    _send(client, headers, **{**LITERAL, "text": "Hello {{ 7*7 }}"})
    run_worker_until_idle(redis_conn)
    text, html = smtp.wait_for(1)[0].message.get_payload()
    assert text.get_content().strip() == "Hello {{ 7*7 }}"
    assert html.get_content().strip() == "<p>HTML body</p>"


def test_451_is_retried_then_delivered(client, headers, deliverer, smtp, redis_conn):
    smtp.replies.append("451 4.3.0 try again later")
    notification_id = _send(client, headers, **LITERAL)
    run_worker_until_idle(redis_conn)

    assert len(smtp.wait_for(1)) == 1
    notification = reload(notification_id)
    assert notification.status == "sent"
    assert notification.attempts == 2
    detail = client.get(f"/api/notifications/{notification_id}", headers=headers).get_json()
    statuses = [e["status"] for e in detail["history"]]
    assert statuses == ["queued", "sending", "retrying", "sending", "sent"]
    retry = detail["history"][2]
    # The server's words as it wrote them; what notifier made of them is the reason.
    assert (retry["smtp_code"], retry["smtp_reply"]) == (451, "4.3.0 try again later")
    assert retry["reason"] == "SMTP error: 451 4.3.0 try again later"


def test_550_fails_at_once_without_retry(client, headers, deliverer, smtp, redis_conn):
    smtp.replies.append("550 5.7.1 message rejected by policy")
    notification_id = _send(client, headers, **LITERAL)
    run_worker_until_idle(redis_conn)

    assert smtp.count() == 0
    notification = reload(notification_id)
    assert notification.status == "failed"
    assert notification.attempts == 1
    assert "550" in notification.last_error and "rejected by policy" in notification.last_error
    (dead,) = client.get("/api/dead-letters", headers=headers).get_json()["data"]
    assert (dead["smtp_code"], dead["smtp_reply"]) == (550, "5.7.1 message rejected by policy")
    failed = Queue(QUEUE_NAMES["default"], connection=redis_conn).failed_job_registry
    assert failed.get_job_ids() == [f"notification-{notification_id}"]


def test_refused_recipient_is_permanent(client, headers, deliverer, smtp, redis_conn):
    smtp.rcpt_replies.append("550 5.1.1 mailbox unavailable")
    notification_id = _send(client, headers, **LITERAL)
    run_worker_until_idle(redis_conn)
    notification = reload(notification_id)
    assert (notification.status, notification.attempts) == ("failed", 1)
    assert "recipient refused" in notification.last_error


def test_a_sender_refused_at_mail_from_fails_the_email_but_never_suppresses_the_recipient(
        client, headers, deliverer, smtp, redis_conn):
    # A relay refusing our MAIL_FROM (a typo, an SPF policy) says nothing of the recipient, even in
    # a mailbox code: suppressing would silence every address mailed while it lasts, for good.
    smtp.mail_replies.append("553 5.1.3 sender address syntax invalid")
    notification_id = _send(client, headers, **LITERAL)
    run_worker_until_idle(redis_conn)
    notification = reload(notification_id)
    assert (notification.status, notification.attempts) == ("failed", 1)
    assert client.get("/api/suppressions", headers=headers).get_json()["data"] == []
    assert "sender refused: 553 5.1.3" in notification.last_error

    again = _send(client, headers, **LITERAL)
    run_worker_until_idle(redis_conn)
    assert reload(again).status == "sent" and smtp.count() == 1


def test_a_nul_in_the_servers_reply_is_recorded_and_the_email_sent_once(client, headers, deliverer, smtp,
                                                                        redis_conn):
    # PostgreSQL holds no NUL in text: the `sent` record failed after the server took the message,
    # so the reconciler recovered it as lost and sent it again (three copies in all).
    smtp.replies.append("250 2.0.0 queued as \x00X")
    notification_id = _send(client, headers, **LITERAL)
    run_worker_until_idle(redis_conn)
    notification = reload(notification_id)
    assert (notification.status, notification.attempts) == ("sent", 1)
    assert notification.sent_at is not None
    detail = client.get(f"/api/notifications/{notification_id}", headers=headers).get_json()
    assert detail["history"][-1]["smtp_reply"] == "2.0.0 queued as \ufffdX"
    reconcile(deliverer.settings, redis_conn, now=utcnow() + timedelta(hours=1))
    run_worker_until_idle(redis_conn)
    assert smtp.count() == 0  # the scripted reply took the only copy; another would be kept here


def test_a_kept_connection_the_server_closed_is_replaced_without_a_retry(pg_settings):
    # An SMTP server restarted (or a relay dropping clients idle for less than IDLE_PROBE_SECONDS)
    # leaves the worker's kept connection dead: nothing of the next message reaches the server on
    # it, so it goes out on a new connection at once, not a retry interval (60 s) later.
    first, second = devmail.CaptureHandler(), devmail.CaptureHandler()
    server = devmail.start(first)
    mailer = SmtpMailer(replace(pg_settings, smtp_port=server.port))
    try:
        mailer.send(_email("ann@example.com"))
        server.stop()
        server = devmail.start(second, port=server.port)
        result = mailer.send(_email("bob@example.com"))
    finally:
        mailer.close()
        server.stop()
    assert result.smtp_code == 250
    assert [m.rcpt_tos for m in first.messages + second.messages] == [["ann@example.com"], ["bob@example.com"]]


def test_lines_starting_with_a_dot_arrive_as_written(pg_settings):
    # SMTP ends a message at a line holding "." alone: each line starting with "." goes out with it
    # doubled, and the server takes one off again.
    capture = devmail.CaptureHandler()
    server = devmail.start(capture)
    mailer = SmtpMailer(replace(pg_settings, smtp_port=server.port))
    text = ".first\n.\nmiddle\n..two\n. last\n"
    try:
        mailer.send(OutgoingEmail(notification_id="3f1c2a9e-0000-4000-8000-000000000002", to="ann@example.com",
                                  content=literal("Dots", text, None)))
        mailer.send(_email("bob@example.com"))  # and the connection goes on
    finally:
        mailer.close()
        server.stop()
    assert [m.rcpt_tos for m in capture.messages] == [["ann@example.com"], ["bob@example.com"]]
    assert capture.messages[0].message.get_content().replace("\r\n", "\n") == text


@pytest.mark.parametrize("stop", [JobTimeoutException, SystemExit], ids=["job-limit", "process-exit"])
def test_a_send_cut_off_by_the_job_limit_hangs_up_without_quit(pg_settings, stop):
    # RQ's time limit cut a send off while the server was still answering DATA. Closing the
    # connection said QUIT, which waited for that answer (up to SMTP_TIMEOUT), and the server, never
    # left, delivered the email about to be recorded as not sent: its retry sent it a second time.
    # A worker made to exit mid-send (a second SIGTERM) left the QUIT to yagmail as the process ended.
    handler = devmail.CaptureHandler()
    handler.delay = 2.0
    server = devmail.start(handler)
    mailer = SmtpMailer(replace(pg_settings, smtp_port=server.port, smtp_timeout=5))
    try:
        started = time.monotonic()
        with pytest.raises(stop), UnixSignalDeathPenalty(1, stop):
            mailer.send(_email("ann@example.com"))  # the same exception: the job stops, no email failed
        waited = time.monotonic() - started
        gc.collect()  # what is left of the connection says nothing either
        time.sleep(1.5)  # past the server's answer
    finally:
        mailer.close()
        server.stop()
    assert waited < 1.8, waited  # the limit, and no wait for an answer
    assert handler.messages == []  # the server saw us hang up before it answered, and kept nothing


def test_a_refused_login_leaves_no_half_open_connection_to_say_quit_later(pg_settings):
    # yagmail says QUIT when a client object is collected: one whose login failed, never kept by the
    # mailer, did so wherever the collection happened, waiting up to SMTP_TIMEOUT for an answer.
    listener = socket.create_server(("127.0.0.1", 0))
    said: list[bytes] = []

    def serve():
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b"220 odd ESMTP\r\n")
            for line in lines:
                said.append(line.split()[0].upper())
                if said[-1] == b"EHLO":
                    conn.sendall(b"250-odd\r\n250 AUTH PLAIN\r\n")
                elif said[-1] == b"AUTH":
                    conn.sendall(b"535 5.7.8 authentication failed\r\n")
                else:
                    conn.sendall(b"221 bye\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    settings = replace(pg_settings, smtp_port=listener.getsockname()[1], smtp_username="notifier",
                       smtp_password="wrong")
    try:
        SmtpMailer(settings).send(_email("ann@example.com"))
    except TransientDeliveryError as exc:
        code = exc.smtp_code
    gc.collect()  # the exception and its frames are gone: so is the client they held
    thread.join(5)
    listener.close()
    assert code == 535
    assert said == [b"EHLO", b"AUTH"], said  # and no QUIT: the socket was closed


class _Writes:
    """The SMTP connection's socket, keeping what each write sent (to see which commands went together)."""

    def __init__(self, sock):
        self.sock, self.sent = sock, []

    def sendall(self, data, *args):
        self.sent.append(bytes(data))
        return self.sock.sendall(data, *args)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def _writes_of_one_send(settings, to: str) -> tuple[list[bytes], object]:
    mailer = SmtpMailer(settings)
    try:
        smtp = mailer._connection()
        smtp.sock = writes = _Writes(smtp.sock)
        result = mailer.send(_email(to))
        sent = list(writes.sent)  # not the QUIT of close()
    finally:
        mailer.close()
    # From the first command of the send (the connection's EHLO and its idle probe come before).
    first = next(i for i, w in enumerate(sent) if w.startswith(b"mail "))
    return sent[first:], result


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-at-a-time"])
def test_mail_rcpt_and_data_go_in_one_write_where_the_server_offers_pipelining(pg_settings, pipelining):
    handler = devmail.CaptureHandler(pipelining=pipelining)
    server = devmail.start(handler)
    try:
        sent, result = _writes_of_one_send(replace(pg_settings, smtp_port=server.port), "ann@example.com")
    finally:
        server.stop()
    assert result.smtp_code == 250 and [m.rcpt_tos for m in handler.messages] == [["ann@example.com"]]
    envelope = [b"mail FROM:<", b"rcpt TO:<ann@example.com>\r\n", b"data\r\n"]
    if pipelining:  # two round trips fewer: the replies to all three are read after one write
        assert sent[0].startswith(envelope[0]) and sent[0].endswith(envelope[1] + envelope[2]), sent
        assert len(sent) == 2  # then the message
    else:
        assert [w[: len(e)] for w, e in zip(sent, envelope, strict=False)] == envelope and len(sent) == 4, sent
    assert sent[-1].endswith(b"\r\n.\r\n") and b"Hello there." in sent[-1]


def _send_to_raw_server(settings, converse) -> DeliveryError:
    """Send one email to a raw-socket SMTP server, converse(conn, lines) answering after its
    greeting, and return the error the send ends in."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as lines:  # takes in all a write holds: the close sends no RST
            conn.sendall(b"220 odd ESMTP\r\n")
            converse(conn, lines)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    mailer = SmtpMailer(replace(settings, smtp_port=listener.getsockname()[1]))
    try:
        with pytest.raises(DeliveryError) as failed:
            mailer.send(_email("gone@example.com"))
    finally:
        mailer.close()
        thread.join(5)
        listener.close()
    return failed.value


def test_a_server_that_takes_data_after_refusing_the_recipient_gets_an_empty_message(pg_settings):
    # RFC 2920 lets a server answer the pipelined DATA with 354 though it refused every recipient:
    # the client must then end the (empty) message, and the send fails as a refused recipient.
    seen: list[bytes] = []

    def converse(conn, lines):
        for line in lines:
            seen.append(line)
            verb = line[:4].upper()
            if verb == b"EHLO":
                conn.sendall(b"250-odd\r\n250-PIPELINING\r\n250 HELP\r\n")
            elif verb == b"DATA":
                conn.sendall(b"250 OK\r\n550 5.1.1 no such user\r\n354 go ahead\r\n")
            elif line == b".\r\n":
                conn.sendall(b"554 5.5.1 no valid recipients\r\n")
            elif verb in (b"RSET", b"QUIT"):
                conn.sendall(b"250 OK\r\n" if verb == b"RSET" else b"221 bye\r\n")
                if verb == b"QUIT":
                    return

    refused = _send_to_raw_server(pg_settings, converse)
    assert isinstance(refused, PermanentDeliveryError)
    assert refused.smtp_code == 550 and refused.address_rejected
    ended = seen.index(b".\r\n")  # the empty message, then the reset
    assert seen[ended - 1].upper() == b"DATA\r\n" and seen[ended + 1].upper() == b"RSET\r\n", seen


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-at-a-time"])
@pytest.mark.parametrize(("verb", "reply", "error", "address_rejected"), [
    (b"MAIL", b"421 4.7.0 Try again later, closing connection", TransientDeliveryError, False),
    (b"MAIL", b"554 5.7.1 Client host blocked", PermanentDeliveryError, False),
    (b"RCPT", b"421 4.7.0 Too many errors, closing connection", TransientDeliveryError, False),
    (b"RCPT", b"550 5.1.1 no such user", PermanentDeliveryError, True),
], ids=["421-to-MAIL", "554-to-MAIL", "421-to-RCPT", "550-to-RCPT"])
def test_a_refusal_the_server_hangs_up_after_is_what_the_send_fails_with(
        pg_settings, pipelining, verb, reply, error, address_rejected):
    # A server that refuses MAIL or RCPT may close at once (421 says it will), leaving the replies
    # to the rest of a pipelined group unread: the refusal, not the closed connection, is the reason.
    ehlo = b"250-odd\r\n250-PIPELINING\r\n250 HELP\r\n" if pipelining else b"250-odd\r\n250 HELP\r\n"

    def converse(conn, lines):
        for line in lines:
            command = line[:4].upper()
            if command == verb:
                conn.sendall(reply + b"\r\n")
                return
            conn.sendall(ehlo if command == b"EHLO" else b"250 OK\r\n")

    failed = _send_to_raw_server(pg_settings, converse)
    code = int(reply[:3])
    assert type(failed) is error and failed.smtp_code == code, failed
    assert reply.decode()[4:] in str(failed) and failed.address_rejected is address_rejected


def test_exhausted_retries_end_failed_in_the_failed_registry(client, headers, deliverer, smtp, redis_conn):
    attempts = deliverer.settings.max_attempts
    smtp.replies.extend(["451 4.4.1 still busy"] * attempts)
    notification_id = _send(client, headers, **LITERAL)
    run_worker_until_idle(redis_conn)

    assert smtp.count() == 0
    notification = reload(notification_id)
    assert notification.status == "failed"
    assert notification.attempts == attempts
    assert "still busy" in notification.last_error
    failed = Queue(QUEUE_NAMES["default"], connection=redis_conn).failed_job_registry
    assert failed.get_job_ids() == [f"notification-{notification_id}"]
    job = failed.get_job_ids() and Queue(QUEUE_NAMES["default"], connection=redis_conn).fetch_job(
        f"notification-{notification_id}")
    assert "RetriesExhausted" in job.latest_result().exc_string
    # The dead letter stays DEAD_LETTER_TTL_DAYS (about 6 KB of Redis each, for every bounce).
    ttl = failed.connection.zscore(failed.key, job.id) - time.time()
    assert 29 * 86400 < ttl <= deliverer.settings.dead_letter_ttl_days * 86400 == 30 * 86400
    assert 29 * 86400 < redis_conn.ttl(job.key) <= 30 * 86400


def test_high_priority_is_sent_before_a_low_backlog(client, headers, deliverer, smtp, redis_conn):
    for i in range(5):
        _send(client, headers, **{**LITERAL, "to": f"low{i}@example.com", "priority": "low"})
    _send(client, headers, **{**LITERAL, "to": "default@example.com"})
    _send(client, headers, **{**LITERAL, "to": "high@example.com", "priority": "high"})
    run_worker_until_idle(redis_conn)

    order = [m.rcpt_tos[0] for m in smtp.wait_for(7)]
    assert order[:2] == ["high@example.com", "default@example.com"]
    assert sorted(order[2:]) == [f"low{i}@example.com" for i in range(5)]


def test_same_job_enqueued_twice_sends_once(client, headers, deliverer, smtp, redis_conn, pg_settings):
    notification_id = _send(client, headers, **LITERAL)
    # A second copy of the job, as a retry racing a recovery would make.
    enqueue_delivery(redis_conn, pg_settings, notification_id, "high")
    run_worker_until_idle(redis_conn)
    assert smtp.count() == 1
    assert reload(notification_id).attempts == 1


def test_smtp_server_down_is_transient(headers, pg_settings, pg_db, redis_conn, smtp):
    from dataclasses import replace

    from app import create_app
    from notifier import jobs
    from notifier.jobs import Deliverer
    from notifier.mail import SmtpMailer
    from notifier.runtime import make_renderer

    down = replace(pg_settings, smtp_port=1, retry_intervals=(3600,))
    client = create_app(down, redis=redis_conn).test_client()
    jobs.install(Deliverer(down, SmtpMailer(down), make_renderer(down)))
    try:
        notification_id = _send(client, headers, **LITERAL)
        run_worker_until_idle(redis_conn)
    finally:
        jobs.install(None)
    notification = reload(notification_id)
    assert notification.status == "retrying"
    assert "connection" in notification.last_error.lower()
    # No server answered: the history names no reply of one (the dead-letter list showed the reason twice).
    retry = client.get(f"/api/notifications/{notification_id}", headers=headers).get_json()["history"][-1]
    assert retry["status"] == "retrying" and retry["smtp_code"] is None and retry["smtp_reply"] is None
    scheduled = Queue(QUEUE_NAMES["default"], connection=redis_conn).scheduled_job_registry
    assert scheduled.get_job_ids() == [f"notification-{notification_id}"]


def test_a_backlog_redis_lost_is_queued_again_in_one_reconciler_pass(client, headers, deliverer, smtp, redis_conn):
    # More than one of the reconciler's pages: it used to put back 500 a pass (one every 30 s).
    count = BATCH + 100
    ids = []
    for start in range(0, count, 1000):
        items = [{**LITERAL, "to": f"r{n}@example.com"} for n in range(start, min(count, start + 1000))]
        response = client.post("/api/notifications/batch", json={"notifications": items}, headers=headers)
        assert response.status_code == 202, response.get_data(as_text=True)
        ids += [r["id"] for r in response.get_json()["results"]]
    redis_conn.flushdb()  # Redis restarted empty: the batch's jobs are gone
    with database.connection_context():
        Notification.update(updated_at=utcnow() - timedelta(minutes=5)).execute()
        # A pass stops taking pages at half of RECONCILE_INTERVAL: a busy machine is not what this tests.
        assert reconcile(replace(deliverer.settings, reconcile_interval=600), redis_conn).requeued == count
    run_worker_until_idle(redis_conn)
    received = smtp.wait_for(count, timeout=60)
    assert sorted(r.rcpt_tos[0] for r in received) == sorted(f"r{n}@example.com" for n in range(count))
    assert {reload(i).status for i in ids} == {"sent"}


def test_a_finished_job_leaves_redis_after_finished_job_ttl(pg_settings, app, headers, deliverer, smtp, redis_conn):
    # Each finished job holds about 6 KB of Redis while RQ keeps it: an hour of them at a few
    # hundred emails a second was gigabytes. PostgreSQL keeps the outcome.
    notification_id = _send(app.test_client(), headers, **LITERAL)
    run_worker_until_idle(redis_conn)
    smtp.wait_for(1)
    assert reload(notification_id).status == "sent"
    kept = list(redis_conn.scan_iter(f"*{job_id_for(notification_id)}*"))
    assert kept, "RQ keeps the finished job a while, for rq-dashboard"
    assert all(0 < redis_conn.ttl(key) <= pg_settings.finished_job_ttl == 60 for key in kept)


def test_a_template_edited_to_raise_after_the_send_was_accepted_fails_at_once(pg_settings, pg_db, api_key, smtp,
                                                                             redis_conn, tmp_path):
    # TEMPLATES_DIR is read at each render: an edit reaches what was accepted before it. One that
    # raises (here a division by zero) fails the same on every attempt: a dead letter with its
    # reason at once, not RETRY_INTERVALS' worth of retries.
    (tmp_path / "email").mkdir()
    (tmp_path / "email" / "share.subject.txt").write_text("Your share")
    template = tmp_path / "email" / "share.txt"
    template.write_text("{{ total }} in all")
    settings = replace(pg_settings, templates_dir=str(tmp_path))
    client = create_app(settings, redis=redis_conn).test_client()
    notification_id = _send(client, {"X-API-Key": api_key[1]}, to="bob@example.com", template="share",
                            data={"total": 10, "people": 0})
    template.write_text("{{ total / people }} each")

    with installed_deliverer(settings, redis_conn):
        run_worker_until_idle(redis_conn)

    assert smtp.count() == 0
    notification = reload(notification_id)
    assert (notification.status, notification.attempts) == ("failed", 1)
    assert "template 'share': ZeroDivisionError" in notification.last_error
    failed = Queue(QUEUE_NAMES["default"], connection=redis_conn).failed_job_registry
    assert failed.get_job_ids() == [job_id_for(notification_id)]


@pytest.mark.parametrize("missing, said", [("share.txt", "unknown template 'share'"),
                                           ("_layout.txt", "template 'share': email/_layout.txt is missing")])
def test_a_template_missing_when_its_send_is_tried_is_retried_until_it_is_back(pg_settings, pg_db, api_key, smtp,
                                                                               redis_conn, tmp_path, caplog,
                                                                               missing, said):
    # A rolling deploy: the new release's API takes sends of a template its files add, and a worker of
    # the release before has no such template yet (or the layout it extends). Failed for good at the
    # first attempt, every such send was a dead letter; the template comes back, the send goes out.
    (tmp_path / "email").mkdir()
    (tmp_path / "email" / "share.subject.txt").write_text("Your share")
    (tmp_path / "email" / "share.txt").write_text('{% extends "email/_layout.txt" %}{% block content %}'
                                                 '{{ total }} in all{% endblock %}')
    (tmp_path / "email" / "_layout.txt").write_text("{% block content %}{% endblock %}")
    body = tmp_path / "email" / missing
    settings = replace(pg_settings, templates_dir=str(tmp_path), retry_intervals=(3600,))
    client = create_app(settings, redis=redis_conn).test_client()
    notification_id = _send(client, {"X-API-Key": api_key[1]}, to="bob@example.com", template="share",
                            data={"total": 10})
    body.rename(tmp_path / missing)

    with installed_deliverer(settings, redis_conn), caplog.at_level("ERROR"):
        run_worker_until_idle(redis_conn)
        notification = reload(notification_id)
        assert (notification.status, notification.attempts) == ("retrying", 1)
        assert said in notification.last_error
        assert any(said in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
        scheduled = Queue(QUEUE_NAMES["default"], connection=redis_conn).scheduled_job_registry
        assert scheduled.get_job_ids() == [job_id_for(notification_id)]

        (tmp_path / missing).rename(body)
        assert jobs.deliver(notification_id) == "sent"  # the retry, as RQ runs it when it is due

    assert smtp.count() == 1 and "10 in all" in smtp.messages[0].message.get_content()
