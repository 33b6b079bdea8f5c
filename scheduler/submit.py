"""Decide what work exists: walk SOURCE, record the job and its images, hand out chunks.

The listing is streamed (every page of ListObjectsV2, or a folder walk) and images are inserted
and handed out in batches, so memory stays bounded however large the bucket.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import itertools
import os
import re
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from storage import objects
from storage.jobs import JobStore
from worker.labels import LabelMap, LabelMapError, coco_label_map
from worker.output import output_stem
from worker.text import printable
from worker.weights_source import WeightsFacts, describe_weights

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
DEFAULT_CHUNK_SIZE = 32
INSERT_BATCH = 1000
# How the error of an image whose outputs would overwrite another's begins; `retry` leaves such
# images failed (running one would replace the other image's results).
OUTPUT_CONFLICT = "output conflict:"


class SubmitError(ValueError):
    """A submission that cannot go ahead; the message says why. Nothing was recorded, except for
    SubmitStopped. `exit_code`: the command line's (scheduler.errors)."""
    exit_code = 2


class SourceNotFound(SubmitError):
    """SOURCE does not exist or holds no images."""
    exit_code = 3


class SourceUnreadable(SubmitError):
    """SOURCE exists (or may) but cannot be listed: access denied, S3 unreachable."""
    exit_code = 7


class LabelMapRefused(SubmitError):
    """The label map does not fit the weights' class head (scheduler.errors.EXIT_LABEL_MAP)."""
    exit_code = 8


class SubmitStopped(SubmitError):
    """Queueing failed after the job was recorded: the job was removed (nothing queued yet) or
    failed with the reason (some chunks queued)."""

    def __init__(self, message: str, job_id: str, exit_code: int):
        super().__init__(message)
        self.job_id, self.exit_code = job_id, exit_code


@dataclass(frozen=True)
class JobSpec:
    source: str
    dest: str
    model: str
    weights: str
    threshold: float
    min_size: int
    max_size: int
    name: str | None = None
    includes: tuple[str, ...] = ()
    chunk_size: int = DEFAULT_CHUNK_SIZE
    config: dict = field(default_factory=dict)   # batch_size, max_pixels, …
    label_map: LabelMap | None = None            # --categories; None: the weights' own, else COCO's


def is_image_key(key: str, includes: Iterable[str] = ()) -> bool:
    """An image by extension (any case), and matching at least one --include glob if any given."""
    dot = key.rfind(".")
    if dot < 0 or key[dot:].lower() not in IMAGE_EXTENSIONS:
        return False
    includes = tuple(includes)
    return not includes or any(fnmatch.fnmatchcase(key, pattern) for pattern in includes)


def check_location_syntax(option: str, uri: str) -> None:
    """`s3:/bucket`, `s3//bucket` or `s3:bucket` would be taken as a local path (and DEST would be
    created as a folder named "s3:"): refuse what looks like a mistyped S3 URI."""
    if not objects.is_s3(uri) and re.match(r"(?i)s3(:|//)", uri):
        rest = re.sub(r"(?i)^s3:?/*", "", uri)
        raise SubmitError(f"{option} {printable(uri)} looks like a mistyped S3 URI: write s3://{printable(rest)} "
                          f"(or ./{printable(uri)} for a local folder of that name)")


def check_folders(source: str, dest: str) -> None:
    """A local SOURCE or DEST that is a file: the listing would fail with "not a folder", and
    every upload into a DEST file would fail image by image."""
    for option, uri, error in (("SOURCE", source, SourceNotFound), ("--dest", dest, SubmitError)):
        if objects.is_local(uri) and os.path.isfile(objects.local_path(uri)):
            raise error(f"{option} {printable(uri)} is a file, not a folder: give the folder "
                        f"{'that holds the images' if option == 'SOURCE' else 'to write the outputs into'}")


def check_locations(source: str, dest: str) -> None:
    """DEST may not overlap SOURCE: outputs must never be read back as inputs."""
    a, b = _comparable_location(source), _comparable_location(dest)
    if a.startswith(b) or b.startswith(a):
        raise SubmitError(f"DEST {dest} overlaps SOURCE {source}: choose a destination outside the source")


def _comparable_location(uri: str) -> str:
    """A location as check_locations compares it, ending in "/": S3 with its scheme lower-cased
    and runs of "/" collapsed (some stores collapse them in keys); folders with symbolic links
    resolved (DEST may be a link to a folder inside SOURCE, or the other way round)."""
    if objects.is_s3(uri):
        return "s3://" + re.sub("/+", "/", uri.split("://", 1)[1]).strip("/") + "/"
    if objects.is_local(uri):
        return os.path.join(os.path.realpath(objects.local_path(uri)), "")
    return uri.rstrip("/") + "/"


def iter_source_images(source: str, includes: Iterable[str] = ()) -> Iterator[objects.ObjectInfo]:
    includes = tuple(includes)
    return (info for info in objects.list_objects(source) if is_image_key(info.key, includes))


def chunked(items: list[int], size: int) -> Iterator[list[int]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def check_weights_source(weights: str) -> None:
    """A job's weights source is stored in the database and read by every worker, and secrets are
    never stored. The rule: a URL with a query string or userinfo (where signatures, tokens, API keys
    and passwords travel, whatever they are called) is refused, whatever its parameters are named."""
    if objects.url_carries_secret(weights):
        raise SubmitError(f"--weights {objects.without_secrets(weights)}: a URL with a query string or a user "
                          "name/password cannot be given to a job (it may carry a secret, and a job's weights "
                          "source is stored in its database and read by its workers); use a local path, "
                          "s3://bucket/key (the workers' own S3 credentials), a plain https:// URL without "
                          "query or credentials, or official; `predict` takes such a URL as it runs no job")


def resolve_label_map(spec: JobSpec, weights: WeightsFacts) -> LabelMap:
    """The job's label map: --categories, else the weights' own, else COCO's; LabelMapRefused
    when it does not fit the class head (where the head's size is known without loading it)."""
    label_map = spec.label_map or weights.label_map or coco_label_map()
    if weights.num_classes is not None:
        try:
            label_map.check_head(weights.num_classes, f"the weights ({objects.mask_url(spec.weights)})")
        except LabelMapError as exc:
            raise LabelMapRefused(str(exc)) from exc
    return label_map


def model_fingerprint(spec: JobSpec, weights_identity: str, label_map: LabelMap) -> str:
    """Identifies what a result depends on: variant, weights, threshold and sizes, the label map,
    and whether overlays were written (an image done without them is not done for a job that
    wants them). The COCO map and no overlays add nothing: fingerprints of jobs from before
    either existed stay as they were."""
    identity = {"model": spec.model, "weights": weights_identity,
                "threshold": spec.threshold, "min_size": spec.min_size, "max_size": spec.max_size,
                "max_pixels": spec.config.get("max_pixels")}
    if spec.config.get("overlays"):
        identity["overlays"] = True
    if not label_map.is_coco:
        identity["label_map"] = label_map.sha256
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _output_conflicts(store: JobStore, job_id: str, infos: Iterator[objects.ObjectInfo],
                      on_conflict: Callable[[objects.ObjectInfo, str, str], None]) -> Iterator[objects.ObjectInfo]:
    """Yields the images whose outputs no earlier image claims; gives each other one to
    `on_conflict(info, output name, earlier_key)`. Keys name the same outputs when their
    output_stem is equal: "a.jpg" and "a.png", "a//b.jpg" and "a/b.jpg", "café" decomposed and
    composed, "A.JPG" and "A.jpeg". Such keys can be anywhere in a listing, so the database keeps
    the names (JobStore.claim_output_names), a batch at a time: memory stays flat however many.
    Keys that have no usable name pass: their images fail with the reason when processed."""
    while batch := list(itertools.islice(infos, INSERT_BATCH)):
        names = {}
        for info in batch:
            try:
                names[info.key] = output_stem(info.key)
            except ValueError:
                pass
        conflicts = store.claim_output_names(job_id, list(names.items()))
        for info in batch:
            if info.key in conflicts:
                on_conflict(info, names[info.key], conflicts[info.key])
            else:
                yield info


def _conflict_error(name: str, earlier_key: str) -> str:
    return (f"{OUTPUT_CONFLICT} its outputs {name}.png and {name}.json in DEST would overwrite those of "
            f"{earlier_key}, listed before it; rename one of the two and submit again (retry leaves this image failed)")


class DestOutputs:
    """Which output names have both their PNG and their JSON in DEST, from ONE listing of DEST
    (not a request per image), read on first use. Held as sorted 64-bit hashes of the names:
    8 bytes per output however long the paths, so a nightly run over millions stays small."""

    def __init__(self, dest: str):
        self.dest = dest
        self._both: np.ndarray | None = None

    @staticmethod
    def _name_hash(name: str) -> int:
        return int.from_bytes(hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")

    def _load(self) -> np.ndarray:
        pngs, jsons = array("Q"), array("Q")
        try:
            for info in objects.list_objects(self.dest):
                if info.key.endswith(".png"):
                    pngs.append(self._name_hash(info.key[:-4]))
                elif info.key.endswith(".json"):
                    jsons.append(self._name_hash(info.key[:-5]))
        except objects.ObjectNotFound:          # no DEST yet: nothing was written there
            pass
        except objects.ObjectStoreError as exc:
            raise SubmitError(f"cannot list DEST {self.dest} to check which outputs exist: {exc}") from exc
        return np.intersect1d(np.frombuffer(pngs, np.uint64), np.frombuffer(jsons, np.uint64))

    def have_both(self, stem: str) -> bool:
        if self._both is None:
            self._both = self._load()
        wanted = np.uint64(self._name_hash(stem))
        at = int(np.searchsorted(self._both, wanted))
        return at < len(self._both) and self._both[at] == wanted


def _unchanged_filter(store: JobStore, spec: JobSpec, fingerprint: str, infos: Iterator[objects.ObjectInfo],
                      skipped: list[int]) -> Iterator[objects.ObjectInfo]:
    """Drops the images whose ETag is unchanged since their last success with this fingerprint
    and whose two outputs are still in DEST (one deleted since: processed again)."""
    outputs = DestOutputs(spec.dest)
    while batch := list(itertools.islice(infos, INSERT_BATCH)):
        done = store.previous_successes(spec.source, spec.dest, fingerprint, [i.key for i in batch])
        for info in batch:
            if (info.etag and info.key in done and done[info.key] == info.etag
                    and outputs.have_both(output_stem(info.key))):
                skipped[0] += 1
            else:
                yield info


def describe_wanted(includes: Iterable[str] = ()) -> str:
    """Which files count as images, as error messages say it."""
    wanted = ", ".join(sorted(IMAGE_EXTENSIONS)) + (f", matching --include {' '.join(includes)}" if includes else "")
    return f"files ending in {printable(wanted)}, in any case"


def submit(store: JobStore, spec: JobSpec, enqueue: Callable[[str, list[int]], None], force: bool = False,
           before_recording: Callable[[LabelMap], None] | None = None) -> str:
    """Record the job and its images and call `enqueue(job_id, image_ids)` once per chunk.

    Unless `force`, images that succeeded before from the same SOURCE to the same DEST with the
    same model fingerprint, and whose ETag has not changed since, are skipped (nightly runs).

    Nothing is recorded when the locations are wrong, SOURCE cannot be listed or holds no images,
    the weights cannot be had, the label map does not fit them, or `before_recording(label_map)`
    (the caller's checks: broker, loading the model with the job's label map) raises. When `enqueue` fails
    after the job was recorded, the job is removed if nothing was queued yet, else its pending
    images are failed with the reason (`retry` queues them again); SubmitStopped says which."""
    check_location_syntax("SOURCE", spec.source)
    check_location_syntax("--dest", spec.dest)
    spec = replace(spec, source=objects.normalize(spec.source), dest=objects.normalize(spec.dest))
    check_folders(spec.source, spec.dest)
    check_locations(spec.source, spec.dest)
    check_weights_source(spec.weights)
    try:
        listing = iter_source_images(spec.source, spec.includes)
        first = next(listing, None)         # fails here, before a job exists, if SOURCE is unreadable
    except objects.ObjectNotFound as exc:
        raise SourceNotFound(f"SOURCE {printable(objects.mask_url(spec.source))} does not exist ({exc}): "
                             "check the folder, or the bucket and prefix") from exc
    except objects.ObjectStoreError as exc:
        raise SourceUnreadable(f"cannot read SOURCE {printable(objects.mask_url(spec.source))}: {exc}; check the "
                               "S3 endpoint, credentials and permissions (AWS_* settings)") from exc
    if first is None:
        raise SourceNotFound(f"no images under SOURCE {printable(objects.mask_url(spec.source))} "
                             f"({describe_wanted(spec.includes)}): check SOURCE (a mistyped prefix?) and --include; "
                             "nothing was recorded")
    weights = describe_weights(spec.weights, spec.model)
    label_map = resolve_label_map(spec, weights)
    if before_recording is not None:
        before_recording(label_map)
    fingerprint = model_fingerprint(spec, weights.identity, label_map)
    job_id = store.create_job(name=spec.name or spec.source, source=spec.source, dest=spec.dest,
                              model=spec.model, weights=spec.weights, threshold=spec.threshold,
                              min_size=spec.min_size, max_size=spec.max_size,
                              config={**spec.config, "fingerprint": fingerprint, "force": force},
                              label_map=None if label_map.is_coco else (label_map.sha256, label_map.as_coco()))
    queued = 0

    def enqueue_counted(job: str, ids: list[int]) -> None:
        nonlocal queued
        enqueue(job, ids)
        queued += 1

    try:
        _record_and_queue(store, spec, job_id, fingerprint, itertools.chain([first], listing), enqueue_counted, force)
    except Exception as exc:
        from scheduler.errors import EXIT_IMAGES_FAILED, translate
        error = translate(exc)            # None: a bug, which keeps its traceback once the job is settled
        reason = error.message if error else f"{type(exc).__name__}: {exc}"
        stopped = _stop_submission(store, job_id, queued, reason, error.exit_code if error else EXIT_IMAGES_FAILED)
        if error is None:
            raise
        raise stopped from exc
    return job_id


def _record_and_queue(store: JobStore, spec: JobSpec, job_id: str, fingerprint: str,
                      found: Iterator[objects.ObjectInfo], enqueue: Callable[[str, list[int]], None],
                      force: bool) -> None:
    conflicts: list[tuple] = []

    def record_conflict(info: objects.ObjectInfo, name: str, earlier_key: str) -> None:
        conflicts.append((info.key, info.uri, info.etag, info.size, _conflict_error(name, earlier_key)))
        if len(conflicts) >= INSERT_BATCH:
            store.add_failed_images(job_id, conflicts)
            conflicts.clear()

    # Before the unchanged filter: an unchanged image still claims its outputs.
    found = _output_conflicts(store, job_id, found, record_conflict)
    skipped = [0]
    if not force:
        found = _unchanged_filter(store, spec, fingerprint, found, skipped)
    entries = ((info.key, info.uri, info.etag, info.size) for info in found)
    for ids in store.add_images(job_id, entries, batch_size=INSERT_BATCH):
        for chunk in chunked(ids, spec.chunk_size):
            enqueue(job_id, chunk)
    store.add_failed_images(job_id, conflicts)
    store.update_config(job_id, skipped=skipped[0])
    store.finalize_submission(job_id)


def _stop_submission(store: JobStore, job_id: str, queued: int, reason: str, exit_code: int) -> SubmitStopped:
    """After `reason` stopped a recorded submission (the broker, the database or the listing went
    away): leave no job pending forever. Nothing queued yet: the job goes (nobody would ever ask
    for its images). Some chunks queued: its pending images are failed with the reason (a queued
    chunk then finds nothing to claim), so the job finishes and `retry` can queue them again."""
    from scheduler.errors import EXIT_DATABASE, database_error
    try:
        if queued == 0:
            store.delete_jobs([job_id])
            outcome = "nothing was queued and the job was removed"
        else:
            store.fail_unfinished(job_id, f"submit stopped before every chunk was queued: {reason}")
            outcome = (f"job {job_id} failed its pending images with this reason: `panoptic-batch retry "
                       f"{job_id}` queues them again, or submit again (done images are skipped)")
    except Exception as cleanup:            # the database went too: say so; the job stays as it is
        return SubmitStopped(f"submit stopped after {queued} chunks: {reason}; job {job_id} could not be "
                             f"updated: {database_error(cleanup).message}", job_id, EXIT_DATABASE)
    return SubmitStopped(f"submit stopped after {queued} chunks: {reason}; {outcome}", job_id, exit_code)
