"""Request schemas: what a caller may send, and what is refused before anything is stored."""

from __future__ import annotations

from datetime import datetime

import pytest
from marshmallow import ValidationError

from notifier.schemas import ListQuerySchema, SendSchema, VerificationSchema


def send_request(**fields) -> dict:
    """A valid template send request, with fields replaced or added."""
    return {"to": "ada@example.com", "template": "welcome", "data": {"name": "Ada"}} | fields


def literal_request(**fields) -> dict:
    """A valid literal send request (no template), with fields replaced or added."""
    return {"to": "ada@example.com", "subject": "Hello", "text": "Plain body"} | fields


def without(request: dict, *names: str) -> dict:
    return {k: v for k, v in request.items() if k not in names}


def errors(schema, payload: dict) -> dict:
    """The messages schema reports for payload (fails the test when it loads)."""
    with pytest.raises(ValidationError) as caught:
        schema.load(payload)
    return caught.value.normalized_messages()


def test_template_with_data_is_accepted():
    loaded = SendSchema().load(send_request())

    assert loaded["template"] == "welcome"
    assert loaded["data"] == {"name": "Ada"}


def test_template_without_data_gets_empty_data():
    assert SendSchema().load(without(send_request(), "data"))["data"] == {}


def test_literal_subject_and_text_is_accepted():
    loaded = SendSchema().load(literal_request())

    assert loaded["subject"] == "Hello"
    assert loaded["text"] == "Plain body"
    assert "template" not in loaded


def test_literal_subject_and_html_only_is_accepted():
    loaded = SendSchema().load(without(literal_request(html="<p>Hi</p>"), "text"))

    assert loaded["html"] == "<p>Hi</p>"


def test_subject_without_text_or_html_is_rejected():
    assert "text" in errors(SendSchema(), without(literal_request(), "text"))


@pytest.mark.parametrize("extra", [{"subject": "Hi"}, {"text": "Body"}, {"html": "<p>Body</p>"}])
def test_template_with_literal_content_is_rejected(extra):
    (name,) = extra

    assert name in errors(SendSchema(), send_request(**extra))


def test_neither_template_nor_subject_is_rejected():
    assert "template" in errors(SendSchema(), {"to": "ada@example.com", "text": "Body"})


def test_unknown_field_is_rejected():
    assert "cc" in errors(SendSchema(), send_request(cc="eve@example.com"))


def test_missing_recipient_is_rejected():
    assert "to" in errors(SendSchema(), without(send_request(), "to"))


@pytest.mark.parametrize("to", ["not-an-email", "ada@", "@example.com", "ada@example.com\r\nBcc: eve@example.com"])
def test_bad_email_is_rejected(to):
    assert "to" in errors(SendSchema(), send_request(to=to))


@pytest.mark.parametrize("subject", ["Hello\r\nBcc: eve@example.com", "Hello\nthere", "Hello\rthere"])
def test_line_break_in_subject_is_rejected(subject):
    assert "subject" in errors(SendSchema(), literal_request(subject=subject))


@pytest.mark.parametrize("priority", ["urgent", "HIGH", ""])
def test_unknown_priority_is_rejected(priority):
    assert "priority" in errors(SendSchema(), send_request(priority=priority))


def test_default_priority_is_default():
    assert SendSchema().load(send_request())["priority"] == "default"


@pytest.mark.parametrize("priority", ["high", "default", "low"])
def test_every_priority_is_accepted(priority):
    assert SendSchema().load(send_request(priority=priority))["priority"] == priority


def verification_request(**fields) -> dict:
    return {"to": "ada@example.com", "user_id": "u1", "code": "123456"} | fields


def test_verification_with_code_is_accepted():
    assert VerificationSchema().load(verification_request())["code"] == "123456"


@pytest.mark.parametrize("url", ["https://example.com/verify?t=abc", "http://localhost:8000/verify"])
def test_verification_with_http_url_only_is_accepted(url):
    loaded = VerificationSchema().load(without(verification_request(verification_url=url), "code"))

    assert loaded["verification_url"] == url


def test_verification_without_code_or_url_is_rejected():
    assert "code" in errors(VerificationSchema(), without(verification_request(), "code"))


@pytest.mark.parametrize("url", ["javascript:alert(1)", "ftp://example.com/verify", "example.com/verify"])
def test_verification_url_must_be_http_or_https(url):
    assert "verification_url" in errors(VerificationSchema(), verification_request(verification_url=url))


def test_verification_requires_user_id():
    assert "user_id" in errors(VerificationSchema(), without(verification_request(), "user_id"))


def test_list_query_created_after_with_offset_is_stored_as_naive_utc():
    loaded = ListQuerySchema().load({"created_after": "2026-01-01T09:00:00+02:00"})

    assert loaded["created_after"] == datetime(2026, 1, 1, 7, 0, 0)


def test_list_query_created_after_with_z_is_accepted():
    assert ListQuerySchema().load({"created_after": "2026-01-01T09:00:00Z"})["created_after"] == datetime(
        2026, 1, 1, 9, 0, 0
    )


def test_list_query_created_after_without_offset_is_rejected():
    assert "created_after" in errors(ListQuerySchema(), {"created_after": "2026-01-01T09:00:00"})


def test_list_query_unknown_status_is_rejected():
    assert "status" in errors(ListQuerySchema(), {"status": "delivered"})


def test_list_query_known_status_is_accepted():
    assert ListQuerySchema().load({"status": "retrying"})["status"] == "retrying"


def test_list_query_default_limit_is_50():
    assert ListQuerySchema().load({})["limit"] == 50


@pytest.mark.parametrize("field", ["delay_seconds", "ttl_seconds"])
def test_seconds_are_whole_numbers_never_cut_short(field):
    # marshmallow's Integer took 1.5 as 1 without a word (and refused "1.5").
    assert field in errors(SendSchema(), literal_request(**{field: 1.5}))
    assert SendSchema().load(literal_request(**{field: 60.0}))[field] == 60
    assert SendSchema().load(literal_request(**{field: 60}))[field] == 60
