"""The console script as a user runs it: help, predict outputs, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image

SUBCOMMANDS = ["predict", "submit", "worker", "run", "status", "stats", "cancel", "retry", "reap", "export",
               "evaluate", "report", "prune"]


def panoptic_batch(*args, env=None, cwd=None, timeout=600):
    exe = shutil.which("panoptic-batch", path=os.path.dirname(sys.executable)) or shutil.which("panoptic-batch")
    assert exe, "the panoptic-batch console script is not installed"
    return subprocess.run([exe, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def test_help_lists_every_subcommand():
    result = panoptic_batch("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help(name):
    # In this process: the console script itself is run by the test above (and many others).
    from click.testing import CliRunner

    from scheduler.cli import main
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: ") and name in result.output.splitlines()[0]


def test_the_console_script_spares_its_shutdown_a_garbage_collection_of_everything():
    """A `run` exited 1.2-2 s after its last line, collecting torch's millions of objects at
    interpreter shutdown; the console script freezes them first (0.2-0.35 s). Callers that import
    the command group (tests, scripts) keep their collector as it was."""
    script = """
import atexit, gc
from click.testing import CliRunner
from scheduler.cli import main
CliRunner().invoke(main, ["--version"])
print("in-process:", gc.get_freeze_count())
atexit.register(lambda: print("at exit:", gc.get_freeze_count() > 0))
main(["--version"])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "in-process: 0" and lines[-1] == "at exit: True", lines


def test_the_console_script_closes_its_database_before_exiting(tmp_path):
    """Its connections are closed before the freeze above (frozen, they never were): SQLite folds
    its write-ahead log into the database file, so the file alone holds every commit (a copy of
    panoptic-batch.db is the whole job history) and no -wal/-shm files are left beside it."""
    env = {key: value for key, value in os.environ.items() if key != "PANOPTIC_DATABASE_URL"}
    for args in (["status"], ["cancel", "no-such-job"]):       # a command that succeeds, one that fails
        panoptic_batch(*args, env=env, cwd=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["panoptic-batch.db"]


def test_commands_that_run_no_model_do_not_load_torch(tmp_path):
    """status, stats, submit, cancel, retry are run often (scripts poll status): without torch
    they start in well under a second, where importing it alone takes seconds."""
    source = tmp_path / "in"
    source.mkdir()
    Image.new("RGB", (8, 8)).save(source / "a.png")
    queue = f"no-torch-{os.getpid()}-{time.monotonic_ns()}"
    script = f"""
import sys
from click.testing import CliRunner
from scheduler.cli import main
runner = CliRunner()
for args in (["--help"], ["submit", "--help"], ["run", "--help"], ["status", "--json"],
             ["submit", {str(source)!r}, "--dest", {str(tmp_path / "out")!r}, "--queue", {queue!r},
              "--weights", "random", "--name", "a long job name " * 8]):
    result = runner.invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, (args, result.output)
job_id = result.output.strip().splitlines()[-1]
table = runner.invoke(main, ["status"], env={{"COLUMNS": "80"}}).output
row = next(line for line in table.splitlines() if line.startswith(job_id))   # the whole id, to copy
assert "pending" in row and max(len(line) for line in table.splitlines()) <= 80, table
for args in (["status", job_id], ["stats", job_id], ["cancel", job_id]):
    result = runner.invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, (args, result.output)
print(sorted(name for name in sys.modules if name == "torch" or name.startswith("torch.")))
"""
    env = dict(os.environ, PANOPTIC_DATABASE_URL=f"sqlite:///{tmp_path / 'jobs.db'}",
               PANOPTIC_BROKER_URL="redis://127.0.0.1:6379/0")
    try:
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    finally:
        redis.Redis.from_url(env["PANOPTIC_BROKER_URL"]).delete(queue)     # the cancelled job's chunk
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def write_images(folder: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (w, h) in {"wide.jpg": (96, 64), "tall.png": (48, 80)}.items():
        path = folder / name
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_predict_writes_png_and_json_per_image(tmp_path):
    images = write_images(tmp_path / "in")
    out = tmp_path / "out"
    # threshold 0 keeps every confident-enough query, so the mask head and segments are exercised.
    result = panoptic_batch("predict", *map(str, images), "--out", str(out), "--model", "detr-r50",
                            "--weights", "random", "--min-size", "64", "--max-size", "128",
                            "--threshold", "0", "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    for path in images:
        png, doc = out / f"{path.stem}.png", out / f"{path.stem}.json"
        decoded = Image.open(png)
        assert decoded.mode == "RGB" and decoded.size == Image.open(path).size
        document = json.loads(doc.read_text())
        assert document["file_name"] == png.name
        assert document["image"] == str(path)
        assert (document["height"], document["width"]) == (decoded.height, decoded.width)
        assert document["model"]["name"] == "detr-r50"
        assert len(document["model"]["weights_sha256"]) == 64
        assert document["model"]["threshold"] == 0.0
        rgb = np.asarray(decoded, dtype=np.uint32)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        assert sorted(s["id"] for s in document["segments_info"]) == sorted(set(np.unique(ids)) - {0})
        assert sum(s["area"] for s in document["segments_info"]) == int((ids != 0).sum())


def test_predict_bad_image_fails_alone(tmp_path):
    images = write_images(tmp_path / "in")
    bad = tmp_path / "in" / "broken.jpg"
    bad.write_text("this is not an image")
    out = tmp_path / "out"
    result = panoptic_batch("predict", str(bad), *map(str, images), "--out", str(out), "--model", "detr-r50",
                            "--weights", "random", "--min-size", "64", "--max-size", "128")
    assert result.returncode == 1
    assert "broken.jpg" in result.stderr and "cannot decode image" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["tall.json", "tall.png", "wide.json", "wide.png"]


def test_predict_defaults_to_official_weights_and_explains_when_offline(tmp_path):
    images = write_images(tmp_path / "in")
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"), https_proxy="http://127.0.0.1:9",
               HTTPS_PROXY="http://127.0.0.1:9")
    result = panoptic_batch("predict", str(images[0]), "--out", str(tmp_path / "out"), "--model", "detr-r50",
                            env=env)
    assert result.returncode == 4, result.stderr                # the weights cannot be had (README, exit codes)
    assert "detr-r50-panoptic-00ce5173.pth" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "wide.png").exists()


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_batch_size_must_be_positive_or_auto(tmp_path, value):
    result = panoptic_batch("predict", str(tmp_path / "x.jpg"), "--out", str(tmp_path), "--batch-size", value)
    assert result.returncode == 2
    assert "neither a positive integer nor auto" in result.stderr


def test_auto_batch_size_follows_the_device():
    import torch

    from worker.predictor import resolve_batch_size
    assert resolve_batch_size("auto", torch.device("cpu")) == 1
    assert resolve_batch_size("auto", torch.device("cuda", 0)) == 16
    assert resolve_batch_size(4, torch.device("cuda", 0)) == 4


def test_a_source_without_images_is_refused_and_records_nothing(tmp_path):
    """A typo'd prefix or --include: exit 3 (README, exit codes), not an empty "succeeded" job."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    env = {k: v for k, v in os.environ.items() if k != "PANOPTIC_DATABASE_URL"}
    result = panoptic_batch("run", "in", "--dest", "out", "--weights", "random", "--model", "detr-r50",
                            "--include", "*.JPG", env=env, cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    assert "no images under SOURCE" in result.stderr and "--include *.JPG" in result.stderr
    listed = panoptic_batch("status", "--json", env=env, cwd=tmp_path)
    assert json.loads(listed.stdout) == []


@pytest.mark.parametrize("args, message", [
    (["--threshold", "1.5"], "1.5 is not in the range 0<=x<1"),
    (["--precision", "bf16", "--device", "cpu"], "--precision bf16 needs a CUDA device"),
    (["--device", "gpu"], "--device gpu: not a device"),
])
def test_run_refuses_settings_it_cannot_run_before_making_a_job(tmp_path, args, message):
    write_images(tmp_path / "in")
    env = {k: v for k, v in os.environ.items() if k != "PANOPTIC_DATABASE_URL"}
    result = panoptic_batch("run", "in", "--dest", "out", "--weights", "random", *args, env=env, cwd=tmp_path)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    listed = panoptic_batch("status", "--json", env=env, cwd=tmp_path)
    assert json.loads(listed.stdout) == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--device", "cpu", "--precision", "fp16"], "--precision fp16 needs a CUDA device"),
    (["--device", "gpu"], "--device gpu: not a device"),              # checked in a process of its own
])
def test_a_worker_that_cannot_run_its_device_does_not_start(args, message):
    """Else it would take chunks and fail every image of them."""
    env = dict(os.environ, PANOPTIC_BROKER_URL="redis://127.0.0.1:1/0")    # never reached
    result = panoptic_batch("worker", *args, env=env)
    assert result.returncode == 2 and message in result.stderr, result.stderr     # a usage error


def test_a_worker_older_than_the_database_schema_does_not_start(tmp_path):
    """A rolling upgrade's old worker (a newer panoptic-batch migrated the database): one line,
    exit 5, instead of taking chunks and failing each on the database."""
    from tests.test_jobs_db import NEWER_REVISION, migrated_by_a_newer_version
    newer = f"sqlite:///{tmp_path / 'jobs.db'}"
    migrated_by_a_newer_version(newer)
    env = dict(os.environ, PANOPTIC_DATABASE_URL=newer, PANOPTIC_BROKER_URL="redis://127.0.0.1:1/0")  # never reached
    try:
        result = panoptic_batch("worker", "--device", "cpu", env=env, timeout=120)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError("the worker started") from exc
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 5 and len(lines) == 1, result.stderr
    assert f"revision {NEWER_REVISION}, newer than this panoptic-batch's" in lines[0]


def test_the_worker_checks_a_gpu_without_touching_cuda_in_the_process_that_forks(monkeypatch):
    """CUDA initialised in Celery's main process would be unusable in the pool processes it forks."""
    import torch
    from scheduler.cli import check_worker_settings

    def poisoned(*args, **kwargs):
        raise AssertionError("CUDA queried in the process that forks the workers")

    monkeypatch.setattr(torch.cuda, "is_available", poisoned)
    monkeypatch.setattr(torch.cuda, "device_count", poisoned)
    check_worker_settings("auto", "fp32", before_fork=True)                 # fine on any machine
    with pytest.raises(Exception, match="not a device"):
        check_worker_settings("gpu", "fp32", before_fork=True)


def test_run_stops_on_a_device_failure_and_leaves_the_images_pending(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from scheduler.cli import main
    from storage.jobs import JobStore
    from worker.predictor import Predictor

    def broken(self, images):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    write_images(tmp_path / "in")
    monkeypatch.setattr(Predictor, "start_batch", broken)
    monkeypatch.setenv("PANOPTIC_DATABASE_URL", f"sqlite:///{tmp_path / 'jobs.db'}")
    result = CliRunner().invoke(main, ["run", str(tmp_path / "in"), "--dest", str(tmp_path / "out"),
                                       "--weights", "random", "--model", "detr-r50", "--min-size", "64",
                                       "--max-size", "96", "--device", "cpu"])
    assert result.exit_code == 1 and "device failure: CUDA error: an illegal memory access" in result.output
    (job,) = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}").jobs()
    assert (job.pending, job.failed, job.succeeded) == (2, 0, 0)
