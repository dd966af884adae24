"""marshmallow schemas: what a request may say and what a response says."""

from __future__ import annotations

import unicodedata
from datetime import UTC
from urllib.parse import urlsplit

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from notifier.callback_targets import resolver_host
from notifier.consent import ADDRESS_KEY_PREFIX, OPTIONAL_CATEGORIES, valid_timezone
from notifier.models import Category, DeliveryMode, Priority, Status
from notifier.rendering import MAX_PART_CHARS, MAX_SUBJECT_CHARS
from notifier.rules import RULES

PRIORITIES = [p.value for p in Priority]
CATEGORIES = [c.value for c in Category]
MODES = [m.value for m in DeliveryMode]
STATUSES = [s.value for s in Status]
MAX_BODY_CHARS = MAX_PART_CHARS
MAX_JSON_DEPTH = 20
MAX_JSON_NODES = 1000
# A caller's id for a user, wherever it is given (a body, a query, a path). The column that keeps it
# (user_key) is longer, to hold "email:" and a whole address for mail sent with no user id.
USER_ID = validate.Length(min=1, max=200)
# The longest address SMTP carries (RFC 5321, 4.5.3.1: a path of 256 octets with its brackets).
ADDRESS_MAX = 254


def _not_an_address_key(value: str) -> None:
    # Mail sent with no user id follows the preferences of "email:<address>" (consent.user_key_for),
    # and is grouped into digests by it. A user given that id by a caller (one that lets people pick
    # their ids) would share them: its unsubscribe would stop that address's mail, and a digest of
    # both would go to whichever of their addresses came last. The path may name it: that is how a
    # caller reads and sets an address's own preferences.
    if value.startswith(ADDRESS_KEY_PREFIX):
        raise ValidationError(f"must not start with {ADDRESS_KEY_PREFIX!r}, which names the preferences of mail "
                              "sent without a user_id")


# A user id as a send or an event gives it.
SENT_USER_ID = [USER_ID, _not_an_address_key]


def _no_line_breaks(value: str) -> None:
    # A CR or LF in a header value would let the caller add headers of their own.
    if "\r" in value or "\n" in value:
        raise ValidationError("must not contain line breaks")


def _header_text(value: str) -> None:
    """A subject: words a mail client shows, not blank, and no control character (RFC 5322 allows
    only visible characters and spaces in a header: a BEL or ESC went out raw)."""
    _no_line_breaks(value)
    if not value.strip():
        raise ValidationError("must not be blank")
    if any(unicodedata.category(c) == "Cc" and c != "\t" for c in value):
        raise ValidationError("must not contain control characters")


# The longest idempotency key, as the column that keeps it is, and the header that may give it.
IDEMPOTENCY_KEY_MAX = 255
IDEMPOTENCY_HEADER = "Idempotency-Key"
# What an Idempotency-Key header may hold (the document says it with this): printable ASCII, spaces and
# tabs, no comma. The API refuses a key beyond ASCII or with a comma there; the rest a client cannot
# write in a header at all.
IDEMPOTENCY_HEADER_PATTERN = r"^[\t\u0020-\u002b\u002d-\u007e]+$"


class IdempotencyKey(fields.String):
    """A caller's idempotency key, wherever it is given: 1 to IDEMPOTENCY_KEY_MAX characters, no line break."""

    def __init__(self, *validators, **kwargs):
        super().__init__(validate=[validate.Length(min=1, max=IDEMPOTENCY_KEY_MAX), _no_line_breaks, *validators],
                         **kwargs)


def _header_ascii(value: str) -> None:
    # The server hands a header's bytes on as Latin-1 (WSGI), whatever the client meant: a key beyond
    # ASCII sent as UTF-8 was another key than the same one in the body, which JSON makes UTF-8.
    if not value.isascii():
        raise ValidationError("must be ASCII (a key beyond it goes in the idempotency_key field)")


def _header_once(value: str) -> None:
    # The server joins a header given twice with a comma, so "a" and "b" arrive as the key "a,b", which
    # no single header gave; past the join, one key holding a comma cannot be told from two.
    if "," in value:
        raise ValidationError("must be given once, without a comma (a key with one goes in the idempotency_key "
                              "field)")


class IdempotencyHeaderSchema(Schema):
    """The Idempotency-Key header: a key as the body's field takes it, that a header carries whole."""

    key = IdempotencyKey(_header_ascii, _header_once, required=True, data_key=IDEMPOTENCY_HEADER)


def _ascii(value: str) -> None:
    # smtplib speaks plain SMTP, without SMTPUTF8 (which not every relay offers either): a non-ASCII
    # address could never be sent, only retried until the last attempt.
    if not value.isascii():
        raise ValidationError("must be an ASCII address (write an international domain in its xn-- form)")


def _no_control_characters(value: str) -> None:
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in value if char not in "\r\n"):
        raise ValidationError("must not contain control characters")


def _plain_address(value: str) -> None:
    # marshmallow takes RFC 5322's quoted local parts by a pattern of its own ('"a b"@' refused, '"a\\ b"@'
    # taken; control characters taken too, which the To header wrote as spaces, naming another mailbox
    # than the envelope), address literals ("a@[192.0.2.1]") and "a@localhost": forms no user's mailbox
    # has in practice, and a relay reads the last two as its own machine. Refused, as GOV.UK Notify
    # and the big senders refuse them: one rule a caller can predict.
    local, at, domain = value.rpartition("@")
    if not at:
        return  # not an address at all: marshmallow's pattern says so
    if local.startswith('"'):
        raise ValidationError("must not quote the part before the @ (write it without quotes)")
    if domain.startswith("["):
        raise ValidationError("must name a domain after the @, not an address literal")
    if "." not in domain:
        raise ValidationError("must name a domain with a dot in it after the @ (not localhost)")
    if domain.lower().endswith(".localhost"):
        # RFC 6761: every name under .localhost is this machine, as "localhost" is (runtime._loopback).
        raise ValidationError("must name a domain after the @, not one under .localhost")


def _within_smtp_limits(value: str) -> None:
    # RFC 5321 (4.5.3.1): a local part of at most 64 octets, and a path of at most 256 with its
    # brackets. marshmallow takes longer ones, which a strict server refuses at RCPT, after every retry.
    local = value.rpartition("@")[0]
    if len(local) > 64:
        raise ValidationError("the part before the @ must be at most 64 characters (RFC 5321)")
    if len(value) > ADDRESS_MAX:
        raise ValidationError(f"must be at most {ADDRESS_MAX} characters (RFC 5321)")


def unsplittable(url: str) -> bool:
    """Whether urllib cannot take url apart (it raises ValueError): marshmallow's Url takes a host of any
    Unicode letters, those NFKC turns into "/", "?", "#", "@" or ":" too ("hooks\uff0fexample.com"), and
    brackets holding no IPv6 address ("[1:2:3]"). No request can be sent to one, and urllib's error
    quotes the whole netloc, a password too."""
    try:
        urlsplit(url)
    except ValueError:
        return True
    return False


def port_out_of_range(url: str) -> bool:
    """Whether url names a port no socket has: 0, beyond 65535 (glibc's getaddrinfo takes a numeric port
    modulo 65536, so a callback URL of `:81638` posted the signed event to port 16102, another service
    than the one named), or not in ASCII digits (marshmallow's Url takes any Unicode digit there)."""
    try:
        host = urlsplit(url).netloc.rpartition("@")[2]
    except ValueError:
        return False  # not one urllib can take apart, which unsplittable() says
    port = host.rpartition("]")[2].partition(":")[2]
    if not port:
        return False  # the scheme's own
    return whole_number(port, 1, 65535) is None


def whole_number(text: str, low: int, high: int) -> int | None:
    """text as a number from low to high (ASCII digits only, leading zeros allowed); None otherwise.
    Its length is looked at first: int() refuses more than 4,300 digits (a ValueError, a 500 twice)."""
    if not (text.isascii() and text.isdigit()) or len(text.lstrip("0")) > len(str(high)):
        return None
    number = int(text)
    return number if low <= number <= high else None


def _splittable(value: str) -> None:
    if unsplittable(value):
        raise ValidationError("is not a URL a request can be sent to")


def _a_port_that_exists(value: str) -> None:
    if port_out_of_range(value):
        raise ValidationError("the port must be a number from 1 to 65535")


def _a_host_with_a_name(value: str) -> None:
    try:
        host = urlsplit(value).hostname or ""
    except ValueError:
        return  # _splittable says so
    if resolver_host(host) is None:
        # Beyond ASCII with no IDNA form: the resolver cannot be asked for it, and every attempt failed.
        raise ValidationError("the host is not a domain name (an empty label, one over 63 characters, or a "
                              "character no domain name may hold)")


class CallbackUrl(fields.Url):
    """Where a notification's status callbacks go: http(s), at most 2000 characters, a real port, one urllib
    can take apart (unsplittable). No control characters: marshmallow's Url takes those that are not
    whitespace, and http.client refuses them in the request line, so every attempt failed, quoting the
    path and query (a token) in the history and log."""

    def __init__(self, **kwargs):
        super().__init__(schemes={"http", "https"}, require_tld=False,
                         validate=[validate.Length(max=2000), _no_control_characters, _splittable,
                                   _a_port_that_exists, _a_host_with_a_name],
                         **kwargs)


class ShownCallbackUrl(fields.String):
    """A stored callback_url as the API answers with it: a password in it as `***`. It is the caller's
    to keep, like an API key; their logs of our answers (and anyone shown them) need not hold it."""

    def _serialize(self, value, attr, obj, **kwargs):
        if value is None:
            return None
        # Taken apart as urlsplit does (the netloc runs from "://" to the first "/", "?" or "#"), but by
        # hand: urlsplit refuses some URLs stored before the API did (unsplittable), and their GET, and
        # every list that held one, was a 500.
        scheme, sep, rest = value.partition("://")
        end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
        userinfo, at, host = rest[:end].rpartition("@")
        if not sep or not at or ":" not in userinfo:
            return value
        return f"{scheme}://{userinfo.partition(':')[0]}:***@{host}{rest[end:]}"


class Email(fields.Email):
    """An address mail can be sent to, refused with the one reason that matters most."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # marshmallow's own pattern goes last, and the first check that fails is the only one said:
        # '"a b"@' and "a@b" were each answered with marshmallow's "Not a valid email address." beside
        # the reason that tells the caller what to change.
        checks = (_no_line_breaks, _ascii, _plain_address, _within_smtp_limits, *self.validators)

        def first_failure(value: str) -> None:
            for check in checks:
                check(value)

        self.validators = [first_failure]


def _bounded_json(value: dict) -> None:
    # Deep or sprawling data costs every later step (hashing, storing, rendering) more than it can be
    # worth to a template or a caller's bookkeeping.
    level, depth, nodes = [value], 0, 0
    while level:
        depth += 1
        if depth > MAX_JSON_DEPTH:
            raise ValidationError(f"must be nested at most {MAX_JSON_DEPTH} levels deep")
        children = [child for item in level for child in (item.values() if isinstance(item, dict) else item)]
        nodes += len(children)
        if nodes > MAX_JSON_NODES:
            raise ValidationError(f"must hold at most {MAX_JSON_NODES} keys and items in all")
        level = [child for child in children if isinstance(child, dict | list)]


class JsonObject(fields.Dict):
    """A caller's free-form object (template data, metadata): string keys, bounded depth and size."""

    def __init__(self, **kwargs):
        kwargs.setdefault("metadata", {"description": f"nested at most {MAX_JSON_DEPTH} levels deep, with at most "
                                                      f"{MAX_JSON_NODES} keys and items in all"})
        super().__init__(keys=fields.String(), validate=_bounded_json, **kwargs)


class UtcDateTime(fields.DateTime):
    """Naive datetimes are UTC in our tables; say so on the way out, and insist on it on the way in."""

    def _serialize(self, value, attr, obj, **kwargs):
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")

    def _deserialize(self, value, attr, data, **kwargs):
        parsed = super()._deserialize(value, attr, data, **kwargs)
        if parsed.tzinfo is None:
            raise ValidationError("must include a UTC offset, e.g. 2026-01-01T09:00:00Z")
        try:
            return parsed.astimezone(UTC).replace(tzinfo=None)
        except OverflowError:  # 0001-01-01T00:00+01:00 is before the first instant Python can hold in UTC
            raise ValidationError("is out of range") from None


class Seconds(fields.Integer):
    """A whole number of seconds: 60 or 60.0, a JSON number. marshmallow's Integer cuts 1.5 to 1 without
    a word, and takes any string int() reads ("60", " 60 "): the document says integer, and a caller
    sending text there has a bug a stricter server would refuse."""

    def _validated(self, value):
        if not isinstance(value, int | float) or (isinstance(value, float) and not value.is_integer()):
            raise self.make_error("invalid")
        return super()._validated(value)


class QueryInteger(fields.Integer):
    """A whole number in a query string: ASCII digits only. int() also reads " 5", "1_0" and "\u0665"
    (an Arabic-Indic five), none of them the integer the document names."""

    def _validated(self, value):
        if not (isinstance(value, str) and value.isascii() and value.isdigit()):
            raise self.make_error("invalid")
        return super()._validated(value)


class StrictSchema(Schema):
    class Meta:
        unknown = RAISE


class DeliveryOptions(StrictSchema):
    """What every send route accepts besides the message itself."""

    idempotency_key = IdempotencyKey()
    send_at = UtcDateTime()
    delay_seconds = Seconds(validate=validate.Range(min=0, max=3650 * 86400))
    expires_at = UtcDateTime()
    ttl_seconds = Seconds(validate=validate.Range(min=1, max=30 * 86400))
    callback_url = CallbackUrl()
    metadata = JsonObject(load_default=None)

    @validates_schema
    def _one_way_to_say_each(self, data, **kwargs):
        for a, b in (("send_at", "delay_seconds"), ("expires_at", "ttl_seconds")):
            if a in data and b in data:
                raise ValidationError({b: [f"give {a} or {b}, not both"]})


class SendSchema(DeliveryOptions):
    to = Email(required=True)
    template = fields.String(validate=validate.Length(min=1, max=100))
    data = JsonObject(load_default=dict)
    subject = fields.String(validate=[validate.Length(min=1, max=MAX_SUBJECT_CHARS), _header_text])
    text = fields.String(validate=validate.Length(min=1, max=MAX_BODY_CHARS))
    html = fields.String(validate=validate.Length(min=1, max=MAX_BODY_CHARS))
    priority = fields.String(load_default=Priority.DEFAULT.value, validate=validate.OneOf(PRIORITIES))
    user_id = fields.String(validate=SENT_USER_ID)
    category = fields.String(validate=validate.OneOf(CATEGORIES))

    @validates_schema
    def _template_or_literal(self, data, **kwargs):
        if data.get("template"):
            extra = [name for name in ("subject", "text", "html", "category") if name in data]
            if extra:
                raise ValidationError({name: ["not allowed with template"] for name in extra})
        elif "subject" in data:
            if "text" not in data and "html" not in data:
                raise ValidationError({"text": ["text or html is required with subject"]})
        else:
            raise ValidationError({"template": ["either template or subject (with text and/or html) is required"]})


class PreviewSchema(StrictSchema):
    data = JsonObject(load_default=dict)


class BatchSchema(StrictSchema):
    """The envelope of a batch; each item is checked on its own against SendSchema."""

    notifications = fields.List(fields.Raw(allow_none=True), required=True, validate=validate.Length(min=1))


class BatchItemResultSchema(Schema):
    index = fields.Integer(required=True)
    id = fields.String()
    status = fields.String()
    replayed = fields.Boolean()
    error = fields.Dict()


class VerificationSchema(DeliveryOptions):
    to = Email(required=True)
    user_id = fields.String(required=True, validate=SENT_USER_ID)
    code = fields.String(validate=validate.Length(min=1, max=64))
    verification_url = fields.Url(schemes={"http", "https"}, require_tld=False, validate=validate.Length(max=2000))
    name = fields.String(validate=[validate.Length(min=1, max=200), _no_line_breaks])

    @validates_schema
    def _code_or_url(self, data, **kwargs):
        if "code" not in data and "verification_url" not in data:
            raise ValidationError({"code": ["code or verification_url is required"]})


def _timezone(value: str) -> None:
    if not valid_timezone(value):
        raise ValidationError("not an IANA timezone name, e.g. Europe/Berlin")


def _clock(value: str) -> None:
    from notifier.config import parse_clock

    # Exactly HH:MM: parse_clock strips blanks, so "7:00 " and " 7:00" would pass it, stored and echoed
    # as given, and " 7:00" beside "07:00" was an empty window that the check for one let through.
    if len(value) != 5 or value[2] != ":" or not (value[:2] + value[3:]).isdigit() or parse_clock(value) is None:
        raise ValidationError("must be a time of day like 22:00")


class EventUserSchema(StrictSchema):
    id = fields.String(required=True, validate=SENT_USER_ID)
    email = Email(required=True)
    name = fields.String(validate=[validate.Length(min=1, max=200), _no_line_breaks])
    timezone = fields.String(validate=_timezone)


class EventSchema(StrictSchema):
    type = fields.String(required=True, validate=validate.OneOf(sorted(RULES)))
    user = fields.Nested(EventUserSchema, required=True)
    data = JsonObject(load_default=dict)
    metadata = JsonObject(load_default=None)
    idempotency_key = IdempotencyKey()
    callback_url = CallbackUrl()


class QuietHoursSchema(StrictSchema):
    start = fields.String(required=True, validate=_clock)
    end = fields.String(required=True, validate=_clock)

    @validates_schema
    def _not_empty(self, data, **kwargs):
        # A window that ends when it starts holds no time: stored, it would silently mean none.
        if data.get("start") is not None and data.get("start") == data.get("end"):
            raise ValidationError("must end at another time than it starts; send null for no quiet hours", "end")


class PreferencesSchema(StrictSchema):
    # What GET answers can be PUT back as it is: its user_id (the path's: checked by the route) and
    # transactional (always immediate, so only that) are taken and change nothing.
    user_id = fields.String()
    timezone = fields.String(validate=_timezone)
    quiet_hours = fields.Nested(QuietHoursSchema, allow_none=True)
    categories = fields.Dict(keys=fields.String(validate=validate.OneOf(
                                 [Category.TRANSACTIONAL.value, *(c.value for c in OPTIONAL_CATEGORIES)])),
                             values=fields.String(validate=validate.OneOf(MODES)))

    @validates_schema
    def _transactional_goes_at_once(self, data, **kwargs):
        mode = (data.get("categories") or {}).get(Category.TRANSACTIONAL.value, DeliveryMode.IMMEDIATE.value)
        if mode != DeliveryMode.IMMEDIATE.value:
            raise ValidationError({"categories": {Category.TRANSACTIONAL.value: [
                "transactional mail (verification, password resets) always goes at once: only immediate"]}})


def _path_user_id(value: str) -> None:
    # "email:<address>" names the preferences of mail sent to that address with no user id: any address
    # a send takes as `to` (held to 200 characters, those of one over 194 could not be read or set), and
    # only those: the preferences of "email:x" were stored, and no mail ever read them.
    if value.startswith(ADDRESS_KEY_PREFIX):
        _ADDRESS.deserialize(value.removeprefix(ADDRESS_KEY_PREFIX))
    else:
        USER_ID(value)


_ADDRESS = Email()


class UserPathSchema(StrictSchema):
    """The user id a route takes in its path, held to the same limits as one in a body (an address's
    own, "email:<address>", to those of `to`)."""

    user_id = fields.String(required=True, validate=_path_user_id)


class PageQuerySchema(StrictSchema):
    limit = QueryInteger(load_default=50, validate=validate.Range(min=1))
    cursor = fields.String(validate=validate.Length(min=1, max=64))


class ListQuerySchema(PageQuerySchema):
    status = fields.String(validate=validate.OneOf(STATUSES))
    user_id = fields.String(validate=USER_ID)
    template = fields.String(validate=validate.Length(min=1, max=100))
    priority = fields.String(validate=validate.OneOf(PRIORITIES))
    to = fields.String(validate=validate.Length(min=1, max=320))
    created_after = UtcDateTime()
    created_before = UtcDateTime()


class HistorySchema(Schema):
    at = UtcDateTime(required=True)
    kind = fields.String(required=True)
    from_status = fields.String(required=True, allow_none=True)
    status = fields.String(required=True, attribute="to_status")
    reason = fields.String(required=True, allow_none=True)
    smtp_code = fields.Integer(required=True, allow_none=True)
    smtp_reply = fields.String(required=True, allow_none=True)


class NotificationSchema(Schema):
    # Every field is in every answer (null where it has no value): required, so a client generated
    # from the OpenAPI document does not type each one as optional.
    id = fields.String(required=True)
    status = fields.String(required=True)
    priority = fields.String(required=True)
    to = fields.String(required=True)
    template = fields.String(required=True, allow_none=True)
    subject = fields.String(required=True, allow_none=True)
    user_id = fields.String(required=True, allow_none=True)
    metadata = fields.Dict(required=True, allow_none=True)
    attempts = fields.Integer(required=True)
    last_error = fields.String(required=True, allow_none=True)
    message_id = fields.String(required=True, allow_none=True)
    created_at = UtcDateTime(required=True)
    updated_at = UtcDateTime(required=True)
    sent_at = UtcDateTime(required=True, allow_none=True)
    send_at = UtcDateTime(required=True, allow_none=True)
    expires_at = UtcDateTime(required=True, allow_none=True)
    callback_url = ShownCallbackUrl(required=True, allow_none=True)
    callback_status = fields.String(required=True, allow_none=True)
    category = fields.String(required=True)
    digest_id = fields.String(required=True, allow_none=True)
    erased_at = UtcDateTime(required=True, allow_none=True, metadata={
        "description": "when its user's data was erased (DELETE /api/users/{user_id}): `to` is then empty and "
                       "its content, user and metadata null; null if it was not"})


class NotificationDetailSchema(NotificationSchema):
    history = fields.List(fields.Nested(HistorySchema), required=True)


class AcceptedSchema(Schema):
    id = fields.String()
    status = fields.String()
