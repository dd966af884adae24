"""What the operator tests share: credentials, an app that knows them, and reading /metrics."""

from __future__ import annotations

import base64
import urllib.request
from dataclasses import replace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from app import create_app
from notifier import metrics

OPERATOR = ("ops", "correct horse battery staple")
CHALLENGE = 'Basic realm="notifier operators"'


def with_operator(settings):
    """settings with the test operator's credentials configured."""
    return replace(settings, operator_username=OPERATOR[0], operator_password=OPERATOR[1])


def operator_client(settings, redis):
    """A test client of the API on settings, with the test operator configured."""
    app = create_app(with_operator(settings), redis=redis)
    app.config["TESTING"] = True
    return app.test_client()


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label pairs): value} of a Prometheus text exposition."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def collect_metrics(redis) -> dict[tuple[str, tuple], float]:
    """What a scrape would show, read straight through the collector, parsed."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.RedisCollector(redis))
    return parse(generate_latest(registry).decode())


def value(samples: dict, name: str, **labels) -> float | None:
    """One sample's value, or None when the scrape does not have it."""
    return samples.get((name, tuple(sorted(labels.items()))))


def total(samples: dict, name: str) -> float:
    """The sum of a metric over all its label sets."""
    return sum(v for (sample, _), v in samples.items() if sample == name)


def scrape(client) -> dict:
    """GET /metrics as the operator, parsed."""
    response = client.get("/metrics", auth=OPERATOR)
    assert response.status_code == 200, response.get_data(as_text=True)
    return parse(response.get_data(as_text=True))


def scrape_url(base: str) -> dict:
    """GET base/metrics over HTTP as the operator, parsed."""
    token = base64.b64encode(f"{OPERATOR[0]}:{OPERATOR[1]}".encode()).decode()
    req = urllib.request.Request(f"{base}/metrics", headers={"Authorization": f"Basic {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return parse(resp.read().decode())
