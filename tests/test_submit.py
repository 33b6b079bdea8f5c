"""The submit side's listing read-ahead: same items, same errors, no thread left behind."""

from __future__ import annotations

import threading
import time

import pytest

from scheduler.submit import read_ahead


def test_read_ahead_yields_every_item_in_order():
    assert list(read_ahead(iter(range(10_000)), depth=7)) == list(range(10_000))


def test_read_ahead_runs_ahead_of_the_consumer_but_no_further_than_depth():
    produced = []

    def listing():
        for i in range(100):
            produced.append(i)
            yield i

    items = read_ahead(listing(), depth=5)
    assert next(items) == 0
    deadline = time.monotonic() + 5
    while len(produced) < 7 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    # One taken, five waiting in the buffer, one produced and blocked on the full buffer.
    assert len(produced) == 7
    items.close()


def test_read_ahead_raises_the_listing_error_where_it_happened():
    def listing():
        yield 1
        yield 2
        raise PermissionError("AccessDenied on page 2")

    items = read_ahead(listing(), depth=10)
    assert next(items) == 1 and next(items) == 2
    with pytest.raises(PermissionError, match="page 2"):
        next(items)


def test_closing_early_stops_the_producer_thread():
    before = threading.active_count()
    items = read_ahead(iter(range(1_000_000)), depth=3)
    assert next(items) == 0
    items.close()
    assert threading.active_count() == before
