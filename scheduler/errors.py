"""One line, not a traceback, for the mistakes a user makes, with an exit code per kind of mistake.

Scripts (cron, CI) tell the kinds apart by the exit code; people read the line, which names what
was wrong and what to do. The codes below are a contract (README, "Exit codes").
"""

from __future__ import annotations

import contextlib
import gc
import sys

import click

from storage.objects import mask_url
from worker.text import printable

EXIT_IMAGES_FAILED = 1   # run: some images failed (listed on stderr); other commands: a refusal (job not found…)
EXIT_USAGE = 2           # the command line or a setting is wrong (click's own usage errors use 2 too)
EXIT_NO_IMAGES = 3       # SOURCE does not exist, or holds no images
EXIT_WEIGHTS = 4         # the weights cannot be found, read or loaded
EXIT_DATABASE = 5        # the database is unreachable or refused us
EXIT_BROKER = 6          # the broker is unreachable or refused us
EXIT_OBJECT_STORE = 7    # S3 (or a folder) could not be read or written: unreachable, access denied
EXIT_LABEL_MAP = 8       # the label map (--categories) cannot be read, or does not fit the weights' class head


class CommandError(click.ClickException):
    """A refusal shown as one line (`Error: …` on stderr) with its exit code."""

    def __init__(self, message: str, exit_code: int):
        # One line whatever the data holds: control characters (newlines included) escaped.
        super().__init__(printable(message))
        self.exit_code = exit_code


def database_error(exc: BaseException) -> CommandError:
    from storage.db import SchemaTooNew, database_url
    try:
        where = mask_url(database_url()).replace("postgresql+psycopg://", "postgresql://", 1)
    except Exception:                                   # a URL SQLAlchemy cannot parse
        return CommandError(f"PANOPTIC_DATABASE_URL is not a database URL ({_reason(exc)}): use "
                            "sqlite:///FILE or postgresql://USER@HOST/DB", EXIT_USAGE)
    if isinstance(exc, SchemaTooNew):
        return CommandError(f"cannot use the database {where}: {exc}", EXIT_DATABASE)
    if where.startswith("sqlite"):
        advice = "its folder must exist (or be creatable) and both be writable by this user"
    else:
        advice = "the database server must be running and reachable, the user and password right"
    return CommandError(f"cannot use the database {where}: {_reason(exc)}; check PANOPTIC_DATABASE_URL: "
                        f"{advice}", EXIT_DATABASE)


def broker_error(exc: BaseException) -> CommandError:
    from worker.queue import broker_url
    return CommandError(f"cannot reach the broker {mask_url(broker_url())}: {_reason(exc)}; check "
                        "PANOPTIC_BROKER_URL (host, port, password) and that the broker is running", EXIT_BROKER)


def _reason(exc: BaseException) -> str:
    """The first meaningful line of an exception (a driver's own message, not SQLAlchemy's wrapping),
    with any URL in it masked."""
    inner = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    text = lines[0] if lines else type(inner).__name__
    if text.startswith("(") and ") " in text:          # "(psycopg.OperationalError) connection failed: …"
        text = text.split(") ", 1)[1]
    from storage.objects import mask_urls
    return mask_urls(text).rstrip(".")


def _is_instance(exc: BaseException, module: str, name: str) -> bool:
    """isinstance against a class of a module only if that module was imported: a command that never
    touched the broker does not pay for importing kombu here."""
    cls = getattr(sys.modules.get(module), name, None)
    return cls is not None and isinstance(exc, cls)


def translate(exc: BaseException) -> CommandError | None:
    """The one-line error for an exception a user's mistake or environment causes; None for a bug
    (which keeps its traceback)."""
    from storage.objects import InvalidURI, ObjectNotFound, ObjectStoreError
    if isinstance(exc, CommandError):
        return exc
    if _is_instance(exc, "scheduler.submit", "SubmitError"):
        return CommandError(str(exc), getattr(exc, "exit_code", EXIT_USAGE))
    if any(_is_instance(exc, "sqlalchemy.exc", name)
           for name in ("ArgumentError", "OperationalError", "InterfaceError")):
        return database_error(exc)
    if (_is_instance(exc, "kombu.exceptions", "OperationalError") or _is_instance(exc, "amqp.exceptions", "AMQPError")
            or _is_instance(exc, "redis.exceptions", "ConnectionError")):
        return broker_error(exc)
    if _is_instance(exc, "worker.model.weights", "WeightsError") or _is_instance(exc, "worker.weights_source",
                                                                               "WeightsUnavailable"):
        return CommandError(str(exc), EXIT_WEIGHTS)
    if _is_instance(exc, "worker.labels", "LabelMapError"):
        return CommandError(str(exc), EXIT_LABEL_MAP)
    if isinstance(exc, InvalidURI):
        return CommandError(str(exc), EXIT_USAGE)
    if isinstance(exc, ObjectNotFound):
        return CommandError(f"{exc}: check the path, bucket and prefix", EXIT_OBJECT_STORE)
    if isinstance(exc, ObjectStoreError):
        return CommandError(f"{exc}: check the S3 endpoint, credentials and permissions (AWS_* settings)",
                            EXIT_OBJECT_STORE)
    return None


class OneLineErrors(click.Group):
    """The command group whose subcommands' known failures become one line and an exit code."""

    def __call__(self, *args, **kwargs):
        """The console script's entry (tests call `main` instead, in their own process)."""
        try:
            return super().__call__(*args, **kwargs)
        finally:
            # Close the database connections first: frozen, they would never be closed, and SQLite
            # would leave its -wal file (recent commits) beside the database file.
            database = sys.modules.get("storage.db")
            if database is not None:
                with contextlib.suppress(Exception):
                    database.dispose_all()
            # The process is about to end: its objects (torch's, after a run: millions) leave the
            # garbage collector's scans, so that the collections during interpreter shutdown do
            # not walk them. A run exited 1.2-2 s after its last line, now 0.2-0.35 s.
            gc.freeze()

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.exceptions.ClickException as exc:  # messages quote keys, names and URIs: data, escaped
            exc.message = printable(exc.message)
            raise
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            error = translate(exc)
            if error is None:
                raise
            raise error from exc
