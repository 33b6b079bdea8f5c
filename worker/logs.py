"""Worker logging: text for terminals, or one JSON object per line for log collectors.

`configure("json")` puts a single handler on the root logger whose lines carry ``timestamp``
(UTC, ISO 8601), ``level``, ``logger``, ``message``, ``pid``, the context of the chunk being
processed (``job_id``, ``chunk`` — the Celery task id —, ``image_ids``) and whatever a call passes
in ``extra`` (``image_id``, ``key``, ``error``, counts, timings). Celery's own setup is kept out
through its ``setup_logging`` signal, so its lines come through the same handler.

The chunk context lives in a context variable set where a chunk starts (`log_context`); thread
pools that work for a chunk copy it into their threads with `inherit_context()` as their
``initializer`` (threads do not inherit context variables by themselves).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
from contextlib import contextmanager
from datetime import datetime, timezone

from .text import printable

FORMATS = ("text", "json")
FORMAT_ENV = "PANOPTIC_LOG_FORMAT"
TEXT_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s%(context)s"
# Libraries whose INFO lines repeat in every pool process and say nothing about the work
# ("Found credentials in environment variables", alembic's plugin set-up): WARNING and up only,
# unless the level asked for is DEBUG.
QUIET_LIBRARIES = ("alembic", "boto3", "botocore", "s3transfer", "urllib3")

_context: contextvars.ContextVar[dict | None] = contextvars.ContextVar("panoptic_log_context", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra` (or a filter).
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "context"}


@contextmanager
def log_context(**fields):
    """Add ``fields`` to every log record made in this context (and in threads that inherit it)."""
    token = _context.set({**(_context.get() or {}), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def current_context() -> dict:
    return _context.get() or {}


def inherit_context():
    """An ``initializer`` for a thread pool: its threads get the context variables of the caller
    (the log context, and the chunk that `worker.metrics` times)."""
    context = contextvars.copy_context()

    def initializer():
        for var, value in context.items():
            var.set(value)
    return initializer


class _ContextFilter(logging.Filter):
    """Copies the current log context onto each record (without overriding explicit extras)."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _context.get()
        if fields:
            for name, value in fields.items():
                if not hasattr(record, name):
                    setattr(record, name, value)
        return True


def _extras(record: logging.LogRecord) -> dict:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, logger, message, pid, then context and extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": datetime.fromtimestamp(record.created, timezone.utc)
                                 .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for name, value in _extras(record).items():
            entry.setdefault(name, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Celery's familiar layout, plus the logger name and the chunk's job id when there is one."""

    def __init__(self):
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        # Messages carry data (keys, job names, errors): escaped, so that none can move the
        # cursor, clear a terminal or start a fake log line. The record is copied: other
        # handlers (JSON) keep the exact text.
        job_id = getattr(record, "job_id", None)
        record = logging.makeLogRecord({**vars(record), "msg": printable(record.getMessage()), "args": None, "exc_text": None,
                                        "context": f" [job {printable(job_id)}]" if job_id else ""})
        return super().format(record)

    def formatException(self, ei) -> str:
        return "\n".join(printable(line) for line in super().formatException(ei).splitlines())

    def formatStack(self, stack_info: str) -> str:
        return "\n".join(printable(line) for line in super().formatStack(stack_info).splitlines())


def make_handler(log_format: str = "text", stream=None) -> logging.Handler:
    """A stream handler (stderr by default) writing ``log_format`` lines, with the log context."""
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {log_format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(_ContextFilter())
    return handler


def configure(log_format: str = "text", level: str | int = "INFO", stream=None) -> None:
    """Route every logger through one handler on the root logger, in ``log_format``.

    Also tells Celery (through its ``setup_logging`` signal) to leave logging alone, in the worker
    and in its pool processes.
    """
    handler = make_handler(log_format, stream)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    if root.getEffectiveLevel() > logging.DEBUG:
        for name in QUIET_LIBRARIES:
            logging.getLogger(name).setLevel(logging.WARNING)
    logging.captureWarnings(True)
    os.environ[FORMAT_ENV] = log_format

    from celery.signals import setup_logging
    setup_logging.connect(_keep_ours, weak=False)


def _keep_ours(loglevel=None, **_):
    """Celery's setup_logging receiver: a receiver being connected is what stops Celery from
    installing its own handlers; only the level it was given is applied."""
    if loglevel:
        logging.getLogger().setLevel(loglevel)
