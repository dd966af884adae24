"""The HTTP baseline: a bare Flask JSON endpoint, served by the same gunicorn settings as the API.

`gunicorn 'bench.bare:create_app()'`. POST /bare parses the JSON body and answers 202 with a small
JSON object, as the send route does; POST /bare/batch answers a batch body with one result per item,
in the batch route's shape. Nothing happens in between: no key, no database, no queue.
"""

from __future__ import annotations

import itertools

from flask import Flask, jsonify, request


def create_app() -> Flask:
    """A Flask app whose routes only parse JSON and answer JSON."""
    app = Flask(__name__)
    counter = itertools.count()

    @app.post("/bare")
    def bare():
        body = request.get_json(force=True)
        return jsonify(id=f"bare-{next(counter)}", status="queued", to=body.get("to")), 202

    @app.post("/bare/batch")
    def bare_batch():
        items = request.get_json(force=True)["notifications"]
        results = [{"index": i, "id": f"bare-{next(counter)}", "status": "queued"} for i, _ in enumerate(items)]
        return jsonify(accepted=len(results), rejected=0, results=results), 202

    return app
