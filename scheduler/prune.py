"""`panoptic-batch prune`: delete old finished jobs' rows from SQL, keeping their outputs.

A nightly job of millions of images adds millions of rows (images, per-class rows) every night;
nothing else ever deletes them. Outputs in DEST are the results and are never touched here;
pending and running jobs are never touched either (their workers still write their rows).
"""

from __future__ import annotations

import json
import re
from datetime import timedelta

import click

from storage.schema import FINISHED_JOB_STATES, utcnow
from worker.text import printable

_DURATION_PART = re.compile(r"(\d+)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class DurationType(click.ParamType):
    """30d, 12h, 90m, 2w, 1d12h: a number and a unit (s, m, h, d, w), repeated."""
    name = "DURATION"

    def convert(self, value, param, ctx):
        if isinstance(value, timedelta):
            return value
        text = str(value).strip().lower()
        parts = _DURATION_PART.findall(text)
        if not text or "".join(n + u for n, u in parts) != text:
            self.fail(f"{value!r} is not a duration: write a number and a unit (s, m, h, d, w), e.g. 30d, "
                      "12h or 1d12h", param, ctx)
        return timedelta(seconds=sum(int(n) * _UNIT_SECONDS[u] for n, u in parts))


@click.command("prune")
@click.option("--older-than", "older_than", type=DurationType(), required=True,
              help="Delete jobs that finished longer ago than this: 30d, 12h, 2w, 1d12h…")
@click.option("--state", "states", type=click.Choice(FINISHED_JOB_STATES), multiple=True,
              help="Only jobs in this state (repeatable; default: every finished state). Pending and "
                   "running jobs are never deleted.")
@click.option("--dry-run", is_flag=True, help="Show what would be deleted; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def prune_command(older_than, states, dry_run, as_json):
    """Delete finished jobs older than --older-than from the database (their images' rows and
    per-class statistics with them), keeping every output in DEST. Prints what it deleted."""
    from .jobstore import open_store

    store = open_store()
    cutoff = utcnow() - older_than
    found = store.finished_before(cutoff, states or FINISHED_JOB_STATES)
    if dry_run:
        deleted = found
    else:
        counts = store.delete_jobs([job["id"] for job in found], only_finished=True)
        deleted = [{**job, **counts[job["id"]]} for job in found if job["id"] in counts]
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "cutoff": cutoff.isoformat(), "jobs": [
            {**job, "finished_at": job["finished_at"].isoformat()} for job in deleted]}, indent=1))
        return
    verb = "would delete" if dry_run else "deleted"
    for job in deleted:
        click.echo(f"{verb} job {job['id']} ({printable(job['name'])}, {job['state']}, finished "
                   f"{job['finished_at']:%Y-%m-%d %H:%M} UTC): {job['images']} images, {job['class_rows']} class rows")
    click.echo(f"{verb} {len(deleted)} jobs, {sum(j['images'] for j in deleted)} images, "
               f"{sum(j['class_rows'] for j in deleted)} class rows finished before {cutoff:%Y-%m-%d %H:%M} UTC; "
               "outputs in DEST are kept")
