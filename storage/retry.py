"""Retrying transient failures: bounded exponential backoff with full jitter.

A transient failure is one that the same call may not meet again a little later: an S3 endpoint
answering 5xx, SlowDown or RequestTimeout, a connection refused, reset or timed out, a database
that restarted. A permanent one (no such object, access denied, an undecodable image) fails at
once: retrying it only delays the error.

boto3 already retries each S3 request (standard mode, 5 attempts, at most ~15 s of backoff);
:func:`retry_transient` spaces whole calls out across longer outages on top of that — by default
up to 8 calls and ~50 s of sleeping (about half that on average, thanks to the jitter).

Which errors are transient is decided by ``is_transient``; the default, :func:`is_transient`,
reads the ``transient`` attribute that :mod:`storage.objects` sets on every ObjectStoreError and
otherwise counts only the built-in ConnectionError and TimeoutError.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = [
    "DEFAULT_ATTEMPTS", "DEFAULT_BASE_DELAY_S", "DEFAULT_MAX_DELAY_S",
    "backoff_delay", "is_transient", "retry_transient", "retrying",
]

T = TypeVar("T")
log = logging.getLogger(__name__)

# Calls in all (the first included), and the backoff: attempt n (from 0) sleeps a uniformly random
# time in [0, min(DEFAULT_MAX_DELAY_S, DEFAULT_BASE_DELAY_S * 2**n)] ("full jitter", so that many
# workers hit by the same outage do not come back in lockstep). Sleeps at most
# 0.5 + 1 + 2 + 4 + 8 + 16 + 20 = 51.5 s in all.
DEFAULT_ATTEMPTS = 8
DEFAULT_BASE_DELAY_S = 0.5
DEFAULT_MAX_DELAY_S = 20.0


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


def retry_transient(fn: Callable[[], T], *, attempts: int = DEFAULT_ATTEMPTS,
                    base_delay: float = DEFAULT_BASE_DELAY_S, max_delay: float = DEFAULT_MAX_DELAY_S,
                    is_transient: Callable[[BaseException], bool] = is_transient,
                    sleep: Callable[[float], None] = time.sleep, what: str | None = None) -> T:
    """``fn()``, called again after a backoff while it raises a transient error, at most ``attempts`` times.

    A permanent error, or the last transient one, is raised unchanged. ``what`` names the call in
    the warnings logged before each retry.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if attempt + 1 >= attempts or not is_transient(exc):
                raise
            delay = backoff_delay(attempt, base_delay, max_delay)
            log.warning("%s failed with a transient error (%s: %s); retry %d of %d in %.2f s",
                        what or getattr(fn, "__name__", "call"), type(exc).__name__, exc,
                        attempt + 1, attempts - 1, delay)
            sleep(delay)
    raise AssertionError("unreachable")


def retrying(**options) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator form: ``@retrying(attempts=5)`` makes every call go through :func:`retry_transient`."""
    def decorate(func: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(func)
        def wrapper(*args, **kwargs) -> T:
            return retry_transient(lambda: func(*args, **kwargs),
                                   **{"what": func.__qualname__, **options})
        return wrapper
    return decorate
