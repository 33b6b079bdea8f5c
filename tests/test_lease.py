"""Lease tokens name the process that holds a claim, so that a `run` started again can tell a
killed holder from a live one (tests/test_claims.py runs that end to end)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from worker.lease import holder_of, new_token


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="start times come from Linux's /proc")
def test_a_token_names_its_process_until_that_process_is_gone():
    mine = holder_of(new_token())
    assert mine.on_this_machine and not mine.is_gone()          # this very process holds it
    assert len(new_token()) <= 64 and new_token() != new_token()     # the column's width; one per chunk

    child = subprocess.run([sys.executable, "-c", "from worker.lease import new_token; print(new_token())"],
                           capture_output=True, text=True, check=True)
    exited = holder_of(child.stdout.strip())
    assert exited.on_this_machine and exited.is_gone()

    # The id reused by another process (this one stands in for it): a different start time.
    token = new_token()
    reused = token.replace(f":{mine.start}@", f":{int(mine.start) - 1}@")
    assert reused != token and holder_of(reused).is_gone()


def test_tokens_of_other_machines_and_older_versions_are_not_known_to_be_gone():
    elsewhere = holder_of(f"{'a' * 20}.1:1@{'0' * 12}")
    assert elsewhere is not None and not elsewhere.on_this_machine and not elsewhere.is_gone()
    assert holder_of("b" * 32) is None                               # uuid4().hex, as before
