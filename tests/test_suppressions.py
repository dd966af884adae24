"""The suppression list through the API, on real PostgreSQL: pages with a cursor, as the other lists."""

from __future__ import annotations

import base64

import pytest

from notifier import consent
from notifier.db import database
from notifier.models import Status, Suppression
from tests.helpers import make_notification

URL = "/api/suppressions"


def _suppress(api_key, *addresses: str) -> None:
    with database.connection_context():
        Suppression.insert_many([{"api_key": api_key.id, "email": a, "reason": "550 5.1.1 no such user"}
                                 for a in addresses]).execute()


def _walk(client, headers, limit: int, between_pages=None) -> tuple[list[str], int]:
    """Every address, page by page, following `next`; and how many pages that took."""
    seen, cursor, pages = [], None, 0
    while True:
        query = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        response = client.get(URL, headers=headers, query_string=query)
        assert response.status_code == 200, response.get_data(as_text=True)
        body = response.get_json()
        assert set(body) == {"data", "next"}
        assert len(body["data"]) <= limit
        seen += [s["email"] for s in body["data"]]
        pages += 1
        if between_pages is not None:
            between_pages(pages)
        cursor = body["next"]
        if cursor is None:
            return seen, pages


def _error(response) -> dict:
    assert response.status_code == 422, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["code"] == "validation_error"
    return error


def test_an_empty_list_has_no_next_page(client, headers):
    response = client.get(URL, headers=headers)
    assert (response.status_code, response.get_json()) == (200, {"data": [], "next": None})


def test_more_than_a_thousand_suppressions_all_come_a_page_at_a_time_newest_first(client, headers, api_key,
                                                                                 other_key):
    addresses = [f"gone-{n}@example.com" for n in range(1005)]
    _suppress(api_key[0], *addresses)
    _suppress(other_key[0], "theirs@example.com")  # another key's list never shows

    first = client.get(URL, headers=headers).get_json()
    assert len(first["data"]) == 50 and first["next"]  # limit's default, and a sign that more exist
    assert first["data"][0] == {"email": "gone-1004@example.com", "reason": "550 5.1.1 no such user",
                                "created_at": first["data"][0]["created_at"]}
    seen, pages = _walk(client, headers, limit=100)  # PAGE_SIZE_MAX's default
    assert pages == 11
    assert seen == addresses[::-1]


def test_pages_stay_whole_while_addresses_are_added_and_removed(client, headers, api_key):
    addresses = [f"gone-{n}@example.com" for n in range(7)]
    _suppress(api_key[0], *addresses)

    def meanwhile(page: int) -> None:
        if page == 1:
            with database.connection_context():
                consent.suppress(api_key[0].id, "late@example.com", "550 no such user")  # newer: not in this walk
                consent.suppress(api_key[0].id, "gone-6@example.com", "again")  # already listed: stays one row
            # One already seen and one not yet seen are removed: nothing else moves.
            assert client.delete(f"{URL}/gone-5@example.com", headers=headers).status_code == 200
            assert client.delete(f"{URL}/gone-1@example.com", headers=headers).status_code == 200

    seen, pages = _walk(client, headers, limit=3, between_pages=meanwhile)
    assert seen == ["gone-6@example.com", "gone-5@example.com", "gone-4@example.com", "gone-3@example.com",
                    "gone-2@example.com", "gone-0@example.com"]
    assert pages == 2
    assert _walk(client, headers, limit=3)[0] == ["late@example.com", "gone-6@example.com", "gone-4@example.com",
                                                  "gone-3@example.com", "gone-2@example.com", "gone-0@example.com"]


def test_a_suppression_cursor_we_did_not_write_is_422(client, headers, api_key):
    _suppress(api_key[0], "a@example.com", "b@example.com", "c@example.com")
    ours = client.get(URL, headers=headers, query_string={"limit": 1}).get_json()["next"]
    assert client.get(URL, headers=headers, query_string={"cursor": ours}).status_code == 200
    key = base64.urlsafe_b64decode(ours + "=" * (-len(ours) % 4)).decode()

    def written(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")

    failed = make_notification(api_key[0], status=Status.FAILED)
    dead_letter = base64.urlsafe_b64encode(f"{failed.updated_at.isoformat()}|{key}".encode()).decode()
    spellings = ["nonsense", "%%%", written(f"0{key}"), written(f"+{key}"), written(f" {key}"), written("0"),
                 written("-1"), written("9" * 25), f"{ours}==", f"{ours[:1]}!{ours[1:]}", dead_letter, "x" * 65]
    for cursor in spellings:
        error = _error(client.get(URL, headers=headers, query_string={"cursor": cursor}))
        assert "cursor" in error["details"], cursor


@pytest.mark.parametrize("query", ["limit=0", "limit=-1", "limit=101", "limit=100000", "limit=ten", "limit=1.5",
                                   "cursor=", "colour=red", "email=a@example.com"])
def test_bad_suppression_list_queries_are_422(client, headers, query):
    error = _error(client.get(f"{URL}?{query}", headers=headers))
    assert set(error["details"]) == {query.split("=")[0]}


def test_limit_takes_one_up_to_page_size_max(client, headers, api_key):
    _suppress(api_key[0], *[f"gone-{n}@example.com" for n in range(101)])
    for limit, listed in ((1, 1), (100, 100)):
        body = client.get(URL, headers=headers, query_string={"limit": limit}).get_json()
        assert len(body["data"]) == listed and body["next"]
    last = client.get(URL, headers=headers, query_string={"limit": 100, "cursor": body["next"]}).get_json()
    assert ([s["email"] for s in last["data"]], last["next"]) == (["gone-0@example.com"], None)
