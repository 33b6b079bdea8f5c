"""`panoptic-batch export`: a job's results as one COCO panoptic annotation file plus its PNG folder.

The file is what panopticapi's ``pq_compute`` and detectron2's COCO panoptic loader read:
``images`` (id, file_name = the image's path relative to the job's source, width, height),
``annotations`` (image_id, file_name = the PNG's path relative to the PNG folder, segments_info as
the worker wrote them) and ``categories`` (the job's label map: the 133 COCO panoptic categories
unless it was given its own, `--categories` or the weights' own). The PNGs are copied
(S3 or folder → the PNG folder, through storage.objects) keeping their relative paths, so names
never collide; they are streamed, a few at a time, never all held in memory.

Segments whose category is not in the label map (a model with random weights predicts any class
index) would make the file invalid: they are turned into VOID in the copied PNG and left out of
segments_info, and the number is reported.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone

import click

from .evaluate import THREADS, StemMatcher, default_folder, ordered_map, read_json


class ExportError(ValueError):
    """The export cannot be made (the message says why)."""


@dataclass
class ExportSummary:
    job_id: str
    exported: int
    left_out: dict[str, int]            # state → images not exported (failed, pending, running)
    json_uri: str
    png_folder: str
    unknown_segments: int = 0           # segments of unknown categories turned into VOID
    images_changed: int = 0             # PNGs rewritten for that
    id_source: str = "job"
    unmatched_ids: list[str] = field(default_factory=list)   # with --ids-from: images not in that file




def _relative_png(record, dest: str) -> str:
    """The PNG's path relative to the job's DEST (the same relative path as the source image's)."""
    uri = record.output_png
    base = dest.rstrip("/") + "/"
    if uri.startswith(base):
        return uri[len(base):]
    return uri.rsplit("/", 1)[-1]


def _overlaps(a: str, b: str) -> bool:
    from storage.objects import normalize
    a, b = normalize(a).rstrip("/") + "/", normalize(b).rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)


class _IdsFrom:
    """Image ids from a COCO file's images, matched by file name (the GT image's path without
    extension against the job image's key without extension, or its last component when that is
    unique in the COCO file); other images get new ids above the file's largest."""

    def __init__(self, uri: str):
        document = read_json(uri, "--ids-from JSON")
        images = document.get("images")
        if not isinstance(images, list):
            raise ExportError(f"the --ids-from JSON {uri} has no 'images' list")
        usable = [i for i in images if isinstance(i, dict) and isinstance(i.get("file_name"), str)
                  and isinstance(i.get("id"), int) and not isinstance(i.get("id"), bool)]
        self.matcher = StemMatcher((i["file_name"], i["id"]) for i in usable)
        self.taken: set[int] = set()
        self.next_id = max([i["id"] for i in usable] + [0]) + 1
        self.unmatched: list[str] = []

    def __call__(self, key: str) -> int:
        found, _ = self.matcher.find(key)
        if found is None or found in self.taken:       # not in the file, or its id already used
            self.unmatched.append(key)
            found = self.next_id
            self.next_id += 1
        self.taken.add(found)
        return found


def export_job(store, job_id: str, json_uri: str, png_folder: str | None = None, ids_from: str | None = None,
               threads: int = THREADS) -> ExportSummary:
    from storage.objects import ObjectStoreError, join, read_bytes_retrying, write_bytes_retrying
    from worker.labels import job_label_map

    job = store.job(job_id)
    label_map = job_label_map(store, job)
    is_known = label_map.is_known
    png_folder = png_folder or default_folder(json_uri)
    if _overlaps(png_folder, job.dest):
        raise ExportError(f"the PNG folder {png_folder} overlaps the job's destination {job.dest}: "
                          f"choose another --png-folder")
    if _overlaps(png_folder, job.source):
        raise ExportError(f"the PNG folder {png_folder} overlaps the job's source {job.source}: "
                          f"choose another --png-folder")
    summary = ExportSummary(job.id, 0, {}, json_uri, png_folder)
    ids = _IdsFrom(ids_from) if ids_from else None

    def copy(record) -> tuple[dict, dict, int]:
        relative = _relative_png(record, job.dest)
        document = read_json(record.output_json, f"output JSON of {record.key}", one_of_many=True)
        segments = document.get("segments_info")
        if not isinstance(segments, list):
            raise ExportError(f"the output JSON {record.output_json} of {record.key} has no segments_info list")
        try:
            png = read_bytes_retrying(record.output_png)
        except ObjectStoreError as exc:
            raise ExportError(f"cannot read the PNG of {record.key}: {exc}") from None
        if not all(isinstance(s, dict) and "id" in s and "category_id" in s for s in segments):
            raise ExportError(f"the output JSON {record.output_json} of {record.key} has segments without "
                              f"id or category_id")
        unknown = [s for s in segments if not is_known(s["category_id"])]
        if unknown:
            import numpy as np

            from worker.output import decode_id_png, encode_id_png
            try:
                ids_map = decode_id_png(png)
            except (OSError, ValueError) as exc:      # PIL's UnidentifiedImageError is an OSError
                raise ExportError(f"the PNG {record.output_png} of {record.key} cannot be decoded: {exc}") from None
            ids_map[np.isin(ids_map, [s["id"] for s in unknown])] = 0
            png = encode_id_png(ids_map)
            segments = [s for s in segments if is_known(s["category_id"])]
        try:
            write_bytes_retrying(join(png_folder, relative), png, content_type="image/png")
        except (ObjectStoreError, ValueError) as exc:
            raise ExportError(f"cannot write the PNG of {record.key}: {exc}") from None
        height = record.height if record.height is not None else document.get("height")
        width = record.width if record.width is not None else document.get("width")
        image = {"id": None, "file_name": record.key, "width": width, "height": height}
        annotation = {"image_id": None, "file_name": relative, "segments_info": segments}
        return record, image, annotation, len(unknown)

    images, annotations = [], []
    for record, image, annotation, unknown in ordered_map(copy, store.images(job.id, state="succeeded"), threads):
        image["id"] = annotation["image_id"] = ids(record.key) if ids is not None else record.id
        images.append(image)
        annotations.append(annotation)
        summary.unknown_segments += unknown
        summary.images_changed += bool(unknown)
    summary.exported = len(images)
    if ids is not None:
        summary.id_source, summary.unmatched_ids = ids_from, ids.unmatched
    status = store.job(job.id)
    summary.left_out = {state: n for state, n in (("failed", status.failed), ("running", status.running),
                        ("pending", status.total - status.succeeded - status.failed - status.running)) if n}
    document = {
        "info": {"description": f"panoptic-batch job {job.id} ({job.name})", "job_id": job.id,
                 "source": job.source, "dest": job.dest, "model": job.model, "weights": job.weights,
                 "weights_sha256": job.weights_sha256, "threshold": job.threshold,
                 "label_map_sha256": label_map.sha256,
                 "date_created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": label_map.as_coco(),
    }
    try:
        # Retried too: a transient error here would lose the whole export at its last step.
        write_bytes_retrying(json_uri, json.dumps(document).encode(), content_type="application/json")
    except ObjectStoreError as exc:
        raise ExportError(f"cannot write {json_uri}: {exc}") from None
    return summary


@click.command("export")
@click.argument("job_id")
@click.option("--out", "json_uri", required=True, help="The COCO panoptic JSON file to write (a path or s3://…).")
@click.option("--png-folder", help="Where to copy the PNGs (default: --out without .json).")
@click.option("--ids-from", metavar="COCO_JSON", help="Take image ids from this COCO file's images, matched by "
              "file name (e.g. the ground truth, so that pq_compute can compare); default: the job's image ids.")
def export_command(job_id, json_uri, png_folder, ids_from):
    """Write the succeeded images of JOB_ID as a COCO panoptic file (--out) plus its PNG folder."""
    from storage.objects import ObjectStoreError

    from .jobstore import find_job, open_store
    from .evaluate import EvaluationError

    store = open_store()
    job = find_job(store, job_id)
    try:
        summary = export_job(store, job.id, json_uri, png_folder, ids_from)
    except (ExportError, EvaluationError, ObjectStoreError) as exc:
        raise click.ClickException(str(exc)) from None
    from worker.text import printable
    left = ", ".join(f"{n} {state}" for state, n in summary.left_out.items())
    click.echo(f"job {summary.job_id}: {summary.exported} images exported to {printable(summary.json_uri)} "
               f"(PNGs in {printable(summary.png_folder)}); "
               + (f"left out: {left} (only succeeded images are exported)" if left else "none left out"))
    if summary.unknown_segments:
        click.echo(f"note: {summary.unknown_segments} segments in {summary.images_changed} images have categories "
                   f"outside the job's label map; they are VOID in the export", err=True)
    if summary.unmatched_ids:
        click.echo(f"note: {len(summary.unmatched_ids)} images are not in {printable(ids_from)}; they got new ids",
                   err=True)
    sys.stdout.flush()
