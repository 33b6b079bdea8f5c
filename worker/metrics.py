"""Prometheus metrics of the workers: every metric is named and defined here, and only here.

`panoptic-batch worker --metrics-port N` (or ``PANOPTIC_METRICS_PORT``) serves them at
``http://HOST:N/metrics``, added up over the worker's pool processes (see `worker.metrics_server`).
Without a metrics port, the values stay in each process's memory and are never served.

Labels are bounded on purpose: no job or image ids (a new job id every night would make a new
time series every night, forever). Per-job progress is in SQL (`panoptic-batch status`); the
metrics are about the workers: throughput, failures, latency, memory.

The pipeline calls the small functions below the definitions; each costs microseconds (in
multiprocess mode an observation is a write to a memory-mapped file), against milliseconds to
seconds per image.
"""

from __future__ import annotations

import contextvars
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram, values

from storage.jobs import TIMING_FIELDS

log = logging.getLogger(__name__)

if os.environ.get("PROMETHEUS_MULTIPROC_DIR") and values.ValueClass is values.MutexValue:
    # prometheus_client chose its value class when it was first imported; if that was before the
    # worker set PROMETHEUS_MULTIPROC_DIR, choose again, before any metric below exists. The only
    # place that does: `metrics_server.serve` sets the variable, then imports this module.
    values.ValueClass = values.MultiProcessValue()

# Seconds, from a millisecond to ten minutes: a decode takes ms, a CPU forward pass seconds, a
# download retried with backoff through an S3 outage up to about a minute.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0, 600.0)
# The stage label of each timing the job store records per image (its names, less "_ms").
_TIMING_KEYS = {("download_decode" if name == "decode_ms" else name.removesuffix("_ms")): name
                for name in TIMING_FIELDS}

IMAGES = Counter(
    "panoptic_images", "Images finished by this worker, by outcome: succeeded and failed are what the job "
    "records; refused means a result came too late (the image's lease had expired and another worker "
    "took it), so nothing was recorded.", ["outcome"])
STAGE_SECONDS = Histogram(
    "panoptic_image_stage_seconds", "Time per image in each stage, for the images that succeeded: "
    "download_decode (read from the store and decode), model (the image's share of its batch's forward "
    "pass), postprocess (its share of the batch's postprocessing), upload (PNG and JSON written, result "
    "recorded).", ["stage"], buckets=LATENCY_BUCKETS)
BATCH_SIZE = Histogram(
    "panoptic_batch_size", "Images per forward pass.", buckets=(1, 2, 4, 8, 16, 32, 64, 128))
CHUNKS = Counter(
    "panoptic_chunks", "Chunks (queued tasks) finished by this worker: completed, or error (the task "
    "raised; Celery logs why and the chunk's message is redelivered or its images reaped).", ["outcome"])
CHUNK_SECONDS = Histogram(
    "panoptic_chunk_seconds", "Wall time of a chunk, from its task starting to its last result recorded.",
    buckets=LATENCY_BUCKETS + (1200.0, 1800.0, 3600.0, 7200.0, 10800.0))
MODEL_LOAD_SECONDS = Histogram(
    "panoptic_model_load_seconds", "Time to load a model (weights read and checked, moved to the device), by "
    "variant; a pool process loads one on its first chunk and again when a job needs other model settings.",
    ["model"], buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0))
GPU_MEMORY_ALLOCATED = Gauge(
    "panoptic_gpu_memory_allocated_bytes", "CUDA memory held by tensors, summed over the worker's live "
    "pool processes (only when a model runs on CUDA).", ["device"], multiprocess_mode="livesum")
GPU_MEMORY_RESERVED = Gauge(
    "panoptic_gpu_memory_reserved_bytes", "CUDA memory reserved by PyTorch's caching allocator (what "
    "nvidia-smi shows, less the CUDA context), summed over the worker's live pool processes.", ["device"],
    multiprocess_mode="livesum")
GPU_MEMORY_PEAK = Gauge(
    "panoptic_gpu_memory_peak_bytes", "Peak CUDA memory held by tensors since a pool process started; the "
    "highest over the worker's live pool processes.", ["device"], multiprocess_mode="livemax")


# The labelled series resolved once (labels() takes a lock and a lookup per call), which also
# exports them at 0 from the start, so that rate() and increase() see their first events.
_IMAGES = {outcome: IMAGES.labels(outcome) for outcome in ("succeeded", "failed", "refused")}
_STAGES = [(STAGE_SECONDS.labels(stage), key) for stage, key in _TIMING_KEYS.items()]
_CHUNKS = {outcome: CHUNKS.labels(outcome) for outcome in ("completed", "error")}


# --------------------------------------------------------------------------------------------
# Hooks, called by the pipeline.

@dataclass
class _Chunk:
    size: int
    outcomes: list = field(default_factory=list)     # set by the caller: the chunk's ImageOutcomes
    started: float = field(default_factory=time.perf_counter)
    timings: list[dict] = field(default_factory=list)


_chunk: contextvars.ContextVar[_Chunk | None] = contextvars.ContextVar("panoptic_metrics_chunk", default=None)


def image_succeeded(timings: dict, recorded: bool = True) -> None:
    """An image's result was written; ``timings`` as recorded in SQL (decode_ms, model_ms, …)."""
    if not recorded:
        _IMAGES["refused"].inc()
        return
    _IMAGES["succeeded"].inc()
    for histogram, key in _STAGES:
        histogram.observe(timings[key] / 1e3)
    chunk = _chunk.get()
    if chunk is not None:
        chunk.timings.append(timings)      # list.append is atomic: upload threads call this


def image_failed(recorded: bool = True) -> None:
    _IMAGES["failed" if recorded else "refused"].inc()


def batch_done(size: int, device) -> None:
    """A forward pass of ``size`` images finished on ``device`` (a torch.device)."""
    BATCH_SIZE.observe(size)
    if device.type == "cuda":
        import torch
        name = str(device) if device.index is not None else f"cuda:{torch.cuda.current_device()}"
        GPU_MEMORY_ALLOCATED.labels(name).set(torch.cuda.memory_allocated(device))
        GPU_MEMORY_RESERVED.labels(name).set(torch.cuda.memory_reserved(device))
        GPU_MEMORY_PEAK.labels(name).set(torch.cuda.max_memory_allocated(device))


def model_loaded(model: str, seconds: float) -> None:
    MODEL_LOAD_SECONDS.labels(model).observe(seconds)


@contextmanager
def track_chunk(job_id: str, image_ids: list[int], chunk_id: str | None = None):
    """Around the processing of a chunk: sets the log context (job_id, chunk, image_ids), counts
    the chunk, and logs one line when it finishes with its counts and mean per-image timings.

    ``with track_chunk(job, ids, task_id) as chunk: chunk.outcomes = processor.process(job, ids)``;
    if the block raises, the chunk counts as an error (Celery logs the exception)."""
    from .logs import log_context

    chunk = _Chunk(len(image_ids))
    token = _chunk.set(chunk)
    try:
        with log_context(job_id=job_id, chunk=chunk_id, image_ids=list(image_ids)):
            try:
                yield chunk
            except BaseException:
                _CHUNKS["error"].inc()
                raise
            seconds = time.perf_counter() - chunk.started
            _CHUNKS["completed"].inc()
            CHUNK_SECONDS.observe(seconds)
            _log_chunk(chunk, seconds)
    finally:
        _chunk.reset(token)


def _log_chunk(chunk: _Chunk, seconds: float) -> None:
    succeeded = sum(1 for o in chunk.outcomes if o.ok)
    refused = sum(1 for o in chunk.outcomes if getattr(o, "refused", False))
    failed = len(chunk.outcomes) - succeeded - refused
    skipped = max(chunk.size - succeeded - failed - refused, 0)
    means = {key: round(sum(t[key] for t in chunk.timings) / len(chunk.timings), 1)
             for key in _TIMING_KEYS.values()} if chunk.timings else {}
    rate = (succeeded + failed) / seconds if seconds > 0 else 0.0
    timing_text = (", ".join(f"{stage} {means[key]:.0f} ms" for stage, key in _TIMING_KEYS.items())
                   if means else "-")
    log.info("chunk finished: %d images, %d succeeded, %d failed, %d refused (not this job's, or the claim "
             "was lost: nothing written or recorded), %d skipped (done already, held by another "
             "worker or cancelled) in %.2f s (%.2f images/s); mean per succeeded image: %s",
             chunk.size, succeeded, failed, refused, skipped, seconds, rate, timing_text,
             extra={"images": chunk.size, "succeeded": succeeded, "failed": failed, "refused": refused,
                    "skipped": skipped,
                    "seconds": round(seconds, 3), "images_per_second": round(rate, 3), "mean_ms": means})
