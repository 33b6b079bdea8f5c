"""`run --overlays` and `panoptic-batch report`, checked on real jobs and in headless Chromium.

One embedded job (`run --overlays`, SQLite, local folders, seeded random weights at 64 px) over
a few synthetic images, one undecodable file and one image whose key is HTML; one overlay path
is blocked on purpose, so the worker cannot write it and the report renders it. The report is
checked on disk and opened in headless Chromium (Debian's `chromium` package): the page loads
offline, shows the class table, the charts and every picture, and a screenshot is not blank.
"""

from __future__ import annotations

import html
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storage.jobs import JobStore
from scheduler.report import build_report, class_rows
from tests.test_pipeline import MODEL_ARGS, cli
from worker.output import output_stem

TRICKY_KEY = 'tricky/<b onmouseover="alert(1)">&amp;\'.png'
BLOCKED_KEY = "b/blocked.png"          # its overlay path is made a folder: the overlay cannot be written
BROKEN_KEY = "broken <i>.jpg"


def synthetic_sources() -> dict[str, bytes]:
    rng = np.random.default_rng(3)
    sizes = {"a/wide.jpg": (120, 72), "a/tall.png": (64, 96), BLOCKED_KEY: (80, 80), "c/square.webp": (96, 96),
             TRICKY_KEY: (100, 70)}
    files = {}
    for key, (w, h) in sizes.items():
        yy, xx = np.mgrid[0:h, 0:w]
        picture = np.stack([xx * 255.0 / w, yy * 255.0 / h, np.full((h, w), 140.0)], -1)
        picture += rng.normal(0, 18, picture.shape)
        buffer = io.BytesIO()
        fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[key.rsplit(".", 1)[1]]
        Image.fromarray(np.clip(picture, 0, 255).astype(np.uint8)).save(buffer, fmt)
        files[key] = buffer.getvalue()
    files[BROKEN_KEY] = b"\xff\xd8\xff not a JPEG <script>alert(2)</script>"
    return files


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A finished `run --overlays` job (one image failed, one overlay unwritable) and its report."""
    root = tmp_path_factory.mktemp("report-job")
    source = root / "in"
    files = synthetic_sources()
    for key, data in files.items():
        (source / key).parent.mkdir(parents=True, exist_ok=True)
        (source / key).write_bytes(data)
    url = f"sqlite:///{root / 'jobs.db'}"
    env = dict(os.environ, PANOPTIC_DATABASE_URL=url, PANOPTIC_BROKER_URL="redis://127.0.0.1:1/0")
    (root / "out" / "b" / "blocked.overlay.jpg").mkdir(parents=True)
    result = cli("run", str(source), "--dest", str(root / "out"), "--name", "report test <with overlays>",
                 "--overlays", *MODEL_ARGS, env=env)
    assert result.returncode == 1, result.stderr           # the broken image failed, the rest succeeded
    assert BROKEN_KEY in result.stderr
    job_id = re.search(r"job ([0-9a-f]{12}): partial", result.stdout).group(1)
    report = cli("report", job_id[:6], "--out", str(root / "report"), env=env)
    assert report.returncode == 0, report.stderr
    assert "index.html" in report.stdout
    store = JobStore(url)
    return {"root": root, "url": url, "id": job_id, "files": files, "store": store, "out": root / "report",
            "status": store.job(job_id), "stats": class_rows(store, job_id),
            "images": list(store.images(job_id, state="succeeded"))}


def test_overlays_are_written_beside_the_results(job):
    out = job["root"] / "out"
    assert sorted(im.key for im in job["images"]) == sorted(k for k in job["files"] if k != BROKEN_KEY)
    for image in job["images"]:
        stem = output_stem(image.key)
        png, overlay = out / f"{stem}.png", out / f"{stem}.overlay.jpg"
        assert png.is_file() and (out / f"{stem}.json").is_file()
        if image.key == BLOCKED_KEY:
            assert overlay.is_dir()        # not written — and the image succeeded all the same
            continue
        with Image.open(overlay) as jpeg, Image.open(png) as ids:
            assert jpeg.format == "JPEG" and jpeg.size == ids.size
            source = np.asarray(Image.open(io.BytesIO(job["files"][image.key])).convert("RGB"), float)
            assert np.abs(np.asarray(jpeg.convert("RGB"), float) - source).mean() > 10   # coloured


def test_report_on_disk(job):
    out, status, images = job["out"], job["status"], job["images"]
    page = (out / "index.html").read_text(encoding="utf-8")
    for image in images:
        thumb, full = out / "thumbs" / f"{image.id}.jpg", out / "overlays" / f"{image.id}.jpg"
        with Image.open(thumb) as t, Image.open(full) as f:
            assert t.format == f.format == "JPEG" and max(t.size) <= 400
            assert f.size == (image.width, image.height)
        written = job["root"] / "out" / f"{output_stem(image.key)}.overlay.jpg"
        if image.key == BLOCKED_KEY:       # rendered by the report from source + PNG + JSON
            assert written.is_dir()
        else:                              # the worker's overlay, reused as it is
            assert full.read_bytes() == written.read_bytes()
        assert f'href="overlays/{image.id}.jpg"' in page and f'src="thumbs/{image.id}.jpg"' in page
    # summary
    assert html.escape(status.name) in page and status.id in page and "&lt;with overlays&gt;" in page
    assert (status.succeeded, status.failed) == (len(images), 1)
    assert re.search(rf"<b>{len(images)}</b><span>succeeded</span>", page)
    assert re.search(r"<b>1</b><span>failed</span>", page)
    assert html.escape(status.source) in page and "detr-r50" in page and "All 5 succeeded images" in page
    # every class of the statistics, in the table
    stats = job["stats"]
    assert stats
    table = page.split('id="class-stats"', 1)[1].split("</table>", 1)[0]
    assert table.count("<tr>") == len(stats) + 1
    for row in stats:
        assert f">{html.escape(row['category_name'])}</td>" in table
        assert f">{row['pixels']:,}</td>" in table
    assert page.count("<svg") == 3 and "<script" not in page
    # user data is escaped everywhere: the HTML key and the failed image's key and error
    assert "<b onmouseover" not in page and "<i>" not in page
    assert html.escape(TRICKY_KEY) in page
    assert html.escape(BROKEN_KEY) in page and "cannot decode image" in page
    assert "http://" not in page and "https://" not in page      # nothing is loaded from elsewhere


def test_report_caps_the_thumbnails_and_says_so(job, tmp_path):
    report = build_report(job["store"], job["id"], tmp_path / "r", max_images=2)
    page = report.index.read_text(encoding="utf-8")
    assert (report.images_shown, report.images_succeeded) == (2, 5)
    assert sorted(p.name for p in (tmp_path / "r" / "thumbs").iterdir()) == sorted(
        f"{im.id}.jpg" for im in job["images"][:2])
    assert "Showing the first 2 of 5 succeeded images" in page and "--max-images" in page


def test_report_without_the_source_image_shows_the_segments_on_grey(job, tmp_path):
    (job["root"] / "in" / BLOCKED_KEY).unlink()          # its overlay was never written: must be rendered
    report = build_report(job["store"], job["id"], tmp_path / "r")
    page = report.index.read_text(encoding="utf-8")
    assert report.tile_errors == 0 and "source image unavailable" in page
    blocked = next(im for im in job["images"] if im.key == BLOCKED_KEY)
    with Image.open(tmp_path / "r" / "overlays" / f"{blocked.id}.jpg") as full:
        assert full.size == (blocked.width, blocked.height)


def test_command_line_help():
    from click.testing import CliRunner

    from scheduler.cli import main

    runner = CliRunner()
    report = runner.invoke(main, ["report", "--help"])
    assert report.exit_code == 0 and "--out" in report.output and "--max-images" in report.output
    assert "report" in runner.invoke(main, ["--help"]).output
    for command in ("run", "submit"):
        assert "--overlays" in runner.invoke(main, [command, "--help"]).output


# ---------------------------------------------------------------------------------------------
# In a browser

def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def headless(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    browser = chromium_binary()
    if browser is None:
        pytest.fail("no chromium on PATH: install Debian's (apt-get install -y chromium), as .ci/run does")
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
               "--mute-audio", f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


# Added to a copy of the page: after every picture has loaded or failed, it writes what the
# browser sees into the DOM, which --dump-dom prints.
PROBE = """<script>
addEventListener("load", () => {
  const images = [...document.images];
  const ok = (i) => i.complete && i.naturalWidth > 0;
  const result = {
    title: document.title,
    images: images.length,
    loaded: images.filter(ok).length,
    broken: images.filter((i) => !ok(i)).map((i) => i.getAttribute("src")),
    classRows: document.querySelectorAll("#class-stats tbody tr").length,
    classNames: [...document.querySelectorAll("#class-stats tbody tr td:nth-child(2)")].map((td) => td.textContent),
    bars: document.querySelectorAll("svg.chart rect").length,
    failedRows: [...document.querySelectorAll("#failed-images tbody tr td:first-child")].map((td) => td.textContent),
    captions: [...document.querySelectorAll("figcaption .key")].map((d) => d.textContent),
    links: [...document.querySelectorAll("#images a")].map((a) => a.getAttribute("href")),
    injected: document.querySelectorAll("b[onmouseover], i").length,
    tableVisible: document.getElementById("class-stats").getBoundingClientRect().height > 0,
  };
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>"""


def test_report_in_headless_chromium(job, tmp_path):
    out = job["out"]
    page = (out / "index.html").read_text(encoding="utf-8")
    (out / "probe.html").write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")

    dump = headless(["--virtual-time-budget=10000", "--dump-dom", (out / "probe.html").as_uri()], tmp_path / "profile")
    assert dump.returncode == 0, dump.stderr[-3000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', dump.stdout, re.S)
    assert found, f"the page did not finish loading: {dump.stdout[-2000:]} {dump.stderr[-2000:]}"
    seen = json.loads(html.unescape(found.group(1)))
    images, stats = job["images"], job["stats"]
    assert seen["title"].startswith("report test <with overlays>")
    assert seen["images"] == len(images) and seen["loaded"] == len(images), seen["broken"]
    assert seen["classRows"] == len(stats) and seen["tableVisible"]
    assert sorted(seen["classNames"]) == sorted(r["category_name"] for r in stats)
    assert seen["bars"] == 3 * min(len(stats), 20)
    assert seen["failedRows"] == [BROKEN_KEY]
    assert sorted(seen["captions"]) == sorted(im.key for im in images)     # keys shown as text, not markup
    assert seen["injected"] == 0
    for href in seen["links"]:
        with Image.open(out / href) as full:
            assert full.format == "JPEG"

    shot = tmp_path / "report.png"
    taken = headless([f"--screenshot={shot}", "--window-size=1280,1800", (out / "index.html").as_uri()],
                     tmp_path / "profile")
    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-3000:]
    with Image.open(shot) as screenshot:
        assert screenshot.format == "PNG" and screenshot.size == (1280, 1800)
        pixels = np.asarray(screenshot.convert("RGB"))
    assert pixels.std() > 20                                               # not blank
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500             # text, charts and pictures
    print(f"screenshot: {shot}")
