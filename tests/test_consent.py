"""Time-controlled unit tests: quiet hours, digest windows across DST changes, and what decide() does."""

from __future__ import annotations

import base64
import string
from dataclasses import replace
from datetime import datetime, timedelta

import pytest
from rq.timeouts import JobTimeoutException

from notifier import consent, digests, keys, store
from notifier.models import Category, DeliveryMode, Digest, Notification, Status, UserProfile, utcnow
from notifier.runtime import make_renderer
from tests.helpers import make_notification, reload


def utc(*args) -> datetime:
    return datetime(*args)


@pytest.mark.parametrize(
    ("tz", "start", "end", "at", "expected_end"),
    [
        ("UTC", "22:00", "07:00", utc(2026, 6, 1, 23, 30), utc(2026, 6, 2, 7, 0)),  # overnight, before midnight
        ("UTC", "22:00", "07:00", utc(2026, 6, 2, 3, 0), utc(2026, 6, 2, 7, 0)),  # overnight, after midnight
        ("UTC", "22:00", "07:00", utc(2026, 6, 2, 12, 0), None),  # daytime
        ("UTC", "12:00", "14:00", utc(2026, 6, 2, 13, 0), utc(2026, 6, 2, 14, 0)),  # same-day window
        ("UTC", "22:00", "07:00", utc(2026, 6, 2, 7, 0), None),  # the end is not quiet any more
        # Berlin is UTC+2 in summer: 21:30 UTC is 23:30 local, quiet until 07:00 local = 05:00 UTC
        ("Europe/Berlin", "22:00", "07:00", utc(2026, 6, 1, 21, 30), utc(2026, 6, 2, 5, 0)),
        # The night DST ends in Berlin (25 Oct 2026, 03:00 -> 02:00): 07:00 local is UTC+1 again
        ("Europe/Berlin", "22:00", "07:00", utc(2026, 10, 24, 21, 30), utc(2026, 10, 25, 6, 0)),
        # The night DST starts (29 Mar 2026, 02:00 -> 03:00): 07:00 local is already UTC+2
        ("Europe/Berlin", "22:00", "07:00", utc(2026, 3, 28, 22, 30), utc(2026, 3, 29, 5, 0)),
        ("America/New_York", "21:00", "08:00", utc(2026, 11, 1, 3, 0), utc(2026, 11, 1, 13, 0)),
        # Quiet hours that end inside the repeated hour, asked during its second pass (02:10 CET): the
        # end is the 02:30 still to come (01:30 UTC), not the one already gone (00:30 UTC).
        ("Europe/Berlin", "22:00", "02:30", utc(2026, 10, 25, 1, 10), utc(2026, 10, 25, 1, 30)),
        ("Europe/Berlin", "22:00", "02:30", utc(2026, 10, 25, 0, 10), utc(2026, 10, 25, 0, 30)),  # the first
        # Quiet hours that end inside the hour skipped in spring (28 Mar 2027, 02:00 CET -> 03:00
        # CEST): 02:30 never comes; they end as the clocks jump (01:00 UTC), not at 00:30 UTC (01:30
        # CET, still quiet); and mail at 03:10 CEST, after the jump, is outside them.
        ("Europe/Berlin", "22:00", "02:30", utc(2027, 3, 28, 0, 20), utc(2027, 3, 28, 1, 0)),
        ("Europe/Berlin", "22:00", "02:30", utc(2027, 3, 28, 1, 10), None),
        ("America/New_York", "23:00", "02:15", utc(2027, 3, 14, 5, 0), utc(2027, 3, 14, 7, 0)),
    ],
)
def test_quiet_hours_end_in_the_users_own_time(tz, start, end, at, expected_end):
    profile = UserProfile(timezone=tz, quiet_start=start, quiet_end=end)
    assert consent.quiet_until(profile, at) == expected_end


def test_no_quiet_hours_without_a_profile_or_with_a_half_set_one():
    assert consent.quiet_until(None, utc(2026, 6, 1, 23, 0)) is None
    assert consent.quiet_until(UserProfile(timezone="UTC", quiet_start="22:00"), utc(2026, 6, 1, 23, 0)) is None


@pytest.mark.parametrize(
    ("instant", "expected"),
    [
        # Berlin 08:00 is 07:00 UTC in winter and 06:00 UTC in summer; the windows follow it.
        (utc(2026, 3, 27, 12, 0), utc(2026, 3, 28, 7, 0)),
        (utc(2026, 3, 28, 7, 0), utc(2026, 3, 29, 6, 0)),  # the 23-hour window across the spring change
        (utc(2026, 10, 24, 6, 0), utc(2026, 10, 25, 7, 0)),  # the 25-hour window across the autumn change
        (utc(2026, 10, 25, 7, 0), utc(2026, 10, 26, 7, 0)),
    ],
)
def test_daily_digest_windows_follow_daylight_saving_time(instant, expected):
    assert digests.boundary_after(instant, "Europe/Berlin", "08:00") == expected


def test_window_boundaries_before_and_after_agree():
    for hours in range(0, 24 * 10, 5):
        instant = utc(2026, 3, 24) + timedelta(hours=hours)
        before = digests.boundary_at_or_before(instant, "Europe/Berlin", "08:00")
        after = digests.boundary_after(instant, "Europe/Berlin", "08:00")
        assert before <= instant < after
        assert digests.boundary_after(before, "Europe/Berlin", "08:00") == after


def test_weekly_windows_end_on_the_configured_weekday():
    monday = 0
    # Sunday 29 March 2026 (the DST change) -> Monday 30 March 08:00 Berlin = 06:00 UTC
    assert digests.boundary_after(utc(2026, 3, 29, 12, 0), "Europe/Berlin", "08:00", monday) == utc(2026, 3, 30, 6)
    assert digests.boundary_at_or_before(utc(2026, 3, 29, 12, 0), "Europe/Berlin", "08:00", monday) == utc(
        2026, 3, 23, 7)


@pytest.fixture
def owner(sqlite_db):
    return keys.create("consent-test")[0]


NOON = datetime(2026, 6, 1, 12, 0)


def _decide(owner, category=Category.PRODUCT, at=NOON, send_at=None, to="ann@example.com"):
    return consent.decide(owner, to=to, user_key="u1", category=category, send_at=send_at, now=at)


def test_decide_follows_preferences_except_for_transactional_mail(owner):
    assert _decide(owner).status is Status.QUEUED
    for mode, status in [(DeliveryMode.OFF, Status.SUPPRESSED), (DeliveryMode.DAILY, Status.HELD),
                         (DeliveryMode.WEEKLY, Status.HELD), (DeliveryMode.IMMEDIATE, Status.QUEUED)]:
        consent.set_mode(owner, "u1", Category.PRODUCT.value, mode.value)
        assert _decide(owner).status is status
        assert _decide(owner, Category.TRANSACTIONAL).status is Status.QUEUED


def test_a_held_notification_keeps_its_requested_send_time(owner):
    consent.set_mode(owner, "u1", Category.PRODUCT.value, DeliveryMode.DAILY.value)
    later = NOON + timedelta(days=5)
    assert _decide(owner, send_at=later) == consent.Decision(Status.HELD, "collected for the user's daily product "
                                                                          "digest", later)


def test_quiet_hours_delay_only_non_transactional_mail(owner):
    consent.update_preferences(owner, "u1", {"timezone": "UTC", "quiet_hours": {"start": "22:00", "end": "07:00"}})
    night = utc(2026, 6, 1, 23, 0)
    decision = _decide(owner, at=night)
    assert (decision.status, decision.send_at) == (Status.SCHEDULED, utc(2026, 6, 2, 7, 0))
    assert _decide(owner, Category.TRANSACTIONAL, at=night).status is Status.QUEUED
    # A send asked for during the night is moved to the morning too.
    assert _decide(owner, send_at=night).send_at == utc(2026, 6, 2, 7, 0)


def test_a_suppressed_address_is_never_sent_whatever_the_category(owner):
    consent.suppress(owner.id, "Ann@Example.com", "550 5.1.1 no such user")
    consent.suppress(owner.id, "ann@example.com", "again")  # once only
    for category in Category:
        decision = _decide(owner, category)
        assert decision.status is Status.SUPPRESSED and "no such user" in decision.reason


def test_unsubscribe_tokens_carry_key_user_and_category_and_refuse_tampering(sqlite_settings):
    from notifier.unsubscribe import make_token, read_token

    token = make_token(sqlite_settings, 7, "u1", "product")
    assert read_token(sqlite_settings, token) == (7, "u1", "product")
    assert read_token(sqlite_settings, token[:-2] + ("AA" if not token.endswith("AA") else "BB")) is None
    assert read_token(replace(sqlite_settings, secret_key="another deployment"), token) is None


def test_an_unsubscribe_token_shows_nothing_of_whom_it_unsubscribes(sqlite_settings):
    # A link is kept wherever URLs are (a proxy's logs, a link scanner's, a forwarded email), and its
    # user key is often the address itself: signed but readable, the token gave it away in base64.
    from itsdangerous import URLSafeSerializer

    from notifier.unsubscribe import SALT, make_token, read_token

    token = make_token(sqlite_settings, 7, "email:ann@example.com", "marketing")
    assert set(token) <= set(string.ascii_letters + string.digits + "-_")  # as a URL path takes it, no padding
    opened = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert b"ann" not in opened and b"marketing" not in opened
    assert read_token(sqlite_settings, token) == (7, "email:ann@example.com", "marketing")
    assert make_token(sqlite_settings, 7, "email:ann@example.com", "marketing") != token  # each one fresh
    # Links in mail sent before keep working while SECRET_KEY stays the same.
    before = URLSafeSerializer(sqlite_settings.signing_key, salt=SALT).dumps(
        {"k": 7, "u": "email:ann@example.com", "c": "marketing"})
    assert read_token(sqlite_settings, before) == (7, "email:ann@example.com", "marketing")
    assert read_token(replace(sqlite_settings, secret_key="another deployment"), before) is None


def test_a_rotated_secret_key_keeps_the_links_it_made_while_it_is_a_fallback(sqlite_settings):
    # Changing SECRET_KEY (it leaked; a yearly rotation) broke every unsubscribe link in mail already
    # sent, which the law in many places wants working for weeks after the mail went out.
    from itsdangerous import URLSafeSerializer

    from notifier.config import Settings
    from notifier.unsubscribe import SALT, make_token, read_token

    old = replace(sqlite_settings, secret_key="the secret of last year")
    rotated = replace(sqlite_settings, secret_key="the secret of this year", secret_key_fallbacks=(old.secret_key,))
    made_before = make_token(old, 7, "u1", "marketing")
    signed_before = URLSafeSerializer(old.signing_key, salt=SALT).dumps({"k": 7, "u": "u1", "c": "marketing"})
    for token in (made_before, signed_before):
        assert read_token(rotated, token) == (7, "u1", "marketing")
        assert read_token(replace(rotated, secret_key_fallbacks=()), token) is None  # dropped: it stops working
    made_now = make_token(rotated, 7, "u1", "marketing")
    this_year = replace(sqlite_settings, secret_key="the secret of this year")
    assert read_token(this_year, made_now) == (7, "u1", "marketing")
    assert read_token(old, made_now) is None  # new links are made with SECRET_KEY only
    env = {"SECRET_KEY": "new", "SECRET_KEY_FALLBACKS": " old-1 ,, old-2 "}
    assert Settings.from_env(env).secret_key_fallbacks == ("old-1", "old-2")


def _held(owner, n, created):
    rows = []
    for i in range(n):
        row = make_notification(owner, status=Status.HELD, template="welcome", data={"name": f"N{i}"},
                                category="product", user_key="u1", to="ann@example.com", subject=None, text=None)
        Notification.update(created_at=created).where(Notification.seq == row.seq).execute()
        rows.append(row)
    return rows


def test_a_digest_takes_each_item_once_and_only_from_closed_windows(owner, sqlite_settings, fake_redis):
    consent.set_mode(owner, "u1", "product", "daily")
    settings = replace(sqlite_settings, digest_time="08:00", digest_grace_seconds=0)
    renderer = make_renderer(settings)
    early = _held(owner, 3, utc(2026, 6, 1, 9, 0))
    late = _held(owner, 1, utc(2026, 6, 2, 8, 30))  # after the 2 June 08:00 boundary: the next window

    assert digests.flush_due(settings, fake_redis, renderer, now=utc(2026, 6, 1, 20, 0)) == 0  # window open
    assert digests.flush_due(settings, fake_redis, renderer, now=utc(2026, 6, 2, 9, 0)) == 1
    assert digests.flush_due(settings, fake_redis, renderer, now=utc(2026, 6, 2, 9, 5)) == 0  # no second one
    (digest,) = Digest.select()
    assert digest.items == 3 and digest.window_end == utc(2026, 6, 2, 8, 0)
    assert {reload(n.id).status for n in early} == {Status.IN_DIGEST}  # until the digest is sent
    assert {reload(n.id).digest_id for n in early} == {digest.notification_id}
    assert reload(late[0].id).status == Status.HELD
    made = store.get(digest.notification_id)
    assert made.template == "digest" and made.status == Status.QUEUED
    assert [item["subject"] for item in made.data["items"]] == ["Welcome to Acme"] * 3

    assert digests.flush_due(settings, fake_redis, renderer, now=utc(2026, 6, 3, 9, 0)) == 1
    assert reload(late[0].id).status == Status.IN_DIGEST


def test_a_window_takes_a_held_item_only_once_its_send_at_is_at_or_before_the_window_end(
        owner, sqlite_settings, fake_redis):
    consent.set_mode(owner, "u1", "product", "daily")
    settings = replace(sqlite_settings, digest_time="08:00", digest_grace_seconds=0)
    renderer = make_renderer(settings)
    on_time, just_after = _held(owner, 2, utc(2026, 6, 1, 9, 0))
    Notification.update(send_at=utc(2026, 6, 2, 8, 0)).where(Notification.seq == on_time.seq).execute()
    Notification.update(send_at=utc(2026, 6, 2, 8, 0, 0, 1)).where(Notification.seq == just_after.seq).execute()

    assert digests.flush_due(settings, fake_redis, renderer, now=utc(2026, 6, 2, 9, 0)) == 1
    assert (reload(on_time.id).status, reload(just_after.id).status) == (Status.IN_DIGEST, Status.HELD)
    assert digests.flush_due(settings, fake_redis, renderer, now=utc(2026, 6, 3, 9, 0)) == 1
    assert reload(just_after.id).status == Status.IN_DIGEST
    assert [d.window_end for d in Digest.select().order_by(Digest.window_end)] == [utc(2026, 6, 2, 8, 0),
                                                                                  utc(2026, 6, 3, 8, 0)]


def test_turning_a_category_off_suppresses_what_was_held(owner, sqlite_settings, fake_redis):
    held = _held(owner, 2, utc(2026, 6, 1, 9, 0))
    consent.set_mode(owner, "u1", "product", "off")
    digests.flush_due(sqlite_settings, fake_redis, make_renderer(sqlite_settings), now=utc(2026, 6, 2, 9, 0))
    assert {reload(n.id).status for n in held} == {Status.SUPPRESSED}
    assert Digest.select().count() == 0


def test_a_crash_mid_flush_neither_drops_nor_duplicates_items(owner, sqlite_settings, fake_redis, monkeypatch):
    consent.set_mode(owner, "u1", "product", "daily")
    settings = replace(sqlite_settings, digest_time="08:00", digest_grace_seconds=0)
    renderer = make_renderer(settings)
    items = _held(owner, 3, utc(2026, 6, 1, 9, 0))

    def crash(*args, **kwargs):
        raise JobTimeoutException("the job's time limit ran out mid-flush")

    # The job is stopped after the digest row and its notification were written, before the items
    # moved (a worker killed there leaves the transaction uncommitted the same way).
    monkeypatch.setattr(store, "transition_many", crash)
    with pytest.raises(JobTimeoutException):
        digests.flush_due(settings, fake_redis, renderer, now=utc(2026, 6, 2, 9, 0))
    assert Digest.select().count() == 0
    assert Notification.select().where(Notification.template == "digest").count() == 0
    assert {reload(n.id).status for n in items} == {Status.HELD}

    monkeypatch.undo()
    assert digests.flush_due(settings, fake_redis, renderer, now=utc(2026, 6, 2, 9, 0)) == 1
    (digest,) = Digest.select()
    assert digest.items == 3
    assert {reload(n.id).digest_id for n in items} == {digest.notification_id}


class _TimedOutRenderer:
    """A renderer in which RQ's time limit runs out (SIGALRM raises wherever the job is)."""

    def summary(self, name, data):
        raise JobTimeoutException("the job's time limit ran out while an item rendered")


def test_the_jobs_time_limit_while_an_item_renders_ends_the_pass(owner, sqlite_settings, fake_redis):
    # An item whose template cannot be rendered is shown by its name; the job's time limit running out
    # meanwhile is not such an item: the pass ends there, with nothing made, as anywhere else in it.
    consent.set_mode(owner, "u1", "product", "daily")
    settings = replace(sqlite_settings, digest_time="08:00", digest_grace_seconds=0)
    items = _held(owner, 2, utc(2026, 6, 1, 9, 0))

    with pytest.raises(JobTimeoutException):
        digests.flush_due(settings, fake_redis, _TimedOutRenderer(), now=utc(2026, 6, 2, 9, 0))
    assert Digest.select().count() == 0
    assert {reload(n.id).status for n in items} == {Status.HELD}


# --- deadlines of held items --------------------------------------------------------------------------


def _deadline(item, at: datetime) -> None:
    Notification.update(expires_at=at).where(Notification.seq == item.seq).execute()


def _shown(digest_id: str) -> list[str]:
    """The text of each item a digest shows."""
    return [item["text"] for item in store.get(digest_id).data["items"]]


def test_a_digest_expires_held_items_past_their_deadline_instead_of_taking_them(owner, sqlite_settings, fake_redis):
    consent.set_mode(owner, "u1", "product", "daily")
    settings = replace(sqlite_settings, digest_time="08:00", digest_grace_seconds=0)
    overdue, on_time, alive = _held(owner, 3, utc(2026, 6, 1, 9, 0))
    _deadline(overdue, utc(2026, 6, 2, 8, 30))  # after the window's end, before the digest is made
    _deadline(on_time, utc(2026, 6, 2, 9, 0))  # the very moment it is made: too late as well
    _deadline(alive, utc(2026, 6, 2, 9, 30))

    assert digests.flush_due(settings, fake_redis, make_renderer(settings), now=utc(2026, 6, 2, 9, 0)) == 1
    (digest,) = Digest.select()
    assert digest.items == 1
    assert (reload(alive.id).status, reload(alive.id).digest_id) == (Status.IN_DIGEST, digest.notification_id)
    assert len(_shown(digest.notification_id)) == 1 and "N2" in _shown(digest.notification_id)[0]
    for item in (overdue, on_time):
        expired = reload(item.id)
        assert (expired.status, expired.digest_id) == (Status.EXPIRED, None)
        last = store.history(expired)[-1]
        assert (last.from_status, last.to_status) == ("held", "expired")
        assert last.reason == "deadline passed while it was held for a digest"


def test_no_digest_is_made_of_items_that_all_expired(owner, sqlite_settings, fake_redis):
    consent.set_mode(owner, "u1", "product", "daily")
    settings = replace(sqlite_settings, digest_time="08:00", digest_grace_seconds=0)
    items = _held(owner, 2, utc(2026, 6, 1, 9, 0))
    for item in items:
        _deadline(item, utc(2026, 6, 2, 8, 30))

    assert digests.flush_due(settings, fake_redis, make_renderer(settings), now=utc(2026, 6, 2, 9, 0)) == 0
    assert Digest.select().count() == 0
    assert Notification.select().where(Notification.template == "digest").count() == 0
    assert {reload(n.id).status for n in items} == {Status.EXPIRED}


def _made_digest(owner, settings, fake_redis, count: int) -> tuple[str, list[Notification]]:
    """A daily digest of count held items, made (queued) and not yet sent: (its id, its items)."""
    consent.set_mode(owner, "u1", "product", "daily")
    settings = replace(settings, digest_time="08:00", digest_grace_seconds=0)
    items = _held(owner, count, utc(2026, 6, 1, 9, 0))
    assert digests.flush_due(settings, fake_redis, make_renderer(settings), now=utc(2026, 6, 2, 9, 0)) == 1
    (digest,) = Digest.select()
    return digest.notification_id, items


def test_an_item_whose_deadline_passes_before_its_digest_is_sent_is_left_out_of_it(
        owner, memory_deliverer, fake_redis):
    digest_id, (first, late, last) = _made_digest(owner, memory_deliverer.settings, fake_redis, 3)
    # Its deadline passes while the digest waits for its worker (the worker's clock is the real one).
    _deadline(late, utcnow() - timedelta(seconds=1))

    assert memory_deliverer.deliver(digest_id) == "sent"

    (sent,) = memory_deliverer.mailer.sent
    text = sent.get_body(("plain",)).get_content()
    assert "2 updates today" in text and "Hi N0," in text and "Hi N2," in text and "Hi N1," not in text
    assert len(_shown(digest_id)) == 2  # what the digest holds is what went out
    assert {reload(n.id).status for n in (first, last)} == {Status.DIGESTED}
    expired = reload(late.id)
    assert (expired.status, expired.sent_at, expired.digest_id) == (Status.EXPIRED, None, digest_id)
    line = store.history(expired)[-1]
    assert (line.from_status, line.to_status) == ("in_digest", "expired")
    assert line.reason == f"deadline passed before digest {digest_id} was sent"


def test_a_digest_whose_every_item_expired_before_it_was_sent_is_not_sent(owner, memory_deliverer, fake_redis):
    digest_id, items = _made_digest(owner, memory_deliverer.settings, fake_redis, 2)
    for item in items:
        _deadline(item, utcnow() - timedelta(seconds=1))

    assert memory_deliverer.deliver(digest_id) == "expired"

    assert memory_deliverer.mailer.sent == []
    assert reload(digest_id).status == Status.EXPIRED
    for item in items:
        expired = reload(item.id)
        assert (expired.status, expired.sent_at) == (Status.EXPIRED, None)
        assert store.history(expired)[-1].reason.startswith(f"digest {digest_id} expired: ")
