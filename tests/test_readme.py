"""README.md against the code it describes: the settings table, the routes, the error codes and the
commands. Each grew by hand over many changes, and drifted: a check here fails when one side moves."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import click
import pytest

from app import create_app
from notifier import cli
from notifier.config import DEFAULT_CALLBACK_DENY_NETWORKS, WEEKDAYS, Settings
from notifier.errors import HTTP_CODES

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    """The text of the `## title` section, up to the next section of that level."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def _table_rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip().strip("|").split(" | ")]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| ---")]


# --- Configuration ----------------------------------------------------------------------------------


def _documented_settings() -> dict[str, str]:
    """NAME: the default column, for each row of the Configuration table."""
    rows = _table_rows(_section("Configuration"))
    return {name.strip("`"): default for name, default, *_ in rows if re.fullmatch(r"`[A-Z_]+`", name)}


def _default_as_written(name: str, value) -> str:
    """A default as the table writes it, or "" for one the table describes in words (empty, unset)."""
    if name == "DATABASE_PREPARE":
        return "on" if value else "off"
    if name == "DIGEST_WEEKDAY":
        return WEEKDAYS[value]
    if name == "CALLBACK_DENY_NETWORKS":
        return DEFAULT_CALLBACK_DENY_NETWORKS
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def test_every_setting_is_in_the_configuration_table_and_nothing_else_is():
    documented = _documented_settings()
    settings = {f.name.upper() for f in fields(Settings)}
    assert sorted(settings - set(documented)) == [], "settings missing from README's Configuration table"
    assert sorted(set(documented) - settings) == [], "README documents settings config.py does not have"


def test_the_configuration_table_gives_each_default_as_config_py_has_it():
    defaults = Settings()
    wrong = {}
    for name, cell in _documented_settings().items():
        expected = _default_as_written(name, getattr(defaults, name.lower()))
        shown = re.match(r"`([^`]*)`", cell)
        if name in ("SECRET_KEY", "TEMPLATES_DIR"):  # described in words: a development value, the checkout's
            continue
        if expected:
            if not shown or shown.group(1) != expected:
                wrong[name] = (cell, expected)
        elif shown or not cell.startswith(("empty", "unset")):
            wrong[name] = (cell, "empty")
    assert wrong == {}


# --- HTTP API ---------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"<(?:[a-z]+:)?([a-z_]+)>")
_ROUTE_IN_TEXT = re.compile(r"`(GET|POST|PUT|DELETE) (/[^` ]*)`")


def _as_written(rule: str) -> str:
    """A URL rule as the README writes it: /api/notifications/<nid:notification_id> as .../<id>."""
    return _PLACEHOLDER.sub(lambda m: "<id>" if m.group(1) == "notification_id" else f"<{m.group(1)}>", rule)


@pytest.fixture
def url_map(sqlite_settings, sqlite_db, fake_redis):
    return create_app(sqlite_settings, redis=fake_redis).url_map


def test_every_route_is_in_the_readme_and_every_route_it_lists_is_served(url_map):
    served = {(method, _as_written(rule.rule)) for rule in url_map.iter_rules()
              if not rule.rule.startswith("/rq/")  # rq-dashboard's own pages, documented as /rq
              for method in rule.methods - {"HEAD", "OPTIONS"}}
    written = set(_ROUTE_IN_TEXT.findall(README))
    assert sorted(f"{m} {p}" for m, p in served - written if p != "/metrics") == [], "routes the README never names"
    assert "`/metrics`" in README and "`/rq`" in README

    http_api = _section("HTTP API")
    listed = {route for first, *_ in _table_rows(http_api) for route in _ROUTE_IN_TEXT.findall(first)}
    assert listed, "the HTTP API table was not found"
    assert sorted(f"{m} {p}" for m, p in listed - served) == [], "routes in the HTTP API table that are not served"


def test_every_error_code_the_api_answers_is_in_the_error_table():
    modules = [ROOT / "app.py", *(ROOT / "notifier").rglob("*.py")]
    source = "\n".join(path.read_text(encoding="utf-8") for path in modules)
    raised = re.findall(r'\bcode\s*=\s*"([a-z_]+)"|"code": "([a-z_]+)"', source)
    codes = set(HTTP_CODES.values()) | {code for pair in raised for code in pair if code}
    # Conflict's own default: every Conflict raised names a code of its own.
    codes.discard("conflict")
    table = "\n".join(line for line in _section("HTTP API").splitlines() if re.match(r"\| \d{3}", line))
    in_table = set(re.findall(r"`([a-z_]+)`", "\n".join(row[1] for row in _table_rows(table))))
    assert sorted(codes - in_table) == [], "error codes missing from the README's error table"


# --- Commands ---------------------------------------------------------------------------------------


def _commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        path = (*prefix, name)
        if isinstance(command, click.Group):
            yield from _commands(command, path)
        else:
            yield path, command


def test_every_command_and_option_is_in_the_readme():
    missing = []
    for path, command in _commands(cli.main):
        words = " ".join(path)
        # The Processes table names a command in full or, after another of its group, from its group on:
        # `keys list` (a word alone, `reconcile`, is too common to say the command is there).
        shortened = "|`" if len(path) > 1 else ""
        if not re.search(rf"(python -m notifier {shortened}){re.escape(words)}\b", README):
            missing.append(words)
        missing += [f"{words} {option}" for param in command.params if isinstance(param, click.Option)
                    for option in param.opts if option.startswith("--") and f"`{option}" not in README
                    and f" {option}" not in README]
    assert missing == []


def test_each_command_says_what_it_does_in_whole_words_in_the_help_list():
    # click lists a command by its docstring's first sentence, cut at the first ". ": "Change a key's
    # request rate (e.g." was all `keys --help` said of `keys rate`.
    helps = {" ".join(path): command.get_short_help_str(limit=1000) for path, command in _commands(cli.main)}
    assert {path: text for path, text in helps.items() if text.count("(") != text.count(")")} == {}
