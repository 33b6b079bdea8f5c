"""Decide what work exists: walk SOURCE, record the job and its images, hand out chunks.

The listing is streamed (every page of ListObjectsV2, or a folder walk) and images are inserted
and handed out in batches, so memory stays bounded however large the bucket.
"""

from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

from storage import objects
from storage.jobs import JobStore

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
DEFAULT_CHUNK_SIZE = 32
INSERT_BATCH = 1000


class SubmitError(ValueError):
    """A submission that cannot go ahead; the message says why."""


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


def is_image_key(key: str, includes: Iterable[str] = ()) -> bool:
    """An image by extension (any case), and matching at least one --include glob if any given."""
    dot = key.rfind(".")
    if dot < 0 or key[dot:].lower() not in IMAGE_EXTENSIONS:
        return False
    includes = tuple(includes)
    return not includes or any(fnmatch.fnmatchcase(key, pattern) for pattern in includes)


def check_locations(source: str, dest: str) -> None:
    """DEST may not overlap SOURCE: outputs must never be read back as inputs."""
    a, b = source.rstrip("/") + "/", dest.rstrip("/") + "/"
    if a.startswith(b) or b.startswith(a):
        raise SubmitError(f"DEST {dest} overlaps SOURCE {source}: choose a destination outside the source")


def iter_source_images(source: str, includes: Iterable[str] = ()) -> Iterator[objects.ObjectInfo]:
    includes = tuple(includes)
    return (info for info in objects.list_objects(source) if is_image_key(info.key, includes))


def chunked(items: list[int], size: int) -> Iterator[list[int]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def submit(store: JobStore, spec: JobSpec, enqueue: Callable[[str, list[int]], None]) -> str:
    """Record the job and its images and call `enqueue(job_id, image_ids)` once per chunk."""
    spec = replace(spec, source=objects.normalize(spec.source), dest=objects.normalize(spec.dest))
    check_locations(spec.source, spec.dest)
    listing = iter_source_images(spec.source, spec.includes)
    try:
        first = next(listing, None)         # fails here, before a job exists, if SOURCE is unreadable
    except objects.ObjectStoreError as exc:
        raise SubmitError(f"cannot read SOURCE {spec.source}: {exc}") from exc
    job_id = store.create_job(name=spec.name or spec.source, source=spec.source, dest=spec.dest,
                              model=spec.model, weights=spec.weights, threshold=spec.threshold,
                              min_size=spec.min_size, max_size=spec.max_size, config=spec.config)
    found = listing if first is None else itertools.chain([first], listing)
    entries = ((info.key, info.uri, info.etag, info.size) for info in found)
    for ids in store.add_images(job_id, entries, batch_size=INSERT_BATCH):
        for chunk in chunked(ids, spec.chunk_size):
            enqueue(job_id, chunk)
    store.finalize_submission(job_id)
    return job_id
