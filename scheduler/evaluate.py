"""`panoptic-batch evaluate`: PQ, SQ and RQ of predictions against COCO panoptic ground truth.

The predictions are a COCO panoptic file with its PNG folder (`--pred-json/--pred-folder`, matched
to the ground truth by ``image_id``, as panopticapi does) or a job's outputs (`--job`, matched by
file name: the GT image's ``file_name`` without extension against the job image's key without
extension, or against its last component when that is unique in the job). Files are read through
storage.objects, so the ground truth and the predictions may also be in S3. The arithmetic is in
scheduler.panoptic_quality.
"""

from __future__ import annotations

import json
import os
import sys
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import click

from worker.text import printable

from .panoptic_quality import PanopticQualityError, PQStats, image_stats, summarize

T = TypeVar("T")
R = TypeVar("R")

MISSING_POLICIES = ("fn", "skip", "error")
THREADS = min(8, 2 * (os.cpu_count() or 1))


class EvaluationError(ValueError):
    """Unusable input: the message says which file and what is wrong with it."""


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int = THREADS) -> Iterator[R]:
    """``map(fn, items)`` on a thread pool, in order, with at most ``2 × threads`` items in flight
    (so a large job is streamed, never held in memory)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        window: deque = deque()
        try:
            for item in items:
                window.append(pool.submit(fn, item))
                if len(window) >= 2 * threads:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for future in window:
                future.cancel()


def _read(uri: str, what: str, one_of_many: bool) -> bytes:
    """An object's bytes. ``one_of_many`` (one image's file among a job's or a dataset's): tried
    again on transient errors for the retry budget, so that a throttled or briefly unreachable
    store does not end the whole command; a command's own input files are read once, so that an
    unreachable store is said at once."""
    from storage.objects import ObjectStoreError, read_bytes, read_bytes_retrying
    try:
        return read_bytes_retrying(uri) if one_of_many else read_bytes(uri)
    except ObjectStoreError as exc:
        raise EvaluationError(f"cannot read the {what}: {exc}") from None


def read_json(uri: str, what: str, one_of_many: bool = False) -> dict:
    data = _read(uri, what, one_of_many)
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvaluationError(f"the {what} {uri} is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise EvaluationError(f"the {what} {uri} must hold a JSON object, not a {type(document).__name__}")
    return document


def read_ids(uri: str, what: str, one_of_many: bool = False):
    """A panoptic PNG as an id map."""
    from PIL import UnidentifiedImageError

    from worker.output import decode_id_png
    data = _read(uri, what, one_of_many)
    try:
        return decode_id_png(data)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise EvaluationError(f"the {what} {uri} is not a readable PNG: {exc}") from None


def default_folder(json_uri: str) -> str:
    """The PNG folder beside a COCO panoptic FILE: its name without the .json suffix (panopticapi's
    and detectron2's convention), else FILE_png."""
    return json_uri[:-5] if json_uri.lower().endswith(".json") else json_uri + "_png"


def _join(folder: str, name, what: str) -> str:
    from storage.objects import InvalidURI, join
    if not isinstance(name, str) or not name:
        raise EvaluationError(f"{what}: file_name must be a non-empty string, got {name!r:.80}")
    try:
        return join(folder, name)
    except InvalidURI as exc:
        raise EvaluationError(f"{what}: unusable file_name {name!r}: {exc}") from None


def path_stem(name: str) -> str:
    """A relative path without its extension, NFC-normalised, empty and "." components dropped."""
    parts = [p for p in unicodedata.normalize("NFC", name).replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts:
        return ""
    last = parts[-1]
    dot = last.rfind(".")
    parts[-1] = last[:dot] if dot > 0 else last
    return "/".join(parts)


class StemMatcher:
    """Finds an entry for a GT file name among named entries: same path without extension, else the
    same last component when exactly one entry has it."""

    def __init__(self, named: Iterable[tuple[str, T]]):
        self.full: dict[str, T] = {}
        self.base: dict[str, list[T]] = {}
        for name, value in named:
            stem = path_stem(name)
            self.full.setdefault(stem, value)
            self.base.setdefault(stem.rsplit("/", 1)[-1], []).append(value)

    def find(self, file_name: str) -> tuple[T | None, int]:
        """(entry or None, number of candidates when ambiguous)."""
        stem = path_stem(file_name)
        if stem in self.full:
            return self.full[stem], 1
        candidates = self.base.get(stem.rsplit("/", 1)[-1], [])
        if len(candidates) == 1:
            return candidates[0], 1
        return None, len(candidates)


@dataclass
class GroundTruth:
    json_uri: str
    folder: str
    annotations: list[dict]
    categories: list[dict]
    image_names: dict          # image_id → the image's file_name (from "images")

    def image_name(self, annotation: dict) -> str:
        return self.image_names.get(annotation["image_id"], annotation["file_name"])


def _check_coco(document: dict, uri: str, what: str, need_categories: bool) -> None:
    keys = ("annotations", "categories") if need_categories else ("annotations",)
    for key in keys:
        if not isinstance(document.get(key), list):
            raise EvaluationError(f"the {what} {uri} is not a COCO panoptic file: it has no {key!r} list")
    for annotation in document["annotations"]:
        if not isinstance(annotation, dict) or not {"image_id", "file_name", "segments_info"} <= annotation.keys():
            raise EvaluationError(f"the {what} {uri}: every annotation needs image_id, file_name and segments_info "
                                  f"(got {str(annotation)[:120]})")
        if not isinstance(annotation["segments_info"], list):
            raise EvaluationError(f"the {what} {uri}: segments_info of image {annotation['image_id']!r} is not a list")
    if need_categories:
        for category in document["categories"]:
            if not isinstance(category, dict) or "id" not in category:
                raise EvaluationError(f"the {what} {uri}: every category needs an id (got {str(category)[:120]})")


def load_ground_truth(json_uri: str, folder: str | None) -> GroundTruth:
    document = read_json(json_uri, "ground truth JSON")
    _check_coco(document, json_uri, "ground truth JSON", need_categories=True)
    names = {}
    for image in document.get("images") or []:
        if isinstance(image, dict) and "id" in image and isinstance(image.get("file_name"), str):
            names[image["id"]] = image["file_name"]
    return GroundTruth(json_uri, folder or default_folder(json_uri), document["annotations"],
                       document["categories"], names)


@dataclass
class Prediction:
    png_uri: str
    segments_info: list | None = None     # given, or read from json_uri
    json_uri: str | None = None


class FilePredictions:
    """A COCO panoptic prediction file and its PNG folder; matched to GT images by image_id."""

    def __init__(self, json_uri: str, folder: str | None):
        document = read_json(json_uri, "prediction JSON")
        _check_coco(document, json_uri, "prediction JSON", need_categories=False)
        self.folder = folder or default_folder(json_uri)
        self.by_image = {a["image_id"]: a for a in document["annotations"]}
        self.used: set = set()

    def find(self, gt: GroundTruth, annotation: dict) -> tuple[Prediction | None, int]:
        found = self.by_image.get(annotation["image_id"])
        if found is None:
            return None, 0
        self.used.add(annotation["image_id"])
        return Prediction(_join(self.folder, found["file_name"], f"prediction of image {found['image_id']!r}"),
                          found["segments_info"]), 1

    def unused(self) -> int:
        return len(self.by_image.keys() - self.used)


class JobPredictions:
    """A job's succeeded outputs, matched to GT images by file name. The job's images are streamed
    once; only those whose name can match a GT image are kept."""

    def __init__(self, store, job_id: str, gt: GroundTruth):
        wanted_full, wanted_base = set(), set()
        for annotation in gt.annotations:
            stem = path_stem(str(gt.image_name(annotation)))
            wanted_full.add(stem)
            wanted_base.add(stem.rsplit("/", 1)[-1])
        self.records: dict[int, tuple[str, str]] = {}
        named = []
        self.total = 0
        for record in store.images(job_id, state="succeeded"):
            self.total += 1
            stem = path_stem(record.key)
            if stem in wanted_full or stem.rsplit("/", 1)[-1] in wanted_base:
                self.records[record.id] = (record.output_png, record.output_json)
                named.append((record.key, record.id))
        self.matcher = StemMatcher(named)
        self.used: set = set()

    def find(self, gt: GroundTruth, annotation: dict) -> tuple[Prediction | None, int]:
        record_id, candidates = self.matcher.find(str(gt.image_name(annotation)))
        if record_id is None:
            return None, candidates
        self.used.add(record_id)
        png, document = self.records[record_id]
        return Prediction(png, json_uri=document), 1

    def unused(self) -> int:
        return self.total - len(self.used)


@dataclass
class Evaluation:
    results: dict
    images: int
    missing: list[str]          # GT image names without a prediction
    ambiguous: list[str]        # GT image names that match several job images
    unmatched_predictions: int  # predictions of images not in the ground truth
    unknown_predictions: int    # predicted segments of categories outside the GT's list
    missing_policy: str

    def to_dict(self) -> dict:
        return {**self.results, "images": self.images, "missing": len(self.missing),
                "missing_policy": self.missing_policy, "unmatched_predictions": self.unmatched_predictions,
                "unknown_category_segments": self.unknown_predictions}


def evaluate(gt: GroundTruth, predictions, missing: str = "fn", threads: int = THREADS) -> Evaluation:
    """Match, read, score every GT image (streamed, ``threads`` at a time) and summarise."""
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {MISSING_POLICIES}")
    known = [c["id"] for c in gt.categories]
    work, absent, ambiguous = [], [], []
    for annotation in gt.annotations:
        prediction, candidates = predictions.find(gt, annotation)
        if prediction is None:
            (ambiguous if candidates > 1 else absent).append(str(gt.image_name(annotation)))
            if missing != "fn":
                continue
        work.append((annotation, prediction))
    not_found = absent + ambiguous
    if not_found and missing == "error":
        shown = ", ".join(not_found[:5]) + (", …" if len(not_found) > 5 else "")
        raise EvaluationError(f"{len(not_found)} of {len(gt.annotations)} ground-truth images have no prediction: "
                              f"{shown}")

    def score(item) -> PQStats:
        annotation, prediction = item
        what = f"image {annotation['image_id']!r} ({gt.image_name(annotation)})"
        gt_ids = read_ids(_join(gt.folder, annotation["file_name"], what), f"ground-truth PNG of {what}",
                          one_of_many=True)
        if prediction is None:                      # counted as an empty prediction: all FN
            import numpy as np
            pred_ids, segments = np.zeros_like(gt_ids), []
        else:
            segments = prediction.segments_info
            if segments is None:
                document = read_json(prediction.json_uri, f"prediction JSON of {what}", one_of_many=True)
                segments = document.get("segments_info")
            pred_ids = read_ids(prediction.png_uri, f"predicted PNG of {what}", one_of_many=True)
        try:
            return image_stats(gt_ids, annotation["segments_info"], pred_ids, segments, known, what)
        except PanopticQualityError as exc:
            raise EvaluationError(str(exc)) from None

    total = PQStats()
    for stats in ordered_map(score, work, threads):
        total.add(stats)
    return Evaluation(summarize(total, gt.categories), images=len(work), missing=absent + ambiguous,
                      ambiguous=ambiguous, unmatched_predictions=predictions.unused(),
                      unknown_predictions=total.unknown_predictions, missing_policy=missing)


# ---------------------------------------------------------------------------------------------
# Command line


def _percent(value) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _print_table(evaluation: Evaluation) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    results = evaluation.results
    console = Console()
    summary = Table("", "PQ", "SQ", "RQ", "categories", title=f"Panoptic quality over {evaluation.images} images")
    for name in ("All", "Things", "Stuff"):
        row = results[name]
        summary.add_row(name, _percent(row["pq"]), _percent(row["sq"]), _percent(row["rq"]), str(row["n"]))
    classes = Table("id", "category", "thing", "PQ", "SQ", "RQ", "TP", "FP", "FN", title="Per class")
    for cat_id, row in sorted(results["per_class"].items()):
        classes.add_row(str(cat_id), escape(printable(row["name"])), "yes" if row["isthing"] else "no", _percent(row["pq"]),
                        _percent(row["sq"]), _percent(row["rq"]), str(row["tp"]), str(row["fp"]), str(row["fn"]))
    console.print(summary)
    console.print(classes)


def label_map_differences(gt: GroundTruth, label_map) -> str | None:
    """Where the ground truth's categories and a job's label map name ids differently (a job run
    with another label map than the ground truth's): said, since predictions are scored by id."""
    differ = [c for c in gt.categories if not label_map.is_known(c["id"]) or label_map.name(c["id"]) != c.get("name")
              or label_map.isthing(c["id"]) != (c.get("isthing") == 1)]
    if not differ:
        return None
    first = differ[0]
    there = (f"{label_map.name(first['id'])!r} ({'thing' if label_map.isthing(first['id']) else 'stuff'})"
             if label_map.is_known(first["id"]) else "absent")
    return (f"{len(differ)} of the ground truth's {len(gt.categories)} categories are not the job's (e.g. id "
            f"{first['id']}: {first.get('name')!r} ({'thing' if first.get('isthing') == 1 else 'stuff'}) in the "
            f"ground truth, {there} in the job's label map); predictions are scored by category id")


def _notes(evaluation: Evaluation) -> list[str]:
    notes = []
    if evaluation.missing:
        shown = ", ".join(evaluation.missing[:5]) + (", …" if len(evaluation.missing) > 5 else "")
        how = ("counted as empty predictions (all their segments false negatives; --missing skip leaves them out)"
               if evaluation.missing_policy == "fn" else "left out (--missing skip)")
        notes.append(f"{len(evaluation.missing)} ground-truth images have no prediction, {how}: {shown}")
    if evaluation.ambiguous:
        notes.append(f"{len(evaluation.ambiguous)} of them match several job images by name; "
                     f"use a ground truth whose file_name holds the path relative to the job's source")
    if evaluation.unmatched_predictions:
        notes.append(f"{evaluation.unmatched_predictions} predicted images are not in the ground truth (ignored)")
    if evaluation.unknown_predictions:
        notes.append(f"{evaluation.unknown_predictions} predicted segments have a category that is not in the "
                     f"ground truth's categories (they count as unlabelled)")
    return notes


@click.command("evaluate")
@click.option("--gt-json", required=True, help="COCO panoptic ground truth (a path or s3://…).")
@click.option("--gt-folder", help="Folder of the ground-truth PNGs (default: --gt-json without .json).")
@click.option("--job", "job_id", help="Evaluate this job's outputs (matched to the GT images by file name).")
@click.option("--pred-json", help="…or a COCO panoptic prediction file (matched by image_id).")
@click.option("--pred-folder", help="Folder of its PNGs (default: --pred-json without .json).")
@click.option("--missing", type=click.Choice(MISSING_POLICIES), default="fn", show_default=True,
              help="GT images without a prediction: fn counts them as empty predictions (every segment a "
                   "false negative), skip leaves them out, error refuses to score.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def evaluate_command(gt_json, gt_folder, job_id, pred_json, pred_folder, missing, as_json):
    """PQ, SQ and RQ (All, Things, Stuff and per class) against COCO panoptic ground truth, with
    panopticapi's rules; values in --json are fractions (0-1), the table shows percentages."""
    from storage.objects import ObjectStoreError

    if (job_id is None) == (pred_json is None):
        raise click.UsageError("give either --job JOB or --pred-json FILE (with --pred-folder DIR)")
    if pred_folder and not pred_json:
        raise click.UsageError("--pred-folder goes with --pred-json")
    try:
        gt = load_ground_truth(gt_json, gt_folder)
        if job_id is not None:
            from worker.labels import job_label_map

            from .jobstore import find_job, open_store
            store = open_store()
            job = find_job(store, job_id)
            differences = label_map_differences(gt, job_label_map(store, job))
            if differences:
                click.echo(f"note: {printable(differences)}", err=True)
            predictions = JobPredictions(store, job.id, gt)
        else:
            predictions = FilePredictions(pred_json, pred_folder)
        evaluation = evaluate(gt, predictions, missing)
    except (EvaluationError, ObjectStoreError) as exc:
        raise click.ClickException(str(exc)) from None
    for note in _notes(evaluation):
        click.echo(f"note: {printable(note)}", err=True)
    if as_json:
        payload = evaluation.to_dict()
        payload["per_class"] = {str(k): v for k, v in payload["per_class"].items()}
        click.echo(json.dumps(payload, indent=1))
    else:
        _print_table(evaluation)
    sys.stdout.flush()
