"""Progress for people watching a job: `status --watch`, `run`'s bar, rates and ETAs."""

from __future__ import annotations

import io
import os
import subprocess
import time

from rich.console import Console

from scheduler.progress import JobProgress, RateMeter, format_duration as format_eta
from storage.jobs import JobStore
from tests.test_pipeline import MODEL_ARGS, exe, generated_images


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_rate_is_measured_over_the_recent_window():
    clock = FakeClock()
    meter = RateMeter(window_s=30, clock=clock)
    meter.add(0)
    assert meter.rate is None and meter.eta(100) is None       # one sample: no rate yet
    for _ in range(10):                                          # slow start: 1 image/s
        clock.now += 10
        meter.add(meter._samples[-1][1] + 10)
    for _ in range(6):                                           # now 5 images/s
        clock.now += 10
        meter.add(meter._samples[-1][1] + 50)
    assert abs(meter.rate - 5.0) < 1e-9                          # the slow start has left the window
    assert abs(meter.eta(100) - 20.0) < 1e-9
    assert meter.eta(0) == 0.0


def test_eta_is_readable():
    assert [format_eta(s) for s in (None, 0, 42, 61, 3599, 3600 * 5 + 120)] == ["–", "0s", "42s", "1m01s",
                                                                               "59m59s", "5h02m"]


def test_a_duration_between_two_machines_clocks_is_never_negative():
    # The report's job duration is finished_at - started_at, stamped by different machines.
    assert format_eta(-0.4) == "0s" and format_eta(-30) == "0s"


def test_plain_lines_when_not_a_terminal_are_throttled():
    clock, out = FakeClock(), io.StringIO()
    with JobProgress("job1", 100, Console(file=out, force_terminal=False), plain_every_s=10, clock=clock) as p:
        for done in range(0, 101, 5):                            # one update per second
            p.update(done, failed=done // 50)
            clock.now += 1
    lines = out.getvalue().splitlines()
    assert lines[0] == "job job1: 0/100 done, 0 failed, – img/s, ETA –"
    assert lines[-1].startswith("job job1: 100/100 done, 2 failed, 5.00 img/s, ETA 0s")
    assert len(lines) == 3                                       # t = 0, 10 and 20 (the last)
    assert "\x1b[" not in out.getvalue()                         # no terminal codes in a log file


def test_bar_on_a_terminal():
    clock, out = FakeClock(), io.StringIO()
    with JobProgress("abcdef123456", 40, Console(file=out, force_terminal=True, width=120), clock=clock) as p:
        p.update(0)
        clock.now += 4
        p.update(20, failed=1)
    text = out.getvalue()
    assert "job abcdef12" in text and "20/40" in text and "1 failed" in text
    assert "5.00 img/s" in text and "ETA 4s" in text
    assert "━" in text                                            # the bar itself


def test_status_watch_follows_a_running_job_to_its_end(tmp_path):
    source, dest = tmp_path / "in", tmp_path / "out"
    for key, data in generated_images().items():
        (source / key).parent.mkdir(parents=True, exist_ok=True)
        (source / key).write_bytes(data)
    env = {k: v for k, v in os.environ.items() if k != "PANOPTIC_DATABASE_URL"}
    env["PANOPTIC_DATABASE_URL"] = f"sqlite:///{tmp_path / 'jobs.db'}"
    runner = subprocess.Popen([exe(), "run", str(source), "--dest", str(dest), "--chunk-size", "1", *MODEL_ARGS],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        # Polled in this process: a `status` process every 0.2 s took the CPU the run needs.
        store = JobStore(env["PANOPTIC_DATABASE_URL"])
        deadline = time.monotonic() + 120
        jobs = []
        while not jobs and time.monotonic() < deadline:          # wait for the job to be submitted
            if (tmp_path / "jobs.db").exists():
                try:
                    jobs = store.jobs()
                except Exception:                                # the run is creating the schema
                    jobs = []
            time.sleep(0.2)
        assert jobs, "the job never appeared"
        watch = subprocess.run([exe(), "status", jobs[0].id, "--watch", "--interval", "0.2"],
                               capture_output=True, text=True, env=env, timeout=300)
        run_out, run_err = runner.communicate(timeout=300)
    finally:
        runner.kill()
    assert watch.returncode == 0, watch.stderr
    lines = watch.stdout.splitlines()
    # stdout is a pipe: plain progress lines, then the final state once every image is done.
    assert lines[-1] == f"job {jobs[0].id}: succeeded, 6 of 6 succeeded, 0 failed"
    assert any(line.startswith(f"job {jobs[0].id}: ") and "/6 done" in line for line in lines)
    assert runner.returncode == 0, run_err
    assert "6/6 done" in run_out                                 # run reports its own progress too


def test_status_watch_needs_one_job(tmp_path):
    env = {**os.environ, "PANOPTIC_DATABASE_URL": f"sqlite:///{tmp_path / 'jobs.db'}"}
    result = subprocess.run([exe(), "status", "--watch"], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "--watch needs a JOB_ID" in result.stderr
