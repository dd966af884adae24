"""Sending notifications and reading them back."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request, url_for
from marshmallow import ValidationError

from notifier import listing, redelivery, store
from notifier.api.common import (
    POST_ONLY_NAMES,
    current_key,
    idempotency_header,
    json_body,
    json_items,
    page_query,
    path_user_id,
    require_api_key,
    service,
)
from notifier.errors import ApiError, NotFound, ServiceUnavailable, Unprocessable
from notifier.schemas import (
    AcceptedSchema,
    BatchSchema,
    ListQuerySchema,
    NotificationDetailSchema,
    NotificationSchema,
    SendSchema,
    VerificationSchema,
)

bp = Blueprint("notifications", __name__, url_prefix="/api/notifications")
bp.before_request(require_api_key)

_send = SendSchema()
_batch = BatchSchema()
_verification = VerificationSchema()
_query = ListQuerySchema()
_accepted = AcceptedSchema()
_one = NotificationDetailSchema()
_many = NotificationSchema(many=True)


BATCH_WAIT_SECONDS = 10.0


def _accepted_response(result):
    notification, replayed = result
    response = jsonify(_accepted.dump(notification))
    response.status_code = 202
    response.headers["Location"] = url_for("notifications.get_one", notification_id=notification.id)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


@bp.post("/send")
def send():
    """Accept an email for delivery."""
    body = json_body(_send)
    return _accepted_response(service().send(current_key(), body, idempotency_header()))


@bp.post("/batch")
def send_batch():
    """Accept up to BATCH_MAX notifications at once; each is accepted or refused on its own."""
    # The body was read before any route ran (guards.read_body): a slow upload never holds the slot.
    slot = current_app.extensions["notifier"]["batch_slot"]
    # A batch stuck behind a database lock must not take every thread of this process with it.
    if not slot.acquire(timeout=BATCH_WAIT_SECONDS):
        raise ServiceUnavailable("this API process is busy with other batches; retry shortly")
    try:
        return _send_batch()
    finally:
        slot.release()


def _send_batch():
    body, unstorable = json_items(_batch, "notifications")
    limit = current_app.config["NOTIFIER_SETTINGS"].batch_max
    items = body["notifications"]
    if len(items) > limit:
        raise Unprocessable(f"a batch holds at most {limit} notifications",
                            {"notifications": [f"at most {limit} items"]})
    payloads, errors = [], {}
    for index, item in enumerate(items):
        try:
            if index in unstorable:
                raise ValidationError(unstorable[index])
            payloads.append(_send.load(item) if isinstance(item, dict) else _not_an_object())
        except ValidationError as exc:
            payloads.append(None)
            errors[index] = {"code": "validation_error", "message": "the item has invalid fields",
                             "details": exc.normalized_messages()}
    outcomes = service().send_batch(current_key(), payloads, idempotency_header())
    results = []
    for index, outcome in enumerate(outcomes):
        if index in errors:
            results.append({"index": index, "error": errors[index]})
        elif isinstance(outcome, ApiError):
            results.append({"index": index, "error": {"code": outcome.code, "message": outcome.message,
                                                      "details": outcome.details}})
        else:
            notification, replayed = outcome
            results.append({"index": index, "id": notification.id, "status": notification.status,
                            "replayed": replayed})
    accepted = sum(1 for r in results if "id" in r)
    if not accepted:
        raise Unprocessable("no notification in the batch was accepted", {"results": results})
    response = jsonify(accepted=accepted, rejected=len(results) - accepted, results=results)
    response.status_code = 202
    return response


def _not_an_object():
    raise ValidationError({"_schema": ["each item must be a JSON object"]})


@bp.post("/send-verification")
def send_verification():
    """Accept a verification email, sent at high priority."""
    body = json_body(_verification)
    return _accepted_response(
        service().send_verification(current_key(), body, idempotency_header())
    )


@bp.post("/<nid:notification_id>/cancel")
def cancel(notification_id: str):
    """Cancel a notification that has not been sent yet."""
    return _detail(service().cancel(current_key(), notification_id))


@bp.post("/<nid:notification_id>/redeliver-callback")
def redeliver_callback(notification_id: str):
    """Post a final notification's status event to its callback_url again."""
    ext = current_app.extensions["notifier"]
    response = _detail(redelivery.redeliver(ext["redis"], ext["settings"], notification_id, current_key()))
    response.status_code = 202
    return response


# A 405 for another method than GET (PUT, DELETE) on a route that takes only POST allows POST alone:
# werkzeug names /<notification_id>'s GET too.
POST_ONLY_PATHS = frozenset(f"{bp.url_prefix}/{name}" for name in POST_ONLY_NAMES)
POST_ONLY_ALLOW = "OPTIONS, POST"  # the same in a 405 and in an OPTIONS answer


@bp.after_request
def _post_only_options(response):
    # Flask answers OPTIONS with every method of every rule the path matches: GET and HEAD too, for
    # /<notification_id>, which a GET of these paths never reaches (it is 405).
    if request.method == "OPTIONS" and request.path in POST_ONLY_PATHS:
        response.headers["Allow"] = POST_ONLY_ALLOW
    return response


@bp.get("/<nid:notification_id>")
def get_one(notification_id: str):
    """One notification with its history."""
    notification = store.get_for_key(current_key(), notification_id)
    if notification is None:
        raise NotFound("no such notification")
    return _detail(notification)


def _detail(notification):
    notification.history = store.history(notification)
    return jsonify(_one.dump(notification))


@bp.get("")
def list_all():
    """The caller's notifications, newest first, a page at a time."""
    args = page_query(_query, listing.decode_cursor)
    rows, next_cursor = listing.list_for_key(current_key(), before_seq=args.pop("cursor", None), **args)
    return jsonify(data=_many.dump(rows), next=next_cursor)


@bp.get("/user/<user:user_id>/stats")
def user_stats(user_id: str):
    """How many notifications a user has, in total and per status."""
    return jsonify(listing.stats_for_user(current_key(), path_user_id(user_id)))
