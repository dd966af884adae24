"""Headers every answer carries: nothing is cached, and no browser frames, sniffs or refers from it."""

from __future__ import annotations

from flask import Flask

# Answers hold addresses, user ids and unsubscribe tokens, and the API key is sent as X-API-Key, which
# a shared cache (a CDN, a corporate proxy) does not know for a credential as it knows Authorization:
# one that stored GET /api/notifications could hand one key's notifications to another caller.
CACHE_CONTROL = "no-store"
# The unsubscribe page is a form with one button: framed invisibly by another site, a click there
# unsubscribed the reader (clickjacking). Its URL holds the token, so no Referer may carry it off.
PROTECTIONS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}


def add(headers) -> None:
    """Put CACHE_CONTROL and PROTECTIONS into headers, keeping any that an answer set itself."""
    headers.setdefault("Cache-Control", CACHE_CONTROL)
    for name, value in PROTECTIONS.items():
        headers.setdefault(name, value)


def init_app(app: Flask) -> None:
    """Give every answer of the app the headers above: routes', error envelopes', the dashboard's."""

    @app.after_request
    def _add(response):
        add(response.headers)
        return response
