"""Retrying transient failures: exponential backoff with full jitter, within a time budget.

A transient failure is one that the same call may not meet again a little later: an S3 endpoint
answering 5xx, SlowDown or RequestTimeout, a connection refused, reset or timed out, a database
that restarted. A permanent one (no such object, access denied, an undecodable image) fails at
once: retrying it only delays the error.

boto3 already retries each S3 request (standard mode, 5 attempts, at most ~15 s of backoff);
:func:`retry_transient` spaces whole calls out across longer outages on top of that. It retries
for a *time budget*, not a number of tries: an outage costs time, not images, as long as it is
shorter than the budget (``PANOPTIC_RETRY_SECONDS``, default 120 s, for the object store's reads,
writes and listings). Callers with other needs (the database) may bound the calls instead.

Which errors are transient is decided by ``is_transient``; the default, :func:`is_transient`,
reads the ``transient`` attribute that :mod:`storage.objects` sets on every ObjectStoreError and
otherwise counts only the built-in ConnectionError and TimeoutError.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = [
    "DEFAULT_BUDGET_S", "BUDGET_ENV", "DEFAULT_BASE_DELAY_S", "DEFAULT_MAX_DELAY_S",
    "backoff_delay", "is_transient", "retry_budget", "retry_transient", "retrying",
]

T = TypeVar("T")
log = logging.getLogger(__name__)

# How long a call keeps being retried after its first try, by default; above the "about a
# minute" of outage the README promises to ride out, plus the last call's own time.
DEFAULT_BUDGET_S = 120.0
BUDGET_ENV = "PANOPTIC_RETRY_SECONDS"
# Retry n (from 0) sleeps a uniformly random time in [0, min(DEFAULT_MAX_DELAY_S,
# DEFAULT_BASE_DELAY_S * 2**n)] ("full jitter", so that many workers hit by the same outage do
# not come back in lockstep); the cap keeps a recovered store from waiting long to be noticed.
DEFAULT_BASE_DELAY_S = 0.5
DEFAULT_MAX_DELAY_S = 10.0


def retry_budget() -> float:
    """Seconds of retrying allowed per call: ``$PANOPTIC_RETRY_SECONDS``, else DEFAULT_BUDGET_S."""
    text = os.environ.get(BUDGET_ENV, "").strip()
    if not text:
        return DEFAULT_BUDGET_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{BUDGET_ENV}={text!r}: expected a number of seconds (0 or more)")
    return value


def backoff_delay(attempt: int, base_delay: float = DEFAULT_BASE_DELAY_S,
                  max_delay: float = DEFAULT_MAX_DELAY_S, rng: random.Random | None = None) -> float:
    """Full-jitter delay before retry number ``attempt + 1`` (``attempt`` counts from 0)."""
    cap = min(max_delay, base_delay * (2 ** min(attempt, 62)))
    return (rng or random).uniform(0.0, cap)


def is_transient(exc: BaseException) -> bool:
    """The exception's own ``transient`` flag if it has one; else connection errors and timeouts."""
    flag = getattr(exc, "transient", None)
    if flag is not None:
        return bool(flag)
    return isinstance(exc, (ConnectionError, TimeoutError))


def retry_transient(fn: Callable[[], T], *, budget: float | None = None, attempts: int | None = None,
                    base_delay: float = DEFAULT_BASE_DELAY_S, max_delay: float = DEFAULT_MAX_DELAY_S,
                    is_transient: Callable[[BaseException], bool] = is_transient,
                    sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                    what: str | None = None) -> T:
    """``fn()``, called again after a backoff while it raises a transient error.

    Retries stop once ``budget`` seconds have passed since the first call (no sleep goes past
    that moment; one last call is made at it), or after ``attempts`` calls if given. Without
    either, the budget is :func:`retry_budget`; with ``attempts`` alone, calls are the only bound.
    A permanent error, or the last transient one, is raised unchanged. ``what`` names the call
    in the warnings logged before each retry.
    """
    if attempts is not None and attempts < 1:
        raise ValueError("attempts must be at least 1")
    if budget is None:
        budget = math.inf if attempts is not None else retry_budget()
    deadline = clock() + budget
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            left = deadline - clock()
            if not is_transient(exc) or left <= 0 or (attempts is not None and attempt + 1 >= attempts):
                raise
            delay = min(backoff_delay(attempt, base_delay, max_delay), left)
            attempt += 1
            log.warning("%s failed with a transient error (%s: %s); retry %d in %.2f s (%.0f s left to retry)",
                        what or getattr(fn, "__name__", "call"), type(exc).__name__, exc, attempt, delay,
                        left)
            sleep(delay)


def retrying(**options) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator form: ``@retrying(budget=30)`` makes every call go through :func:`retry_transient`."""
    def decorate(func: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(func)
        def wrapper(*args, **kwargs) -> T:
            return retry_transient(lambda: func(*args, **kwargs),
                                   **{"what": func.__qualname__, **options})
        return wrapper
    return decorate
