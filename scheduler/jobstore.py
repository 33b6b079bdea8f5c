"""The job database as a command opens it, and a job looked up for a command.

Below cli.py, which registers evaluate, export and report as its commands: they use these too,
and the command line itself is imported by nothing."""

from __future__ import annotations

import click


def open_store():
    """The job database, connected (and its schema migrated) now: a database that is down or a
    URL that is wrong is one line and exit code 5 or 2 before the command does anything else."""
    from storage.jobs import JobStore

    from .errors import database_error
    store = JobStore()
    try:
        store.engine
    except Exception as exc:
        raise database_error(exc) from exc
    return store


def refuse_a_newer_database_schema() -> None:
    """A worker older than the database's schema (a newer panoptic-batch migrated it) would fail
    every chunk it took: it does not start (one line, exit 5). A database that cannot be reached
    now does not stop it: workers may start before the database, and chunks wait on the broker."""
    from storage.db import SchemaTooNew
    from storage.jobs import JobStore

    from .errors import database_error
    try:
        JobStore().engine
    except SchemaTooNew as exc:
        raise database_error(exc) from exc
    except Exception:       # noqa: BLE001 - unreachable for now: the chunks' own database calls retry
        pass


def find_job(store, job_id):
    """The job with this id or unique id prefix; an unknown one is a one-line click error, not a traceback."""
    from storage.jobs import JobNotFound
    try:
        return store.job(job_id)
    except JobNotFound as exc:
        raise click.ClickException(str(exc.args[0] if exc.args else exc)) from exc
