"""What every route under /api does, for the OpenAPI document: one entry per (endpoint, method).

A route added without an entry here still shows up in the document, marked undocumented, and
tests/test_openapi.py fails until it has one. Shapes the handlers build by hand (lists, stats) have a
schema here; tests/test_openapi.py checks real responses against all of them."""

from __future__ import annotations

from marshmallow import Schema, fields

from notifier.api.openapi import Op
from notifier.schemas import (
    AcceptedSchema,
    BatchItemResultSchema,
    BatchSchema,
    EventSchema,
    ListQuerySchema,
    NotificationDetailSchema,
    NotificationSchema,
    PageQuerySchema,
    PreferencesSchema,
    PreviewSchema,
    SendSchema,
    UtcDateTime,
    VerificationSchema,
)

# --- response shapes the handlers build themselves ---------------------------------------------------


class PageSchema(Schema):
    """What every list answers besides its `data`."""

    next = fields.String(required=True, allow_none=True,
                         metadata={"description": "pass back as `cursor` for the next page; null on the last"})


class NotificationPageSchema(PageSchema):
    data = fields.List(fields.Nested(NotificationSchema), required=True)


class BatchAcceptedSchema(Schema):
    accepted = fields.Integer(required=True)
    rejected = fields.Integer(required=True)
    results = fields.List(fields.Nested(BatchItemResultSchema), required=True,
                          metadata={"description": "one per item, in order: its id and status, or its error"})


class UserStatsSchema(Schema):
    user_id = fields.String(required=True)
    total = fields.Integer(required=True)
    by_status = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)


class DeadLetterSchema(Schema):
    id = fields.String(required=True)
    to = fields.String(required=True)
    template = fields.String(required=True, allow_none=True)
    priority = fields.String(required=True)
    attempts = fields.Integer(required=True)
    reason = fields.String(required=True, allow_none=True)
    smtp_code = fields.Integer(required=True, allow_none=True)
    smtp_reply = fields.String(required=True, allow_none=True)
    failed_at = UtcDateTime(required=True)
    in_failed_registry = fields.Boolean(required=True, allow_none=True, metadata={
        "description": "whether RQ's failed registry still holds the job; null when Redis does not answer"})


class DeadLetterListSchema(PageSchema):
    data = fields.List(fields.Nested(DeadLetterSchema), required=True)


class HealthSchema(Schema):
    status = fields.String(required=True)


class ReadySchema(Schema):
    status = fields.String(required=True)
    checks = fields.Dict(keys=fields.String(), values=fields.String(), required=True)


class EventNotificationSchema(Schema):
    id = fields.String(required=True)
    template = fields.String(required=True, allow_none=True)
    status = fields.String(required=True)
    priority = fields.String(required=True)
    send_at = UtcDateTime(required=True, allow_none=True)
    location = fields.String(required=True)
    replayed = fields.Boolean(required=True)


class EventAcceptedSchema(Schema):
    event = fields.String(required=True)
    notifications = fields.List(fields.Nested(EventNotificationSchema), required=True)


class QuietHoursOutSchema(Schema):
    start = fields.String(required=True)
    end = fields.String(required=True)


class PreferencesOutSchema(Schema):
    user_id = fields.String(required=True)
    timezone = fields.String(required=True)
    quiet_hours = fields.Nested(QuietHoursOutSchema, required=True, allow_none=True)
    categories = fields.Dict(keys=fields.String(), values=fields.String(), required=True,
                             metadata={"description": "each category's delivery: immediate, daily, weekly or off"})


class SuppressionSchema(Schema):
    email = fields.String(required=True)
    reason = fields.String(required=True, allow_none=True)
    created_at = UtcDateTime(required=True)


class SuppressionListSchema(PageSchema):
    data = fields.List(fields.Nested(SuppressionSchema), required=True)


class TemplateSchema(Schema):
    name = fields.String(required=True)
    category = fields.String(required=True, metadata={"description": "the category its mail is in (consent and "
                                                                      "unsubscribe follow it)"})


class TemplateListSchema(Schema):
    data = fields.List(fields.Nested(TemplateSchema), required=True)


class PreviewOutSchema(Schema):
    template = fields.String(required=True)
    category = fields.String(required=True)
    subject = fields.String(required=True)
    text = fields.String(required=True)
    html = fields.String(required=True, allow_none=True, metadata={"description": "null for a template without an "
                                                                                   "HTML part"})


class ErasedSchema(Schema):
    user_id = fields.String(required=True, metadata={"description": "the user erased, as the path named them "
                                                                     "(`email:<address>` lower-cased)"})
    cancelled = fields.Integer(required=True, metadata={"description": "notifications stopped before they went out "
                                                                        "(each also counted as tombstoned or deleted)"})
    tombstoned = fields.Integer(required=True, metadata={
        "description": "notifications kept without personal data, to answer a retried request under their "
                       "idempotency key or to post the status callback they owe (`erased_at` set)"})
    deleted = fields.Integer(required=True, metadata={"description": "notifications deleted with their history"})
    digests = fields.Integer(required=True, metadata={"description": "records of digests made for the user"})
    preferences = fields.Integer(required=True, metadata={"description": "category preferences deleted"})
    profile = fields.Integer(required=True, metadata={"description": "1 when a timezone or quiet hours were deleted"})


class SuppressionRemovedSchema(Schema):
    email = fields.String(required=True)
    suppressed = fields.Boolean(required=True)


# --- the registry ----------------------------------------------------------------------------------

ACCEPTED_HEADERS = {
    "Location": {"description": "where to read the notification", "required": True, "schema": {"type": "string"}},
    "Idempotent-Replayed": {"description": "`true` when this answers an earlier request with the same "
                                           "idempotency key; nothing new was sent",
                            "schema": {"type": "string", "enum": ["true"]}},
}
USER_ID_422 = ("`validation_error`: the user id in the path is longer than 200 characters, or after `email:` is "
               "not an address `to` would take")
IDEMPOTENCY_409 = "`idempotency_key_reused`: this idempotency key was used for a different request"
SEND_DESCRIPTION = (
    "Stored first, then queued; a rejected request stores nothing. `send_at`/`delay_seconds` send later, "
    "`expires_at`/`ttl_seconds` set a deadline after which it is never sent, `callback_url` gets a signed "
    "POST when it reaches a final state (a `callback_url` whose host is an address in `CALLBACK_DENY_NETWORKS`, "
    "link-local or unspecified by default, is a 422)."
)

PATH_PARAMETERS = {
    "notification_id": "the notification's id, as returned when it was accepted",
    "user_id": "your id for the user (1 to 200 characters, as `user_id` in a request body), or `email:<address>` "
               "(an address `to` would take) for the preferences of mail sent to that address without one; a `/` in "
               "it may be written as it is or as `%2F`",
    "email": "the suppressed address",
    "name": "a template's name, as `GET /api/templates` lists it",
}

OPERATIONS: dict[tuple[str, str], Op] = {
    ("notifications.send", "POST"): Op(
        "Send an email", "notifications", ok=202, ok_schema=AcceptedSchema, ok_headers=ACCEPTED_HEADERS,
        ok_description="Accepted: stored and queued (or scheduled)", body=SendSchema, idempotency_header=True,
        errors={409: IDEMPOTENCY_409},
        description="Either `template` with `data` (values only: they are never parsed as templates), or "
                    "`subject` with `text` and/or `html`. " + SEND_DESCRIPTION),
    ("notifications.send_verification", "POST"): Op(
        "Send a verification email", "notifications", ok=202, ok_schema=AcceptedSchema, ok_headers=ACCEPTED_HEADERS,
        ok_description="Accepted: stored and queued at high priority", body=VerificationSchema,
        idempotency_header=True, errors={409: IDEMPOTENCY_409},
        description="The `verification` template at high priority, with `code` and/or `verification_url`; its "
                    "deadline defaults to VERIFICATION_TTL_SECONDS. " + SEND_DESCRIPTION),
    ("notifications.send_batch", "POST"): Op(
        "Send many emails at once", "notifications", ok=202, ok_schema=BatchAcceptedSchema,
        ok_description="At least one item was accepted; `results` says what became of each",
        body=BatchSchema, idempotency_header=True, errors={409: IDEMPOTENCY_409},
        description="`notifications` holds up to BATCH_MAX items, each shaped like a `send` request and "
                    "accepted or refused on its own; 422 when none is accepted (`details.results` says why)."),
    ("notifications.get_one", "GET"): Op(
        "One notification with its history", "notifications", ok_schema=NotificationDetailSchema),
    ("notifications.list_all", "GET"): Op(
        "Your notifications, newest first, a page at a time", "notifications", ok_schema=NotificationPageSchema,
        query=ListQuerySchema,
        description="`limit` is at most PAGE_SIZE_MAX; pass the answer's `next` back as `cursor`."),
    ("notifications.cancel", "POST"): Op(
        "Cancel a notification that has not been sent", "notifications", ok_schema=NotificationDetailSchema,
        ok_description="Cancelled: it will never be sent",
        errors={409: "`not_cancellable`: it is sending or already final"}),
    ("notifications.redeliver_callback", "POST"): Op(
        "Post a final notification's status event to its callback_url again", "notifications", ok=202,
        ok_schema=NotificationDetailSchema,
        ok_description="The event goes again (the same Notifier-Event-Id), with a fresh set of attempts; "
                       "`callback_status` is `pending`. One already pending is answered as it is",
        errors={409: "`no_callback`: it has no callback_url; `not_final`: it is not final yet, and its event "
                     "goes when it is"}),
    ("notifications.user_stats", "GET"): Op(
        "How many notifications a user has, in total and per status", "notifications", ok_schema=UserStatsSchema,
        errors={422: USER_ID_422}),
    ("deadletters.list_dead", "GET"): Op(
        "Your failed notifications, most recently failed first, with why, a page at a time", "dead letters",
        ok_schema=DeadLetterListSchema, query=PageQuerySchema,
        description="`limit` (default 50) is at most PAGE_SIZE_MAX; pass the answer's `next` back as `cursor`."),
    ("deadletters.requeue", "POST"): Op(
        "Send a failed notification again", "dead letters", ok=202, ok_schema=AcceptedSchema,
        ok_description="Requeued with a fresh set of attempts",
        errors={409: "`not_requeueable`: it is not failed (a sent notification is never sent twice); `erased`: its "
                     "user was erased, and it is never sent again; `suppressed`: "
                     "its address is on the suppression list (remove it first)"}),
    ("events.emit", "POST"): Op(
        "Report a business event; notifier sends what its rule says", "events", ok=202,
        ok_schema=EventAcceptedSchema, ok_description="Accepted: every notification the event caused",
        body=EventSchema, idempotency_header=True, errors={409: IDEMPOTENCY_409}),
    ("users.get_preferences", "GET"): Op(
        "A user's preferences, with defaults for anything never set", "preferences", ok_schema=PreferencesOutSchema,
        errors={422: USER_ID_422}),
    ("users.put_preferences", "PUT"): Op(
        "Change a user's preferences", "preferences", ok_schema=PreferencesOutSchema, body=PreferencesSchema,
        ok_description="The user's preferences after the change",
        description="Only the parts given change; transactional mail cannot be turned off."),
    ("users.erase_user", "DELETE"): Op(
        "Erase what you hold of a user (right to erasure)", "preferences", ok_schema=ErasedSchema,
        ok_description="Erased, in one transaction; a user with nothing is answered with zeros (erasing again "
                       "is safe)",
        errors={409: "`in_flight`: some of the user's mail is being sent right now (`details.in_flight` lists "
                     "its ids); nothing was erased: try again after Retry-After seconds",
                422: USER_ID_422},
        retry_after=frozenset({409}),
        description="For a user id, its notifications; for `email:<address>`, those sent to that address with no "
                    "user id (as the stats count them). What is still waiting is cancelled, so nothing more is "
                    "sent. A notification whose idempotency key is still remembered, or whose status callback is "
                    "owed, stays as a tombstone (`erased_at` set, `to` empty, its content, user and metadata null, "
                    "its history one line saying it was erased): a retried request still replays it and "
                    "sends nothing, and its callback still goes. Every other is deleted with its history; the "
                    "user's preferences, profile and digest records too. The suppression list is kept (it "
                    "protects your sending reputation): `DELETE /api/suppressions/{email}` takes an address off."),
    ("suppressions.list_suppressions", "GET"): Op(
        "Addresses you will not mail again, newest first, a page at a time", "suppressions",
        ok_schema=SuppressionListSchema, query=PageQuerySchema,
        description="`limit` (default 50) is at most PAGE_SIZE_MAX; pass the answer's `next` back as `cursor`."),
    ("suppressions.delete_suppression", "DELETE"): Op(
        "Mail an address again", "suppressions", ok_schema=SuppressionRemovedSchema,
        errors={404: "`not_found`: the address is not suppressed"}),
    ("templates.list_templates", "GET"): Op(
        "The templates a send may name", "templates", ok_schema=TemplateListSchema),
    ("templates.preview", "POST"): Op(
        "What a send of a template with this data would put in the email, without sending it", "templates",
        ok_schema=PreviewOutSchema, body=PreviewSchema,
        errors={404: "`not_found`: no template of that name"},
        description="Checked as a send is (a variable the template needs but `data` lack, a link's target with no "
                    "scheme, ... are 422); stores and sends nothing. In mail a user can unsubscribe from, the "
                    "footer's link is `PUBLIC_BASE_URL/unsubscribe/preview`, where a real email has its "
                    "recipient's own signed link."),
    ("health.health", "GET"): Op(
        "Liveness: the process is up", "health", ok_schema=HealthSchema, public=True, uses_database=False),
    ("health.ready", "GET"): Op(
        "Readiness: the database answers and Redis takes writes", "health", ok_schema=ReadySchema, public=True,
        errors={503: "`not_ready`: `details` says which of database and redis is unavailable (a Redis out of "
                    "memory or read-only is)"}),
    ("docs.openapi_json", "GET"): Op(
        "This document", "documentation", ok_schema={"type": "object"}, public=True, uses_database=False,
        ok_description="The OpenAPI 3 document of every route under /api"),
    ("docs.page", "GET"): Op(
        "This document as a web page", "documentation", ok_schema={"type": "string"}, ok_content_type="text/html",
        public=True, uses_database=False, ok_description="A page listing every operation; works offline"),
}
