"""Terminal escape injection: a job name or an image key holding ESC/CSI/OSC sequences, other C0/C1
controls or bidirectional overrides reaches no terminal raw — not through `run`'s failure and log
lines, `status` (table, --failed), `stats`, `report`, error messages or the workers' text logs —
while JSON output keeps the exact text."""

from __future__ import annotations

import io
import json
import logging
import os
import unicodedata
from concurrent.futures import ThreadPoolExecutor

from tests.test_job_control import png_bytes
from tests.test_pipeline import MODEL_ARGS, cli
from worker.text import BIDI_CONTROLS

NAME = "nightly\x1b[2J\x1b[H\x1b]0;pwned\x07\u202egnp.exe\x9b31m[red]x"
HOSTILE_KEYS = ["esc\x1b[2Jclear.png", "osc\x1b]0;title\x07.png", "c1\x9b31m.png", "bidi\u202egnp.png",
                "nl\n[12:00:00: INFO] fake.png", "bs\x08\x08.png", "del\x7f.png", "iso\u2066x.png"]


def assert_inert(text: str, where: str) -> None:
    """Nothing in `text` can steer a terminal: no control character but the newline, no bidi control."""
    bad = sorted({c for c in text if (unicodedata.category(c) == "Cc" and c != "\n") or c in BIDI_CONTROLS
                  or c in "\u2028\u2029"})
    assert not bad, f"raw control characters {[f'U+{ord(c):04X}' for c in bad]} in {where}:\n{text!r}"


def test_hostile_job_names_and_keys_are_escaped_on_terminals_and_exact_in_json(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    (source / "ok.png").write_bytes(png_bytes(1))
    for key in HOSTILE_KEYS:
        (source / key).write_bytes(png_bytes(2))
    env = dict(os.environ, PANOPTIC_DATABASE_URL=f"sqlite:///{tmp_path / 'jobs.db'}")
    ran = cli("run", str(source), "--dest", str(tmp_path / "out"), "--name", NAME, *MODEL_ARGS, env=env)
    assert ran.returncode == 1, ran.stderr                     # the hostile keys failed, ok.png did not
    job_id = ran.stdout.strip().splitlines()[-1]
    outputs = {"run stdout": ran.stdout, "run stderr": ran.stderr}
    assert "esc\\x1b[2Jclear.png" in ran.stderr and "bidi\\u202egnp.png" in ran.stderr   # shown, escaped
    # The commands that read the job run side by side (each is a process, mostly its start-up);
    # an error message quoting data (SOURCE) is escaped too; JSON stays exact (scripts get the
    # real name and keys).
    wide = dict(env, COLUMNS="400")                            # wide enough to show the name whole
    commands = {"status": ["status"], "status JOB": ["status", job_id], "status --failed": ["status", job_id, "--failed"],
                "stats": ["stats", job_id], "report": ["report", job_id, "--out", str(tmp_path / "report")],
                "status --json": ["status", job_id, "--json"],
                "status --failed --json": ["status", job_id, "--failed", "--json"],
                "run error": ["run", str(source), "--dest", str(source / "out\x1b]0;t\x07"), *MODEL_ARGS]}
    with ThreadPoolExecutor(4) as pool:
        results = dict(zip(commands, pool.map(lambda args: cli(*args, env=wide), commands.values())))
    for where, result in results.items():
        assert (result.returncode != 0) == (where == "run error"), (where, result.stderr)
        outputs[where] = result.stdout + result.stderr
    assert "overlaps SOURCE" in results["run error"].stderr, results["run error"].stderr
    assert "out\\x1b]0;t\\x07" in results["run error"].stderr
    for where in ("status", "status JOB"):
        assert "nightly\\x1b[2J" in outputs[where] and "[red]x" in outputs[where]   # markup shown as typed
    failed_lines = outputs["status --failed"].splitlines()
    assert len(failed_lines) == len(HOSTILE_KEYS)              # one line per image: none forged by a key
    for where, text in outputs.items():
        if "--json" not in where:
            assert_inert(text, where)

    status = json.loads(results["status --json"].stdout)
    assert status["name"] == NAME
    failed = json.loads(results["status --failed --json"].stdout)
    assert sorted(entry["key"] for entry in failed) == sorted(HOSTILE_KEYS)


def test_text_log_lines_escape_data_and_json_lines_keep_it():
    from worker.logs import log_context, make_handler

    text, as_json = io.StringIO(), io.StringIO()
    log = logging.getLogger("test.terminal-escapes")
    log.propagate = False
    handlers = [make_handler("text", text), make_handler("json", as_json)]
    for handler in handlers:
        log.addHandler(handler)
    try:
        key = HOSTILE_KEYS[0]
        with log_context(job_id="job\x1b[2J"):
            log.warning("image %s failed: %s", key, "bad\nforged line", extra={"key": key})
            try:
                raise ValueError(f"cannot decode {key}")
            except ValueError:
                log.exception("chunk failed for %s", HOSTILE_KEYS[3])
    finally:
        for handler in handlers:
            log.removeHandler(handler)
    lines = text.getvalue()
    assert_inert(lines, "text log")
    assert "image esc\\x1b[2Jclear.png failed: bad\\x0aforged line" in lines and "[job job\\x1b[2J]" in lines
    assert "ValueError: cannot decode esc\\x1b[2Jclear.png" in lines    # the traceback's lines too
    first, second = (json.loads(line) for line in as_json.getvalue().splitlines())
    assert first["message"] == f"image {key} failed: bad\nforged line" and first["key"] == key
    assert first["job_id"] == "job\x1b[2J" and key in second["exception"]
