"""store.transition and store.claim: the one guarded way a notification's status changes."""

from __future__ import annotations

import pytest

from notifier import keys, store
from notifier.models import TRANSITIONS, Event, Status, allowed_sources
from tests.helpers import make_notification, reload


@pytest.fixture
def owner(sqlite_db):
    key, _ = keys.create("transitions-test")
    return key


def event_count(notification) -> int:
    return Event.select().where(Event.notification == notification.seq).count()


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (Status.QUEUED, Status.SENDING),
        (Status.QUEUED, Status.CANCELLED),
        (Status.SCHEDULED, Status.QUEUED),
        (Status.RETRYING, Status.SENDING),
        (Status.SENDING, Status.SENT),
        (Status.SENDING, Status.RETRYING),
        (Status.FAILED, Status.QUEUED),
    ],
)
def test_transition_from_an_allowed_status_moves_the_notification(owner, source, target):
    notification = make_notification(owner, source)

    assert store.transition(notification.id, target, reason="test") is True
    assert reload(notification.id).status == target


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (Status.SENT, Status.SENDING),
        (Status.SENT, Status.FAILED),
        (Status.CANCELLED, Status.QUEUED),
        (Status.CANCELLED, Status.SENDING),
        (Status.SCHEDULED, Status.SENDING),
        (Status.FAILED, Status.SENT),
        (Status.QUEUED, Status.SENT),
        (Status.SENDING, Status.SENDING),
    ],
)
def test_transition_from_a_disallowed_status_is_refused(owner, source, target):
    notification = make_notification(owner, source)

    assert store.transition(notification.id, target, reason="test") is False
    assert reload(notification.id).status == source


def test_explicit_sources_cannot_widen_the_allowed_transitions(owner):
    notification = make_notification(owner, Status.QUEUED)

    assert store.transition(notification.id, Status.SENT, reason="test", sources=(Status.QUEUED,)) is False
    assert reload(notification.id).status == Status.QUEUED


def test_explicit_sources_narrow_the_allowed_transitions(owner):
    notification = make_notification(owner, Status.QUEUED)

    assert store.transition(notification.id, Status.FAILED, reason="test", sources=(Status.SENDING,)) is False
    assert reload(notification.id).status == Status.QUEUED


def test_transition_of_unknown_id_is_refused(sqlite_db):
    assert store.transition("00000000-0000-0000-0000-000000000000", Status.SENDING, reason="test") is False


def test_successful_transition_appends_a_history_event(owner):
    notification = make_notification(owner, Status.SENDING)

    store.transition(notification.id, Status.RETRYING, reason="451 later", smtp_code=451, smtp_reply="later")

    events = store.history(notification)
    assert [(e.from_status, e.to_status) for e in events] == [(None, "sending"), ("sending", "retrying")]
    last = events[-1]
    assert last.reason == "451 later"
    assert last.smtp_code == 451
    assert last.smtp_reply == "later"


def test_refused_transition_writes_no_event(owner):
    notification = make_notification(owner, Status.SENT)

    store.transition(notification.id, Status.SENDING, reason="should not appear")

    assert event_count(notification) == 1
    assert all(e.reason != "should not appear" for e in store.history(notification))


def test_transition_applies_column_changes(owner):
    notification = make_notification(owner, Status.SENDING)

    store.transition(notification.id, Status.FAILED, reason="550", last_error="550 no such user")

    assert reload(notification.id).last_error == "550 no such user"


def test_refused_transition_leaves_columns_unchanged(owner):
    notification = make_notification(owner, Status.SENT)

    store.transition(notification.id, Status.FAILED, reason="test", last_error="should not be written")

    assert reload(notification.id).last_error is None


def test_claim_moves_queued_to_sending_and_counts_the_attempt(owner):
    notification = make_notification(owner, Status.QUEUED)

    assert store.claim(notification.id) is True

    claimed = reload(notification.id)
    assert claimed.status == Status.SENDING
    assert claimed.attempts == 1


def test_claim_of_retrying_notification_counts_another_attempt(owner):
    notification = make_notification(owner, Status.RETRYING, attempts=2)

    assert store.claim(notification.id) is True
    assert reload(notification.id).attempts == 3


def test_second_claim_is_refused_so_a_job_delivered_twice_sends_once(owner):
    notification = make_notification(owner, Status.QUEUED)

    assert store.claim(notification.id) is True
    assert store.claim(notification.id) is False

    claimed = reload(notification.id)
    assert claimed.status == Status.SENDING
    assert claimed.attempts == 1
    assert [e.to_status for e in store.history(notification)] == ["queued", "sending"]


@pytest.mark.parametrize("status", [Status.SCHEDULED, Status.SENT, Status.FAILED, Status.CANCELLED, Status.SENDING])
def test_claim_refuses_notifications_not_waiting_to_be_sent(owner, status):
    notification = make_notification(owner, status)

    assert store.claim(notification.id) is False
    assert reload(notification.id).attempts == 0
    assert event_count(notification) == 1


def test_claim_records_who_took_it_in_history(owner):
    notification = make_notification(owner, Status.QUEUED)

    store.claim(notification.id)

    last = store.history(notification)[-1]
    assert (last.from_status, last.to_status, last.reason) == ("queued", "sending", "claimed by worker")


def test_every_status_has_a_transition_entry():
    assert set(TRANSITIONS) == set(Status)


@pytest.mark.parametrize("target", list(Status))
def test_allowed_sources_is_the_inverse_of_transitions(target):
    expected = {source for source, targets in TRANSITIONS.items() if target in targets}

    assert allowed_sources(target) == expected


def test_sent_and_cancelled_are_terminal():
    assert TRANSITIONS[Status.SENT] == frozenset()
    assert TRANSITIONS[Status.CANCELLED] == frozenset()


def test_no_status_moves_to_itself():
    assert all(source not in targets for source, targets in TRANSITIONS.items())


def test_only_queued_and_retrying_may_become_sending():
    assert allowed_sources(Status.SENDING) == {Status.QUEUED, Status.RETRYING}


def test_only_sending_may_become_sent():
    assert allowed_sources(Status.SENT) == {Status.SENDING}
