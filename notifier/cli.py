"""Operator commands: API keys and the schema."""

from __future__ import annotations

import click
from peewee import IntegrityError

from notifier import keys
from notifier.db import database
from notifier.runtime import load_settings, open_database


@click.group()
def main() -> None:
    """notifier's command line."""


@main.group(name="keys")
def keys_group() -> None:
    """Manage the API keys of calling services."""


def _open():
    open_database(load_settings())
    return database.connection_context()


@keys_group.command("create")
@click.argument("name")
def keys_create(name: str) -> None:
    """Create a key; its plaintext is the last line printed and is never shown again."""
    with _open():
        try:
            key, plaintext = keys.create(name)
        except IntegrityError:
            raise click.ClickException(f"a key named {name!r} already exists") from None
    click.echo(f"created API key {key.name!r} (prefix {key.prefix}); store it now, it is not shown again:")
    click.echo(plaintext)


@keys_group.command("list")
def keys_list() -> None:
    """List keys: name, prefix, created, revoked."""
    with _open():
        rows = keys.all_keys()
    for key in rows:
        state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
        click.echo(f"{key.name}\t{key.prefix}\tcreated {key.created_at:%Y-%m-%d %H:%M}\t{state}")


@keys_group.command("revoke")
@click.argument("name")
def keys_revoke(name: str) -> None:
    """Revoke a key at once."""
    with _open():
        if not keys.revoke(name):
            raise click.ClickException(f"no active key named {name!r}")
    click.echo(f"revoked {name!r}")


@main.group(name="db")
def db_group() -> None:
    """The database schema."""


@db_group.command("upgrade")
def db_upgrade() -> None:
    """Create or upgrade the schema (safe to run any number of times)."""
    from notifier.db import bind
    from notifier.schema import upgrade

    settings = load_settings()
    version = upgrade(bind(settings.database_url))
    click.echo(f"schema at version {version}")


@main.command("dev")
def dev() -> None:
    """Run API, worker, scheduler, Redis and an SMTP capture server together (what `make run` does)."""
    from notifier.dev import main as run_dev

    raise SystemExit(run_dev())
