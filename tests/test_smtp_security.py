"""SMTP over TLS and with a login, against real aiosmtpd servers: the server's certificate is checked
(SMTP_CA_FILE names what to trust), and the login name is the one configured."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from dataclasses import replace

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from notifier import devmail
from notifier.config import Settings
from notifier.errors import TransientDeliveryError
from notifier.mail import OutgoingEmail, SmtpMailer, classify
from notifier.rendering import literal


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[str, ssl.SSLContext]:
    """A self-signed certificate for 127.0.0.1: (its PEM file, a server context that presents it)."""
    assert shutil.which("openssl"), "the openssl command makes the certificate (.ci/run installs it)"
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=notifier-test", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return str(cert), context


def _server(handler, **parameters) -> Controller:
    controller = Controller(handler, hostname="127.0.0.1", port=devmail._free_port("127.0.0.1"), **parameters)
    controller.start()
    return controller


def _send(settings: Settings) -> None:
    mailer = SmtpMailer(settings)
    try:
        mailer.send(OutgoingEmail(notification_id="n-tls", to="ann@example.com",
                                  content=literal("Hello", "Hi", None)))
    finally:
        mailer.close()


def _refusal(settings: Settings) -> TransientDeliveryError:
    with pytest.raises(Exception) as caught:
        _send(settings)
    error = classify(caught.value)
    assert isinstance(error, TransientDeliveryError), error
    return error


@pytest.mark.parametrize("security", ["starttls", "ssl"])
def test_a_tls_server_is_trusted_only_with_a_certificate_it_can_be_checked_against(certificate, security):
    # smtplib's default checks no certificate: anyone in the way took the mail and SMTP_PASSWORD.
    cert, context = certificate
    handler = devmail.CaptureHandler()
    if security == "starttls":
        server = _server(handler, tls_context=context, require_starttls=True)
    else:
        server = _implicit_tls(handler, context)
    settings = replace(Settings(), smtp_host="127.0.0.1", smtp_port=server.port, smtp_security=security)
    try:
        refused = _refusal(settings)
        assert refused.operator and "SMTP_CA_FILE" in str(refused) and handler.messages == []

        _send(replace(settings, smtp_ca_file=cert))
    finally:
        server.stop()
    assert [m.rcpt_tos for m in handler.messages] == [["ann@example.com"]]


def _implicit_tls(handler, context: ssl.SSLContext) -> Controller:
    """A server that speaks TLS from the first byte (SMTP_SECURITY=ssl, port 465's way)."""
    return _server(handler, ssl_context=context)


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # the test server's, on purpose
def test_a_login_name_without_an_at_sign_is_the_one_the_server_is_given():
    # yagmail adds "@gmail.com" to such a name: "apikey" (SendGrid's), an access key id, were refused.
    logins = []

    def authenticate(server, session, envelope, mechanism, auth_data):
        logins.append(auth_data.login)
        return AuthResult(success=(auth_data.login, auth_data.password) == (b"apikey", b"s3cret"), handled=False)

    handler = devmail.CaptureHandler()
    server = _server(handler, authenticator=authenticate, auth_require_tls=False, auth_required=True)
    settings = replace(Settings(), smtp_host="127.0.0.1", smtp_port=server.port, smtp_username="apikey",
                       smtp_password="s3cret")
    try:
        _send(settings)
        refused = _refusal(replace(settings, smtp_password="wrong"))
    finally:
        server.stop()
    assert set(logins) == {b"apikey"} and len(handler.messages) == 1  # smtplib tries each mechanism offered
    assert refused.operator and refused.smtp_code == 535 and "s3cret" not in str(refused)


@pytest.mark.parametrize(("host", "username", "security", "warned"), [
    ("smtp.example.com", "apikey", "none", True), ("192.0.2.7", "apikey", "none", True),
    ("smtp.example.com", "apikey", "starttls", False), ("smtp.example.com", "apikey", "ssl", False),
    ("smtp.example.com", "", "none", False), ("127.0.0.1", "apikey", "none", False),
    ("localhost", "apikey", "none", False)])
def test_a_login_that_would_cross_the_network_in_the_clear_is_warned_of_at_start(
        caplog, host, username, security, warned):
    # smtplib sends AUTH over whatever connection there is: SMTP_PASSWORD went out readable, unsaid.
    from notifier.runtime import warn_about_smtp_login

    env = {"SMTP_HOST": host, "SMTP_USERNAME": username, "SMTP_SECURITY": security}
    if username:
        env["SMTP_PASSWORD"] = "hunter2-relay"
    with caplog.at_level("WARNING", logger="notifier"):
        warn_about_smtp_login(Settings.from_env(env))
    said = [record.getMessage() for record in caplog.records]
    assert bool(said) is warned, said
    assert all("hunter2" not in line for line in said)
    if warned:
        assert f"SMTP_PASSWORD goes to {host} in the clear" in said[0]
