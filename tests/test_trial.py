"""The README's "Trying the distributed mode without Docker": its command block, run as written
(only its two ports moved to free ones, since other test runs share this machine) against a real
local S3 server (`python -m storage.s3server`), a private redis-server and a worker. The block is
read from README.md, so that the README and what is tested cannot drift apart.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
from PIL import Image

from storage.s3server import free_ports, port_is_free
from tests.paths import REPO_ROOT, SAMPLES, SAMPLES_GT
from tests.test_export_evaluate import read_ids
from tests.test_pipeline import exe

SECTION = "## Trying the distributed mode without Docker"


def readme_block(heading: str) -> str:
    """The first ```bash block of the README section that starts with `heading`."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert heading + "\n" in text, f"README.md has no section {heading!r}"
    section = text.split(heading + "\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, f"no bash block in README section {heading!r}"
    return match.group(1)


def test_readme_distributed_trial_runs_as_written(tmp_path):
    block = readme_block(SECTION)
    s3_port, redis_port = free_ports(2, "127.0.0.1")
    # The README's ports: S3 in the endpoint and the server command, Redis in the broker URL and
    # the redis-server command.
    for used in ("http://127.0.0.1:8333", "--port 8333", "redis://127.0.0.1:6379", "--port 6379"):
        assert used in block, (used, block)
    script = block.replace("8333", str(s3_port)).replace("6379", str(redis_port))

    # The user's working folder is the repository's: the block reads samples/ and samples-gt/.
    shutil.copytree(SAMPLES, tmp_path / "samples")
    shutil.copytree(SAMPLES_GT, tmp_path / "samples-gt")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PANOPTIC_"))}
    env.update(PATH=os.path.dirname(exe()) + os.pathsep + os.path.dirname(sys.executable) + os.pathsep + env["PATH"],
               PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1",
               # Nothing from ~/.aws reaches boto3 (profiles, endpoints), as in the S3 fixture.
               AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"), AWS_EC2_METADATA_DISABLED="true")
    # -e: any failing command fails the test; the trap stops what is still running if it does.
    wrapped = "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n" + script
    process = subprocess.Popen(["bash", "-c", wrapped], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"the README block did not finish in 400 s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    assert process.returncode == 0, f"{stdout[-3000:]}\n{stderr[-5000:]}"

    # status --watch saw the job through; export read both results back from S3.
    assert re.search(r"\bsucceeded\b", stdout), stdout
    document = json.loads((tmp_path / "trial-export/panoptic.json").read_text())
    assert sorted(i["file_name"] for i in document["images"]) == ["000000142238.jpg", "000000439180.jpg"]
    for image, annotation in zip(document["images"], document["annotations"]):
        with Image.open(tmp_path / "samples" / image["file_name"]) as sample:
            ids = read_ids(tmp_path / "trial-export/panoptic" / annotation["file_name"])
            assert ids.shape == (sample.height, sample.width)
        assert sorted(s["id"] for s in annotation["segments_info"]) == sorted(set(np.unique(ids).tolist()) - {0})
    assert any((tmp_path / "trial-s3").rglob("*.dat")), "the S3 server kept no data in trial-s3/"

    # evaluate matched both samples to their ground truth (random weights: PQ 0).
    assert "Panoptic quality over 2 images" in stdout, stdout
    all_pq = re.findall(r"│ All\s+│ ([0-9.]+)", stdout)
    assert all_pq == ["0.00"], stdout
    assert "no prediction" not in stderr, stderr

    # `kill %3 %2 %1` stopped the worker, Redis and the S3 server.
    assert port_is_free(s3_port, "127.0.0.1") and port_is_free(redis_port, "127.0.0.1")


def test_local_s3_server_refuses_bad_input_in_one_line(tmp_path):
    """`python -m storage.s3server` (the README's local S3): no keys, or a port in use, is one
    line on stderr and a non-zero exit, never a traceback, and no secret is printed."""
    import socket

    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    base["PYTHONPATH"] = str(REPO_ROOT)
    command = [sys.executable, "-m", "storage.s3server", "--dir", str(tmp_path / "s3"), "--port"]
    (port,) = free_ports(1, "127.0.0.1")
    no_keys = subprocess.run([*command, str(port)], env=base, capture_output=True, text=True, timeout=60)
    assert no_keys.returncode == 2
    assert no_keys.stderr.strip().splitlines() == [
        "error: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (the keys this server will accept)"]

    secret = "s3cret-never-printed-0123456789"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        keys = dict(base, AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY=secret)
        busy = subprocess.run([*command, str(port)], env=keys, capture_output=True, text=True, timeout=60)
    assert busy.returncode == 1
    assert busy.stderr.strip().splitlines() == [f"error: port {port} on 127.0.0.1 is in use: choose another S3 port"]
    assert secret not in busy.stdout + busy.stderr
