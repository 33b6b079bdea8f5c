"""Every command that takes a JOB_ID finds the job the same way (scheduler/jobstore.py): an unknown id
is one line that names it, never a traceback, and nothing is written."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from scheduler.cli import main


@pytest.mark.parametrize("args", [
    ["status", "{job}"], ["status", "{job}", "--failed"], ["cancel", "{job}"], ["retry", "{job}"],
    ["stats", "{job}"], ["export", "{job}", "--out", "{tmp}/export.json"], ["report", "{job}", "--out", "{tmp}/report"],
], ids=lambda args: " ".join(a for a in args if "{" not in a))
def test_an_unknown_job_is_one_line_naming_it(tmp_path, args):
    env = {"PANOPTIC_DATABASE_URL": f"sqlite:///{tmp_path / 'db' / 'jobs.db'}"}
    (tmp_path / "db").mkdir()
    argv = [a.format(job="feedface", tmp=tmp_path) for a in args]
    result = CliRunner().invoke(main, argv, env=env)
    assert result.exit_code not in (0, None) and not isinstance(result.exception, KeyError), result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "no job with id 'feedface'" in lines[0], result.output
    assert [p.name for p in tmp_path.iterdir()] == ["db"]                      # no export, no report
