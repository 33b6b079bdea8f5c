"""`panoptic-batch report JOB --out DIR`: a static HTML report of a job, viewable offline.

DIR/index.html holds the job's summary, its per-class statistics (a table and bar charts drawn as
inline SVG) and a grid of thumbnails of coloured panoptic overlays, each linking to its full-size
overlay; failed images are listed with their errors. DIR/thumbs/<image id>.jpg and
DIR/overlays/<image id>.jpg are the pictures. Nothing is loaded from elsewhere: no scripts, no
fonts, no CDN.

Overlays that workers wrote (`--overlays`: DEST/<stem>.overlay.jpg) are reused; otherwise they
are rendered here from the source image, the PNG and the JSON. At most `--max-images` succeeded
images (the first by id) get a thumbnail, and the page says so when there are more.
"""

from __future__ import annotations

import html
import io
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import click
from PIL import Image

from storage import objects
from storage.jobs import TIMING_FIELDS, ImageRecord, JobStatus, JobStore
from worker.labels import LabelMap, job_label_map

DEFAULT_MAX_IMAGES = 200
THUMB_SIDE = 400            # thumbnails are at most this many pixels on a side (shown at about half)
MAX_FAILED_LISTED = 1000
CHART_ROWS = 20
THREADS = min(8, 2 * (os.cpu_count() or 1))


@dataclass
class Tile:
    image: ImageRecord
    thumb: str | None = None          # relative to DIR
    overlay: str | None = None
    thumb_size: tuple[int, int] | None = None
    note: str | None = None           # e.g. "source image unavailable"
    error: str | None = None          # no picture at all, and why


@dataclass
class Scan:
    """What one pass over a job's images collects."""
    counts: dict[str, int] = field(default_factory=dict)
    shown: list[ImageRecord] = field(default_factory=list)
    failed: list[ImageRecord] = field(default_factory=list)
    timing_sums: dict[str, float] = field(default_factory=dict)
    timing_counts: dict[str, int] = field(default_factory=dict)
    segments: int = 0


def scan_images(store: JobStore, job_id: str, max_images: int) -> Scan:
    scan = Scan()
    for image in store.images(job_id):
        scan.counts[image.state] = scan.counts.get(image.state, 0) + 1
        if image.state == "succeeded":
            if len(scan.shown) < max_images:
                scan.shown.append(image)
            scan.segments += image.segments or 0
            for name in TIMING_FIELDS:
                value = getattr(image, name)
                if value is not None:
                    scan.timing_sums[name] = scan.timing_sums.get(name, 0.0) + value
                    scan.timing_counts[name] = scan.timing_counts.get(name, 0) + 1
        elif image.state == "failed" and len(scan.failed) < MAX_FAILED_LISTED:
            scan.failed.append(image)
    return scan


# ---------------------------------------------------------------------------------------------
# Pictures

def _overlay_for(job: JobStatus, image: ImageRecord,
                 label_map: LabelMap) -> tuple[bytes | None, Image.Image, str | None]:
    """(JPEG bytes to copy as they are, or None; the overlay as an image; a note)."""
    from worker.overlay import overlay_uri, render_overlay, OVERLAY_MAX_SIDE
    from worker.output import decode_id_png
    from worker.output import output_stem
    from worker.preprocess import decode_image

    if job.config.get("overlays"):
        try:
            # One try: rendering is the fallback, and its own reads retry (retrying here too
            # would wait out a store's outage twice).
            data = objects.read_bytes(overlay_uri(job.dest, output_stem(image.key)))
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                overlay = im.convert("RGB")
            if overlay.size == _overlay_size(image.width, image.height, OVERLAY_MAX_SIDE):
                return data, overlay, None
        except Exception:           # not written (that failure never fails an image): render it
            pass
        # …or left from an earlier result of another size: render it too
    id_map = decode_id_png(objects.read_bytes_retrying(image.output_png))
    document = json.loads(objects.read_bytes_retrying(image.output_json))
    h, w = id_map.shape
    note = None
    try:
        source = decode_image(objects.read_bytes_retrying(image.uri), max_pixels=max(4 * h * w, 1), max_bytes=None)
        alpha = 0.55
        if source.size != (w, h):
            note = f"the source image is {source.width}×{source.height} now: changed since it was processed"
    except Exception as exc:        # the source is gone or changed: the segments alone, on grey
        source = Image.new("RGB", (w, h), (128, 128, 128))
        alpha = 0.9
        note = f"source image unavailable ({type(exc).__name__}); segments shown on grey"
    overlay = render_overlay(source, id_map, document.get("segments_info", []), alpha=alpha,
                             max_side=OVERLAY_MAX_SIDE, label_map=label_map)
    return None, overlay, note


def _overlay_size(width, height, max_side: int) -> tuple[int, int] | None:
    """The size of an overlay of a width × height result (as render_overlay scales it)."""
    if not width or not height:
        return None
    factor = min(1.0, max_side / max(width, height))
    return (max(1, round(width * factor)), max(1, round(height * factor))) if factor < 1 else (width, height)


def render_tile(job: JobStatus, image: ImageRecord, out_dir: Path, label_map: LabelMap) -> Tile:
    from worker.overlay import encode_jpeg

    tile = Tile(image)
    try:
        data, overlay, tile.note = _overlay_for(job, image, label_map)
        name = f"{image.id}.jpg"
        (out_dir / "overlays" / name).write_bytes(data if data is not None else encode_jpeg(overlay))
        thumb = overlay.copy()
        thumb.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS)
        thumb.save(out_dir / "thumbs" / name, "JPEG", quality=82, optimize=True)
        tile.thumb, tile.overlay, tile.thumb_size = f"thumbs/{name}", f"overlays/{name}", thumb.size
    except Exception as exc:
        tile.error = f"{type(exc).__name__}: {exc}"
    return tile


# ---------------------------------------------------------------------------------------------
# HTML

def plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n:,} {word if n == 1 else words or word + 's'}"


def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _hex(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb))


def _number(n: float | int) -> str:
    return f"{n:,}" if isinstance(n, int) else f"{n:,.1f}"


def _short(n: float) -> str:
    """12 345 678 → 12.3M: for chart labels."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "—"
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def bar_chart_svg(rows: Sequence[dict], key: str, title: str, fmt=_short, limit: int = CHART_ROWS) -> str:
    """A horizontal bar chart of rows[key] as inline SVG: one bar per class, in its colour
    (rows["color"]), the largest `limit` values."""
    rows = sorted((r for r in rows if r[key] > 0), key=lambda r: (-r[key], r["category_id"]))[:limit]
    label_w, bar_w, value_w, row_h, top = 150, 184, 52, 22, 30
    width = label_w + bar_w + value_w
    height = top + row_h * max(1, len(rows)) + 8
    parts = [f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" aria-label="{esc(title)}">',
             f'<text x="0" y="18" class="chart-title">{esc(title)}</text>']
    if not rows:
        parts.append(f'<text x="0" y="{top + 14}" class="chart-empty">no segments</text>')
    peak = max((r[key] for r in rows), default=1) or 1
    for i, r in enumerate(rows):
        y = top + i * row_h
        length = max(1.0, bar_w * r[key] / peak)
        name = r["category_name"]
        shown = name if len(name) <= 22 else name[:21] + "…"
        parts.append(
            f'<g><title>{esc(name)}: {esc(_number(r[key]))}</title>'
            f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end" class="chart-label">{esc(shown)}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{length:.1f}" height="{row_h - 6}" rx="2" '
            f'fill="{_hex(r["color"])}" stroke="rgba(0,0,0,.25)"/>'
            f'<text x="{label_w + length + 6:.1f}" y="{y + 15}" class="chart-value">{esc(fmt(r[key]))}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


CSS = """
:root { --fg: #1d2330; --muted: #5d6678; --line: #dde1e8; --bg: #f5f6f8; --card: #fff; --accent: #2f6fdf; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--fg); background: var(--bg); }
header { background: #1d2330; color: #fff; padding: 18px 32px; }
header h1 { margin: 0; font-size: 22px; font-weight: 600; }
header .sub { color: #b9c1d0; margin-top: 2px; overflow-wrap: anywhere; }
header h1 { overflow-wrap: anywhere; }
main { padding: 20px 32px 40px; max-width: 1500px; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 16px 20px;
          margin-bottom: 20px; }
h2 { font-size: 17px; margin: 0 0 12px; }
.note { color: var(--muted); margin: 4px 0 12px; }
.counts { display: flex; flex-wrap: wrap; gap: 12px; margin-bottom: 14px; }
.count { border: 1px solid var(--line); border-radius: 6px; padding: 8px 14px; min-width: 110px; }
.count b { display: block; font-size: 22px; }
.count span { color: var(--muted); }
.count.ok b { color: #1e8c4e; } .count.bad b { color: #c93434; } .count.wait b { color: #b07800; }
.progress { display: flex; height: 8px; border-radius: 4px; overflow: hidden; background: #e7e9ee;
            margin-bottom: 14px; }
.progress .ok { background: #2ea865; } .progress .bad { background: #d94848; }
.progress .run { background: #e8b13a; }
.state { display: inline-block; padding: 1px 9px; border-radius: 10px; font-size: 13px; font-weight: 600;
         background: #e7e9ee; }
.state-succeeded { background: #d6f2e1; color: #146c3a; } .state-partial { background: #fbecc9; color: #7a5300; }
.state-failed, .state-cancelled { background: #f8d7d7; color: #8f1f1f; }
.state-running, .state-pending { background: #dbe7fb; color: #1f4f9f; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 5px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--muted); font-weight: 600; font-size: 13px; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.details th { width: 170px; } table.details td { overflow-wrap: anywhere; }
.grid2 { display: grid; grid-template-columns: repeat(auto-fit, minmax(380px, 1fr)); gap: 18px; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(340px, 1fr)); gap: 16px 28px;
          margin-bottom: 16px; align-items: start; }
.chart { width: 100%; max-width: 480px; height: auto; font-family: inherit; }
.chart-title { font-size: 14px; font-weight: 600; fill: var(--fg); }
.chart-label { font-size: 12px; fill: var(--fg); } .chart-value { font-size: 11px; fill: var(--muted); }
.chart-empty { font-size: 12px; fill: var(--muted); }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 3px; margin-right: 7px;
          vertical-align: -1px; border: 1px solid rgba(0,0,0,.25); }
.scroll { max-height: 520px; overflow: auto; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); gap: 14px; }
figure { margin: 0; background: #fafbfc; border: 1px solid var(--line); border-radius: 6px; overflow: hidden; }
figure a { display: flex; align-items: center; justify-content: center; background: #20242c; aspect-ratio: 4 / 3; }
figure img { width: 100%; height: 100%; object-fit: contain; display: block; }
figcaption { padding: 6px 9px; font-size: 12px; }
figcaption .key { font-weight: 600; overflow-wrap: anywhere; }
figcaption .meta, .tile-note { color: var(--muted); }
.tile-error { color: #a02020; padding: 12px; font-size: 12px; word-break: break-word; }
td.err { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; white-space: pre-wrap;
         word-break: break-word; color: #8f1f1f; }
td.key { overflow-wrap: anywhere; }
footer { color: var(--muted); font-size: 12px; padding: 0 32px 24px; }
"""


def _summary_html(job: JobStatus, scan: Scan, label_map: LabelMap) -> str:
    from .progress import format_duration

    done = job.succeeded + job.failed
    wall = (job.finished_at - job.started_at).total_seconds() if job.finished_at and job.started_at else None
    skipped = job.config.get("skipped", 0)
    counts = [("ok", job.succeeded, "succeeded"), ("bad", job.failed, "failed"),
              ("wait", job.pending + job.running, "pending" if not job.running else "pending / running"),
              ("", job.total, "total")]
    if skipped:
        counts.append(("", skipped, "skipped (unchanged)"))
    boxes = "".join(f'<div class="count {cls}"><b>{esc(_number(n))}</b><span>{esc(label)}</span></div>'
                    for cls, n, label in counts)
    total = max(job.total, 1)
    bar = (f'<div class="progress" title="{esc(done)} of {esc(job.total)} finished">'
           f'<div class="ok" style="width:{100 * job.succeeded / total:.2f}%"></div>'
           f'<div class="bad" style="width:{100 * job.failed / total:.2f}%"></div>'
           f'<div class="run" style="width:{100 * job.running / total:.2f}%"></div></div>')
    details = [
        ("job id", esc(job.id)), ("name", esc(job.name)),
        ("state", f'<span class="state state-{esc(job.state)}">{esc(job.state)}</span>'),
        ("source", esc(objects.mask_url(job.source))), ("destination", esc(objects.mask_url(job.dest))),
        ("model", esc(f"{job.model}, weights {objects.mask_url(job.weights)}")),
        ("weights SHA-256", esc(job.weights_sha256 or "—")),
        ("label map", esc(f"the {len(label_map)} COCO panoptic categories" if label_map.is_coco
                          else f"{len(label_map)} categories, SHA-256 {label_map.sha256}")),
        ("settings", esc(f"threshold {job.threshold:g}, min size {job.min_size}, max size {job.max_size}, "
                         f"batch size {job.config.get('batch_size', '—')}, overlays "
                         f"{'written by workers' if job.config.get('overlays') else 'rendered for this report'}")),
    ]
    timings = [
        ("created", esc(_when(job.created_at))), ("started", esc(_when(job.started_at))),
        ("finished", esc(_when(job.finished_at))),
        ("duration", esc(format_duration(wall) if wall is not None else "—")),
        ("throughput", esc(f"{job.rate:.2f} images/s")),
    ]
    for name in TIMING_FIELDS:
        n = scan.timing_counts.get(name, 0)
        if n:
            timings.append((f"mean {name.removesuffix('_ms')}", esc(f"{scan.timing_sums[name] / n:,.1f} ms per image")))
    if scan.counts.get("succeeded"):
        timings.append(("segments", esc(f"{scan.segments:,} in {scan.counts['succeeded']:,} images "
                                        f"({scan.segments / scan.counts['succeeded']:.1f} per image)")))

    def table(rows):
        cells = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
        return f'<table class="details">{cells}</table>'
    return (f'<section id="summary"><h2>Summary</h2><div class="counts">{boxes}</div>{bar}'
            f'<div class="grid2">{table(details)}{table(timings)}</div></section>')


def _classes_html(rows: list[dict]) -> str:
    if not rows:
        return ('<section id="classes"><h2>Classes</h2><p class="note">No segments in the succeeded images.</p>'
                '</section>')
    total_pixels = sum(r["pixels"] for r in rows) or 1
    charts = (bar_chart_svg(rows, "pixels", "Pixels per class") +
              bar_chart_svg(rows, "segments", "Segments per class") +
              bar_chart_svg(rows, "images", "Images per class"))
    more = f" (the {CHART_ROWS} largest of {len(rows)})" if len(rows) > CHART_ROWS else ""
    body = "".join(
        f'<tr><td class="num">{esc(r["category_id"])}</td>'
        f'<td><span class="swatch" style="background:{_hex(r["color"])}"></span>{esc(r["category_name"])}</td>'
        f'<td>{"thing" if r["isthing"] else "stuff"}</td><td class="num">{esc(_number(r["segments"]))}</td>'
        f'<td class="num">{esc(_number(r["images"]))}</td><td class="num">{esc(_number(r["pixels"]))}</td>'
        f'<td class="num">{100 * r["pixels"] / total_pixels:.2f}%</td></tr>'
        for r in sorted(rows, key=lambda r: (-r["pixels"], r["category_id"])))
    return (f'<section id="classes"><h2>Classes</h2><p class="note">Over the succeeded images{esc(more)}; '
            f'{esc(plural(len(rows), "class", "classes"))} found.</p><div class="charts">{charts}</div>'
            f'<div class="scroll"><table id="class-stats"><thead><tr><th class="num">id</th><th>category</th>'
            f'<th>kind</th><th class="num">segments</th><th class="num">images</th><th class="num">pixels</th>'
            f'<th class="num">share of pixels</th></tr></thead><tbody>{body}</tbody></table></div></section>')


def _gallery_html(tiles: list[Tile], succeeded: int, max_images: int) -> str:
    if not succeeded:
        note = "No image has succeeded (yet)."
    elif succeeded > len(tiles):
        note = (f"Showing the first {len(tiles):,} of {succeeded:,} succeeded images (by submission order; "
                f"the report shows at most {max_images:,}, see --max-images).")
    else:
        note = f"All {succeeded:,} succeeded images."
    if tiles:
        note += " Click a picture for its full-size overlay."
    figures = []
    for t in tiles:
        im = t.image
        meta = f"{im.width}×{im.height} · {plural(im.segments or 0, 'segment')}"
        if t.error:
            picture = f'<div class="tile-error">overlay unavailable: {esc(t.error)}</div>'
        else:
            tw, th = t.thumb_size
            picture = (f'<a href="{esc(t.overlay)}"><img src="{esc(t.thumb)}" width="{tw}" height="{th}" '
                       f'alt="overlay of {esc(im.key)}"></a>')
        extra = f'<div class="tile-note">{esc(t.note)}</div>' if t.note else ""
        figures.append(f'<figure title="{esc(im.key)}">{picture}<figcaption><div class="key">{esc(im.key)}</div>'
                       f'<div class="meta">{esc(meta)}</div>{extra}</figcaption></figure>')
    body = f'<div class="gallery">{"".join(figures)}</div>' if figures else ""
    return f'<section id="images"><h2>Images</h2><p class="note">{esc(note)}</p>{body}</section>'


def _failed_html(failed: list[ImageRecord], count: int, job_id: str) -> str:
    if not count:
        return ""
    note = f"{plural(count, 'image')} failed"
    note += f"; the first {len(failed):,} are listed." if count > len(failed) else "."
    rows = "".join(f'<tr><td class="key">{esc(im.key)}</td><td class="num">{esc(im.attempts)}</td>'
                   f'<td class="err">{esc(im.error)}</td></tr>' for im in failed)
    return (f'<section id="failed"><h2>Failed images</h2><p class="note">{esc(note)} '
            f'<code>panoptic-batch retry {esc(job_id)}</code> queues them again.</p>'
            f'<div class="scroll"><table id="failed-images">'
            f'<thead><tr><th>image</th><th class="num">attempts</th><th>error</th></tr></thead>'
            f'<tbody>{rows}</tbody></table></div></section>')


def render_html(job: JobStatus, scan: Scan, classes: list[dict], tiles: list[Tile], max_images: int,
                label_map: LabelMap) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        ours = version("panoptic-batch")
    except PackageNotFoundError:
        ours = "?"
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{esc(job.name)} · panoptic-batch report</title><style>{CSS}</style></head><body>'
        f'<header><h1>{esc(job.name)}</h1><div class="sub">panoptic-batch job {esc(job.id)} · '
        f'<span class="state state-{esc(job.state)}">{esc(job.state)}</span></div></header><main>'
        + _summary_html(job, scan, label_map) + _classes_html(classes)
        + _gallery_html(tiles, scan.counts.get("succeeded", 0), max_images)
        + _failed_html(scan.failed, job.failed, job.id)
        + f'</main><footer>Generated {esc(generated)} by panoptic-batch {esc(ours)}.</footer></body></html>\n')


def class_rows(store: JobStore, job_id: str) -> list[dict]:
    """The job's per-class statistics, each class named, flagged and coloured by the job's label map."""
    labels = job_label_map(store, store.job(job_id))
    return [{**r, "category_name": labels.name(r["category_id"]), "isthing": labels.isthing(r["category_id"]),
             "color": labels.color(r["category_id"])} for r in store.class_stats(job_id)]


@dataclass
class Report:
    index: Path
    images_shown: int
    images_succeeded: int
    classes: int
    tile_errors: int


def build_report(store: JobStore, job_id: str, out_dir: Path, max_images: int = DEFAULT_MAX_IMAGES,
                 threads: int = THREADS) -> Report:
    """Write DIR/index.html, DIR/thumbs/ and DIR/overlays/ for a job; see the module docstring."""
    job = store.job(job_id)
    label_map = job_label_map(store, job)
    scan = scan_images(store, job.id, max_images)
    classes = class_rows(store, job.id)
    out_dir = Path(out_dir)
    for sub in ("thumbs", "overlays"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="report") as pool:
        tiles = list(pool.map(lambda image: render_tile(job, image, out_dir, label_map), scan.shown))
    index = out_dir / "index.html"
    partial = out_dir / ".index.html.tmp"
    partial.write_text(render_html(job, scan, classes, tiles, max_images, label_map), encoding="utf-8")
    os.replace(partial, index)
    return Report(index, len(tiles), scan.counts.get("succeeded", 0), len(classes), sum(1 for t in tiles if t.error))


@click.command("report")
@click.argument("job_id")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for index.html, thumbs/ and overlays/ (created if missing).")
@click.option("--max-images", type=click.IntRange(min=0), default=DEFAULT_MAX_IMAGES, show_default=True,
              help="At most this many thumbnails (the first succeeded images); the page says when there are more.")
def report_command(job_id, out_dir, max_images):
    """Write a static HTML report of JOB_ID: summary, per-class statistics and charts, overlay
    thumbnails, failed images. Works offline (open OUT/index.html)."""
    from .jobstore import find_job, open_store

    store = open_store()
    job = find_job(store, job_id)
    try:
        result = build_report(store, job.id, out_dir, max_images=max_images)
    except OSError as exc:          # DIR not writable, disk full…
        raise click.ClickException(f"cannot write the report to {out_dir}: {exc}") from exc
    shown = f"{result.images_shown} of {result.images_succeeded} images"
    errors = f", {result.tile_errors} without overlay (see the page)" if result.tile_errors else ""
    from worker.text import printable
    click.echo(f"report of job {job.id}: {printable(result.index)} ({shown}, {result.classes} classes{errors})")
