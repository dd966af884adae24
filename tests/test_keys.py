"""API keys: shown once, stored as a hash, revocable at once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from notifier import keys
from notifier.models import ApiKey
from tests.processes import ROOT


@pytest.fixture
def created(sqlite_db):
    """A live key: (model, plaintext)."""
    return keys.create("billing")


def test_created_plaintext_authenticates_as_its_key(created):
    key, plaintext = created

    authenticated = keys.authenticate(plaintext)

    assert authenticated is not None
    assert authenticated.id == key.id
    assert authenticated.name == "billing"


def test_plaintext_is_never_stored(created):
    key, plaintext = created

    stored = ApiKey.get_by_id(key.id)

    assert stored.key_hash != plaintext
    assert plaintext not in stored.key_hash
    secret = plaintext.split("_", 2)[2]
    assert all(secret not in str(value) for value in stored.__data__.values())


def test_plaintext_has_the_key_prefix(created):
    key, plaintext = created

    assert plaintext.startswith(f"{keys.KEY_PREFIX}_{key.prefix}_")


def test_two_keys_get_different_plaintexts(sqlite_db):
    _, first = keys.create("one")
    _, second = keys.create("two")

    assert first != second
    assert keys.authenticate(first).name == "one"
    assert keys.authenticate(second).name == "two"


def test_key_with_a_changed_character_does_not_authenticate(created):
    _, plaintext = created
    tampered = plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")

    assert keys.authenticate(tampered) is None


@pytest.mark.parametrize(
    "garbled", [None, "", "garbage", "nfy_", "nfy_abc", "nfy_000000000000_secret", "xyz_000000000000_secret", "nfy__"]
)
def test_garbled_or_missing_key_does_not_authenticate(created, garbled):
    assert keys.authenticate(garbled) is None


def test_secret_of_one_key_with_prefix_of_another_does_not_authenticate(sqlite_db):
    first, first_plain = keys.create("one")
    _, second_plain = keys.create("two")
    mixed = f"{keys.KEY_PREFIX}_{first.prefix}_{second_plain.split('_', 2)[2]}"

    assert keys.authenticate(mixed) is None
    assert keys.authenticate(first_plain) is not None


def test_revoked_key_stops_authenticating_at_once(created):
    _, plaintext = created

    assert keys.revoke("billing") is True

    assert keys.authenticate(plaintext) is None


def test_revoking_one_key_leaves_others_working(sqlite_db):
    _, first = keys.create("one")
    _, second = keys.create("two")

    keys.revoke("one")

    assert keys.authenticate(first) is None
    assert keys.authenticate(second) is not None


def test_revoke_of_unknown_name_returns_false(sqlite_db):
    assert keys.revoke("nobody") is False


def test_revoke_of_already_revoked_key_returns_false(created):
    keys.revoke("billing")

    assert keys.revoke("billing") is False


def test_all_keys_lists_revoked_keys_too(sqlite_db):
    keys.create("one")
    keys.create("two")
    keys.revoke("one")

    assert [k.name for k in keys.all_keys()] == ["one", "two"]


# Beyond the bounds Redis refused the limit's script, and the limit was not enforced at all.
@pytest.mark.parametrize("rate", ["0/minute", "10/minute;20/day", "lots", "1/99999999999999999999 seconds",
                                  "99999999999999999999/second", "1000000000001/second", "1/1001 years", "5/0 seconds",
                                  "1 per" + " " * 40 + "second"])
def test_keys_create_refuses_a_rate_that_is_not_one_within_bounds(tmp_path, rate):
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path}/keys.db"}
    done = subprocess.run([sys.executable, "-m", "notifier", "keys", "create", "k", "--rate", rate], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "one rate of 1 to 10^12" in done.stderr


@pytest.mark.parametrize("args", [["k"], ["k", "5/minute", "--default"], ["k", "0/minute"]])
def test_keys_rate_wants_one_rate_in_bounds_or_default(tmp_path, args):
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path}/keys.db"}
    done = subprocess.run([sys.executable, "-m", "notifier", "keys", "rate", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr


def test_key_names_an_operator_could_mistake_for_another_are_refused_and_named(tmp_path):
    # ' svc', 'svc ' and 'SVC' beside 'svc' looked alike in `keys list`, and `keys revoke SVC` said
    # there was no such key while 'svc' went on working.
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path}/keys.db"}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "notifier", "keys", *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    assert run("create", "svc").returncode == 0
    for name in (" svc", "svc "):
        spaced = run("create", name)
        assert spaced.returncode == 2 and "no space at the start or the end" in spaced.stderr
    cased = run("create", "SVC")
    assert cased.returncode == 1 and "a key named 'svc' exists; names that differ only in case" in cased.stderr
    missed = run("revoke", "SVC")
    assert missed.returncode == 1 and "no active key named 'SVC' (there is 'svc')" in missed.stderr
    assert run("revoke", "svc").returncode == 0
    again = run("create", "svc")
    assert again.returncode == 1 and "a key named 'svc' already exists, revoked; choose another name" in again.stderr


def test_set_rate_changes_only_a_live_key(sqlite_db):
    keys.create("live")
    keys.create("gone", rate_limit="1/second")
    keys.revoke("gone")

    assert keys.set_rate("live", "7/minute") and ApiKey.get(ApiKey.name == "live").rate_limit == "7/minute"
    assert keys.set_rate("live", None) and ApiKey.get(ApiKey.name == "live").rate_limit is None
    assert not keys.set_rate("gone", "7/minute") and not keys.set_rate("nobody", "7/minute")
    assert ApiKey.get(ApiKey.name == "gone").rate_limit == "1/second"


@pytest.mark.parametrize("name", ["", "k" * 101])
def test_keys_create_refuses_a_name_the_column_cannot_hold(tmp_path, name):
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path}/keys.db"}
    done = subprocess.run([sys.executable, "-m", "notifier", "keys", "create", name], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "1 to 100 characters" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("name", ["billing\tlive", "billing\nrevoked", "   ", "bill\x1bing"])
def test_keys_create_refuses_a_name_keys_list_cannot_show_on_one_line(tmp_path, name):
    # keys list is one tab-separated line per key: a tab or a line break in a name broke it.
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path}/keys.db"}
    done = subprocess.run([sys.executable, "-m", "notifier", "keys", "create", name], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "printable characters" in done.stderr and "Traceback" not in done.stderr


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "notifier", "keys", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_a_callback_secret_is_rotated_from_the_command_line_and_the_overlap_ended(tmp_path):
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path}/keys.db"}
    assert _cli(env, "create", "billing").returncode == 0
    first = _cli(env, "secret", "billing").stdout.strip()

    rotated = _cli(env, "secret", "billing", "--rotate")
    assert rotated.returncode == 0, rotated.stderr
    # The new secret alone on stdout: NEW=$(keys secret --rotate) took the prose line with it.
    (second,) = rotated.stdout.splitlines()
    assert second.startswith("whsec_") and second != first and "--end-rotation" in rotated.stderr
    shown = _cli(env, "secret", "billing")
    assert shown.stdout.splitlines() == [second] and f"whsec_...{first[-4:]}" in shown.stderr
    assert first not in shown.stderr + shown.stdout  # the receiver holds it: never printed again
    assert "callback secret rotating" in _cli(env, "list").stdout
    third = _cli(env, "secret", "billing", "--rotate")
    assert f"({'whsec_...' + first[-4:]}) no longer signs" in third.stderr and first not in third.stderr
    second = third.stdout.strip().splitlines()[-1]

    assert _cli(env, "secret", "billing", "--end-rotation").returncode == 0
    shown = _cli(env, "secret", "billing")
    assert shown.stdout.splitlines() == [second] and shown.stderr == ""
    again = _cli(env, "secret", "billing", "--end-rotation")
    assert again.returncode == 1 and "being rotated" in again.stderr
    assert _cli(env, "secret", "nobody", "--rotate").returncode == 1


def test_rotating_the_callback_secret_keeps_the_api_key(created):
    key, plaintext = created
    new = keys.rotate_callback_secret("billing")

    stored = ApiKey.get_by_id(key.id)
    assert (stored.callback_secret, stored.old_callback_secret) == (new, key.callback_secret)
    assert keys.authenticate(plaintext).id == key.id
    assert keys.end_callback_rotation("billing")
    assert ApiKey.get_by_id(key.id).old_callback_secret is None
    assert keys.rotate_callback_secret("nobody") is None


def test_a_second_rotation_while_the_first_is_under_way_is_refused_unless_forced(tmp_path):
    # A key holds one previous secret: rotating again without a word cut off the callers still on
    # the original one (401), though the first rotation had said it works until `revoke --old`.
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path}/keys.db"}
    original = _cli(env, "create", "billing").stdout.strip().splitlines()[-1]
    first = _cli(env, "rotate", "billing")
    assert first.returncode == 0, first.stderr
    rotated = first.stdout.strip().splitlines()[-1]

    again = _cli(env, "rotate", "billing")
    assert again.returncode == 1 and "--force" in again.stderr
    assert original.split("_")[1] in again.stderr and original.split("_", 2)[2] not in again.stderr
    with _keys_db(tmp_path):
        assert keys.authenticate(original) is not None and keys.authenticate(rotated) is not None

    forced = _cli(env, "rotate", "billing", "--force")
    assert forced.returncode == 0, forced.stderr
    newest = forced.stdout.strip().splitlines()[-1]
    with _keys_db(tmp_path):
        assert keys.authenticate(original) is None
        assert keys.authenticate(rotated) is not None and keys.authenticate(newest) is not None
    assert _cli(env, "revoke", "billing", "--old").returncode == 0
    assert _cli(env, "rotate", "billing").returncode == 0  # the rotation ended: a new one may begin
    assert _cli(env, "rotate", "nobody").returncode == 1


def _keys_db(tmp_path):
    from notifier.db import bind

    return bind(f"sqlite:///{tmp_path}/keys.db").connection_context()


def test_a_revoked_keys_callback_secret_rotation_can_still_be_ended(tmp_path):
    # Its queued mail's callbacks and redeliveries are still signed: with both secrets for ever, and
    # neither `keys secret` nor `keys list` said so, once the key was revoked mid-rotation.
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path}/keys.db"}
    assert _cli(env, "create", "billing").returncode == 0
    first = _cli(env, "secret", "billing").stdout.strip()
    second = _cli(env, "secret", "billing", "--rotate").stdout.strip()
    assert _cli(env, "revoke", "billing").returncode == 0
    shown = _cli(env, "secret", "billing")
    assert shown.stdout.splitlines() == [second] and f"whsec_...{first[-4:]}" in shown.stderr
    assert "callback secret rotating" in _cli(env, "list").stdout
    ended = _cli(env, "secret", "billing", "--end-rotation")
    assert ended.returncode == 0, ended.stderr
    assert _cli(env, "secret", "billing").stderr == ""
    assert "callback secret rotating" not in _cli(env, "list").stdout
    again = _cli(env, "secret", "billing", "--end-rotation")
    assert again.returncode == 1 and "no key whose callback secret is being rotated" in again.stderr
