"""Checks every request passes before any route sees it."""

from __future__ import annotations

from flask import Flask, request

from notifier.errors import ApiError


def _has_nul() -> bool:
    # PostgreSQL cannot hold a NUL character in text, and the driver raises rather than send one, so
    # a NUL that reached a query (an id in the path, a filter, an API key) would be a 500.
    if "\x00" in request.path:
        return True
    if any("\x00" in name or "\x00" in value for name, value in request.args.items(multi=True)):
        return True
    return any("\x00" in value for value in request.headers.values())


def init_app(app: Flask) -> None:
    """Refuse, as 400 bad_request, a request whose path, query string or headers hold a NUL character."""

    @app.before_request
    def _refuse_nul():
        if _has_nul():
            raise ApiError("the path, query string and headers must not contain NUL characters")
