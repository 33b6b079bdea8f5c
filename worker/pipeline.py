"""Process a chunk of a job's images: claim → fetch → decode → DETR → postprocess → upload → record.

This is the one per-image code path: the Celery task (`worker.queue`) and the embedded `run`
mode both call `ChunkProcessor.process`. Effects are exactly-once through the database: each
image is claimed with a lease and a fencing token, results are written under deterministic keys,
and a result is recorded only while the claim still holds (see storage.jobs).

Downloads and decoding (to uint8 tensors) of a batch run in threads while the model works on the
previous batch; the model thread only stages, resizes and normalises whole batches. PNG/JSON uploads and result records run in threads while the model works on the next one.
SQL: a chunk's claims in one transaction, its results a batch per transaction (RECORD_BATCH).

Why one file: the chunk's steps (claim, fetch and decode, batch, model, upload, record) are one
schedule sharing the chunk's state (leases, pixel budget, recorder, batch schedule); split, each
step would have to take that state apart again.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import torch

from storage import objects
from storage.fenced import ClaimLost, publish
from storage.jobs import ImageSuccess, JobStore

from . import metrics
from .batching import AspectBatcher
from .budget import PixelBudget, max_decoded_pixels, pixels_of
from .labels import LabelMap, job_label_map
from .lease import new_token
from .logs import inherit_context
from .model import WeightsError
from .output import output_stem, result_document
from .overlay import write_overlay
from .predictor import BatchSchedule, ModelConfig, PendingBatch, Predictor
from .preprocess import RGBImage, check_bytes, decode_image
from .text import printable

log = logging.getLogger(__name__)

# A claim lasts this long without a heartbeat; heartbeats renew it every third of that. When a
# worker is lost, its images are re-queued by the reaper once their leases expire.
DEFAULT_LEASE_SECONDS = 300
# An image claimed this many times without a result (its worker lost each time) is failed.
DEFAULT_MAX_ATTEMPTS = 3
IO_THREADS = 8
# Uploaded images are recorded in SQL together: one transaction for up to this many, or for all
# uploaded so far once no other upload is under way (a GPU batch at a time; on a CPU worker each
# image as it finishes). A commit per image, at ~100 images/s per GPU, would make the database's
# commit rate the limit of a large fleet.
RECORD_BATCH = 32
# A model that failed to load is not loaded again for the same settings within this many seconds:
# the chunks that follow fail at once with the same reason, instead of each reading the same
# (often large, often remote) weights again. Later chunks try again, in case the cause is gone.
LOAD_FAILURE_MEMORY_SECONDS = 60.0


class DeviceFailure(RuntimeError):
    """The accelerator failed in a way that every later batch would too (e.g. an illegal memory
    access leaves the CUDA context unusable). The chunk's unfinished images were given back; the
    process must stop rather than fail every image it would take next."""


def is_device_failure(exc: BaseException) -> bool:
    """A CUDA error that poisons the device for this process. Running out of memory is not one:
    the batch is retried image by image."""
    text = str(exc)
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text:
        return False
    accelerator_error = getattr(torch, "AcceleratorError", ())      # torch >= 2.8
    return isinstance(exc, accelerator_error) or any(
        sign in text for sign in ("CUDA error", "CUDA driver initialization failed", "No CUDA GPUs are available"))


def lease_seconds() -> float:
    return float(os.environ.get("PANOPTIC_LEASE_SECONDS", DEFAULT_LEASE_SECONDS))


def max_attempts() -> int:
    return int(os.environ.get("PANOPTIC_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS))


def _report_failure(image_id: int, key: str | None, error: str, recorded: bool) -> None:
    """One log line (key and error) and the failure counter, per failed image."""
    metrics.image_failed(recorded)
    log.warning("image %s failed: %s%s", key if key is not None else f"id {image_id}", error,
                "" if recorded else " (not recorded: the claim had expired and another worker holds the image)",
                extra={"image_id": image_id, "key": key, "error": error})


@dataclass
class ImageOutcome:
    image_id: int
    ok: bool
    error: str | None = None
    # Nothing was written or recorded: the image is not this chunk's job's, or the claim was lost
    # (lease expired, another worker took the image) before its outputs were written or recorded.
    refused: bool = False


def _report_refused(image_id: int, key: str | None, why: str) -> ImageOutcome:
    metrics.image_failed(recorded=False)
    log.warning("image %s refused: %s", printable(key) if key is not None else f"id {image_id}", why,
                extra={"image_id": image_id, "key": key, "refused": why})
    return ImageOutcome(image_id, False, why, refused=True)


def _decode(data: bytes, max_pixels, max_bytes) -> tuple[RGBImage | None, str | None]:
    """Bytes → (the decoded image, None), or (None, why not): a bad image fails alone."""
    try:
        return RGBImage.from_pil(decode_image(data, max_pixels, max_bytes)), None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


@dataclass
class _Decoded:
    image_id: int
    key: str
    uri: str
    image: RGBImage | None       # decoded to a uint8 tensor here, in the download threads
    error: str | None
    decode_ms: float
    # Downloaded, not decoded: no room in the pixel budget yet. (data, pixels, the ClaimedImage)
    parked: tuple | None = None


@dataclass
class _ChunkRun:
    """What the batch steps of one chunk share: its job, model, io pool, claim and bookkeeping."""
    job: object
    predictor: Predictor
    pool: ThreadPoolExecutor
    token: str
    leases: _LeaseKeeper
    outcomes: list[ImageOutcome]
    recorder: _Recorder
    schedule: BatchSchedule


class _LeaseKeeper:
    """Renews the leases of the images a chunk holds while it works on them."""

    def __init__(self, store: JobStore, token: str):
        self.store, self.token = store, token
        self.held: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
        self._thread.start()

    def hold(self, image_id: int):
        with self._lock:
            self.held.add(image_id)

    def drop(self, image_id: int):
        with self._lock:
            self.held.discard(image_id)

    def _run(self):
        while not self._stop.wait(lease_seconds() / 3):
            with self._lock:
                ids = list(self.held)
            if ids:
                try:
                    self.store.heartbeat(self.token, ids, lease_seconds())
                except Exception:  # a missed heartbeat only shortens the lease; keep working
                    log.exception("lease heartbeat failed")

    def close(self):
        self._stop.set()
        self._thread.join()


class _Recorder:
    """Records a chunk's uploaded images in batches (RECORD_BATCH), then calls `after(extra,
    recorded)` for each; `expect(n)` before n uploads start, `finished(entry)` as each ends
    (entry: (ImageSuccess, extra), or None for an image that failed instead)."""

    def __init__(self, store: JobStore, token: str, after):
        self._store, self._token, self._after = store, token, after
        self._lock = threading.Lock()
        self._pending: list[tuple[ImageSuccess, object]] = []
        self._in_flight = 0

    def expect(self, n: int) -> None:
        with self._lock:
            self._in_flight += n

    def finished(self, entry: tuple[ImageSuccess, object] | None) -> None:
        with self._lock:
            self._in_flight -= 1
            if entry is not None:
                self._pending.append(entry)
            if not self._pending or (len(self._pending) < RECORD_BATCH and self._in_flight > 0):
                return
            batch, self._pending = self._pending, []
        # Outside the lock: other uploads go on finishing while this batch is written.
        recorded = self._store.record_successes(self._token, [success for success, _ in batch])
        for (_, extra), ok in zip(batch, recorded):
            self._after(extra, ok)


@dataclass
class ChunkProcessor:
    """Turns (job, image ids) into uploaded results; holds the model for the process's lifetime."""
    store: JobStore
    device: str = "auto"
    precision: str = "fp32"
    # Set by `run` on SIGINT/SIGTERM: the chunk stops before its next batch and gives back what it
    # has not run, as for a cancelled job.
    stop: threading.Event | None = None
    _predictor: Predictor | None = field(default=None, init=False, repr=False)
    _load_failure: tuple[tuple[ModelConfig, LabelMap], str, float] | None = field(default=None, init=False, repr=False)
    # The chunk's decoded pixels in flight (worker.budget); a fresh one per chunk.
    _budget: PixelBudget = field(default_factory=PixelBudget, init=False, repr=False)

    def predictor_for(self, job, label_map: LabelMap | None = None) -> Predictor:
        """The model for the job's settings (loaded once, kept while they stay the same), naming
        class ids with `label_map`, else the job's own (worker.labels.job_label_map)."""
        label_map = label_map or job_label_map(self.store, job)
        config = ModelConfig(model=job.model, weights=job.weights, threshold=job.threshold,
                             min_size=job.min_size, max_size=job.max_size,
                             max_pixels=job.config.get("max_pixels", ModelConfig.max_pixels),
                             max_bytes=job.config.get("max_bytes", ModelConfig.max_bytes),
                             batch_size=job.config.get("batch_size", "auto"),
                             device=self.device, precision=self.precision)
        if self._predictor is not None and self._predictor.config == config:
            self._predictor.use_label_map(label_map)        # the same model; this job's names
            return self._predictor
        if self._predictor is not None:
            self._predictor.close()
        self._predictor = None          # free the old model before loading the next
        failure = self._load_failure
        if (failure and failure[0] == (config, label_map)
                and time.monotonic() - failure[2] < LOAD_FAILURE_MEMORY_SECONDS):
            raise WeightsError(failure[1])
        started = time.perf_counter()
        try:
            self._predictor = Predictor(config, label_map)
        except (WeightsError, ValueError) as exc:
            self._load_failure = ((config, label_map), str(exc), time.monotonic())
            raise
        except Exception as exc:
            if is_device_failure(exc):
                raise DeviceFailure(f"loading the model: {exc}") from exc
            raise
        self._load_failure = None
        metrics.model_loaded(config.model, time.perf_counter() - started)
        return self._predictor

    def process(self, job_id: str, image_ids: list[int]) -> list[ImageOutcome]:
        """Process the images of a chunk that nobody else has done or holds; one outcome per image
        processed (in the order they finished).

        The whole chunk is claimed first, so that a worker lost in the middle leaves leases that
        expire and a reaper re-queues; the job is checked for cancellation before every batch.
        """
        job = self.store.job(job_id)
        if self._stopping(job.state):
            return []
        outcomes: list[ImageOutcome] = []
        image_ids = self._own_images(job, image_ids, outcomes)
        if not image_ids:
            return outcomes
        token = new_token()
        try:
            predictor = self.predictor_for(job)
        except (WeightsError, ValueError) as exc:
            # Weights that cannot be loaded (missing file, wrong variant, hash mismatch) or bad
            # settings fail the images with the reason, rather than leaving the job pending.
            return outcomes + self._fail_all(job.id, image_ids, token, f"model could not be loaded: {exc}")
        self.store.set_weights_sha256(job_id, predictor.model_info["weights_sha256"])
        self._budget = PixelBudget(max_decoded_pixels())
        leases = _LeaseKeeper(self.store, token)
        recorder = _Recorder(self.store, token, lambda extra, recorded: self._recorded(job, leases, extra, recorded))
        claimed = []
        try:
            claimed = self._claim(job.id, image_ids, token, leases, outcomes)
            with ThreadPoolExecutor(IO_THREADS, thread_name_prefix="io", initializer=inherit_context()) as pool:
                uploads = self._run_claimed(pool, job, predictor, claimed, token, leases, outcomes, recorder)
                outcomes += [future.result() for future in uploads]
        except DeviceFailure:
            # The uploads already started have finished (leaving the pool waits for them) and are
            # recorded; every other image goes back to pending. Its attempt counts: should an
            # image itself break the device (a device-side assert), its chunk fails after
            # max_attempts() instead of stopping every worker that takes it, for ever.
            for image in claimed:
                self.store.release(image.id, token, count_attempt=True)
            raise
        except KeyboardInterrupt:
            # Stopped at once (a second Ctrl-C in `run`): what is not done goes back to pending for
            # the next run (release skips what is recorded already). Other errors leave the leases
            # to expire, so that the attempt counts should the image be why.
            for image in claimed:
                self.store.release(image.id, token)
            raise
        finally:
            leases.close()
        return outcomes

    def _stopping(self, job_state: str) -> bool:
        """Whether to take no further batch: the job was cancelled or interrupted, or this process
        was asked to stop."""
        return job_state in ("cancelled", "interrupted") or (self.stop is not None and self.stop.is_set())

    def _run_claimed(self, pool, job, predictor, claimed, token, leases, outcomes, recorder) -> list[Future]:
        """Download, batch and run the claimed images; returns the pending uploads.

        Downloads run ahead of the model in a bounded window; batches form as images arrive,
        grouped by aspect ratio so that a batch pads little (a portrait image in a landscape batch
        would pad both to a square). Before each batch the job is checked for cancellation; if it
        was cancelled, the images not yet run are handed back."""
        batch_size = predictor.batch_size
        batcher = AspectBatcher(batch_size, predictor.config.min_size, predictor.config.max_size)
        window = max(IO_THREADS, 3 * batch_size)     # images downloading or decoded, not yet run
        waiting = iter(claimed)
        parked: list[_Decoded] = []     # downloaded, waiting for room in the pixel budget to decode
        fetching: set[Future] = set()
        uploads: list[Future] = []
        done: set[int] = set()
        chunk = _ChunkRun(job, predictor, pool, token, leases, outcomes, recorder, BatchSchedule(predictor))

        def top_up() -> bool:
            """Start downloads while the window has room; False once all have started."""
            while len(fetching) + batcher.held + len(parked) < window:
                image = next(waiting, None)
                if image is None:
                    return False
                fetching.add(pool.submit(self._download_and_decode, image, predictor.config.max_pixels,
                                         predictor.config.max_bytes))
            return True

        def run(batch: list[_Decoded]) -> bool:
            if self._stopping(self.store.job(job.id).state):
                return False
            uploads.extend(self._run_batch(chunk, batch))
            done.update(d.image_id for d in batch)
            return True

        def make_room() -> None:
            """Parked images wait for pixels in flight to finish: run what is decoded (its
            results free the room once recorded), else wait for uploads to end."""
            nonlocal running
            if batcher.held:
                running = run(batcher.take_largest())
            elif (oldest := chunk.schedule.take_oldest()) is not None:
                good, pending = oldest
                uploads.extend(self._collect(chunk, pending, good))
            else:
                self._budget.wait_for_room(0.5)

        running = True
        top_up()
        while running and (fetching or parked):
            while parked and self._budget.try_acquire(parked[0].image_id, parked[0].parked[1]):
                fetching.add(pool.submit(self._decode_parked, parked.pop(0), predictor.config.max_pixels,
                                         predictor.config.max_bytes))
            if not fetching:
                make_room()
                continue
            finished, _ = wait(fetching, return_when=FIRST_COMPLETED)
            for future in finished:
                fetching.discard(future)
                decoded = future.result()
                if decoded.parked is not None:
                    parked.append(decoded)
                elif decoded.image is None:
                    outcomes.append(self._fail(decoded.image_id, token, leases, decoded.error, decoded.key))
                    done.add(decoded.image_id)
                elif (batch := batcher.add(decoded)) and not (running := run(batch)):
                    break
            more = running and top_up()
            if running and more and not fetching:      # the window is full of odd shapes
                running = run(batcher.take_largest())
                top_up()
        if running:
            for batch in batcher.flush():
                if not (running := run(batch)):
                    break
        for good, pending in chunk.schedule.drain():
            uploads.extend(self._collect(chunk, pending, good))
        if not running:                 # cancelled: hand back what was not processed
            for future in fetching:
                future.cancel()
            for image in claimed:
                if image.id not in done:
                    self.store.release(image.id, token)
                    leases.drop(image.id)
        return uploads

    def _own_images(self, job, image_ids, outcomes) -> list[int]:
        """The chunk's images that are its job's; the others (a forged or corrupted message, or
        one meant for another deployment's database) are refused, logged, never processed."""
        foreign = self.store.images_outside_job(job.id, image_ids)
        for image_id, owner in foreign.items():
            why = (f"not an image of job {printable(job.id)}: it belongs to job {printable(owner)}" if owner
                   else f"no image has id {image_id} in this database")
            outcomes.append(_report_refused(image_id, None, why + " (a chunk may only name its own job's images)"))
        return [image_id for image_id in image_ids if int(image_id) not in foreign]

    def _fail_all(self, job_id, image_ids, token, error: str) -> list[ImageOutcome]:
        outcomes = []
        for image_id in image_ids:
            if (image := self.store.claim(image_id, token, lease_seconds(), job_id=job_id)) is not None:
                _report_failure(image_id, image.key, error, self.store.record_failure(image_id, token, error))
                outcomes.append(ImageOutcome(image_id, False, error))
        return outcomes

    def _claim(self, job_id, image_ids, token, leases, outcomes) -> list:
        claimed = []
        # Images not taken are done already, or another worker holds them.
        for image in self.store.claim_many(image_ids, token, lease_seconds(), job_id=job_id):
            if image.attempts > max_attempts():
                # Every earlier attempt lost its worker (a crash, the OOM killer): stop here
                # instead of taking down workers forever.
                error = (f"gave up after {image.attempts - 1} attempts: the worker processing this image "
                         f"was lost each time (crash, out of memory, or a failed device?)")
                outcomes.append(self._fail(image.id, token, leases, error, image.key))
                continue
            leases.hold(image.id)
            claimed.append(image)
        return claimed

    def _download_and_decode(self, image, max_pixels, max_bytes=None) -> _Decoded:
        start = time.perf_counter()
        try:
            output_stem(image.key)                  # an unusable key fails before any work
            check_bytes(image.size, max_bytes)      # the listed size: refused before downloading
            # Transient store errors (5xx, SlowDown, resets) are retried with backoff; permanent
            # ones (not found, denied) and undecodable bytes fail this image at once.
            data = objects.read_bytes_retrying(image.uri)
            pixels = pixels_of(data)
            if max_pixels and pixels > max_pixels:
                pixels = 0          # refused by decode_image before it decodes anything
            if not self._budget.try_acquire(image.id, pixels):       # decoded later, when there is room
                return _Decoded(image.id, image.key, image.uri, None, None, (time.perf_counter() - start) * 1e3,
                                parked=(data, pixels, image))
        except Exception as exc:            # a bad image fails alone, with its reason
            return _Decoded(image.id, image.key, image.uri, None, f"{type(exc).__name__}: {exc}",
                            (time.perf_counter() - start) * 1e3)
        decoded, error = _decode(data, max_pixels, max_bytes)
        return _Decoded(image.id, image.key, image.uri, decoded, error, (time.perf_counter() - start) * 1e3)

    def _decode_parked(self, parked: _Decoded, max_pixels, max_bytes=None) -> _Decoded:
        """Decode an image that waited for room in the pixel budget (its room is taken)."""
        start = time.perf_counter()
        decoded, error = _decode(parked.parked[0], max_pixels, max_bytes)
        return _Decoded(parked.image_id, parked.key, parked.uri, decoded, error,
                        parked.decode_ms + (time.perf_counter() - start) * 1e3)

    def _fail(self, image_id: int, token: str, leases: _LeaseKeeper, error: str,
              key: str | None = None) -> ImageOutcome:
        """Record a per-image failure under this chunk's claim and stop renewing its lease."""
        self._budget.release(image_id)
        _report_failure(image_id, key, error, self.store.record_failure(image_id, token, error))
        leases.drop(image_id)
        return ImageOutcome(image_id, False, error)

    def _run_batch(self, chunk: _ChunkRun, decoded: list[_Decoded]) -> list[Future]:
        """Start the model on a batch (`BatchSchedule`), collect the batches the schedule hands
        back (on CUDA the one started before: its postprocessing ran beside this one's model) and
        start their uploads. Returns the uploads started."""
        good = [d for d in decoded if d is not None and d.image is not None]
        for d in decoded:
            if d is not None and d.image is None:
                chunk.outcomes.append(self._fail(d.image_id, chunk.token, chunk.leases, d.error, d.key))
        futures = []
        if good:
            for started, pending in chunk.schedule.start([d.image for d in good], good):
                futures += self._collect(chunk, pending, started)
        return futures

    def _collect(self, chunk: _ChunkRun, pending: PendingBatch, good: list[_Decoded]) -> list[Future]:
        try:
            results = pending.results()
        except Exception as exc:
            if is_device_failure(exc):
                raise DeviceFailure(str(exc)) from exc
            # Rare (e.g. out of memory on one huge image): retry the batch one image at a time
            # so that only the image that cannot be processed fails.
            if len(good) == 1:
                chunk.outcomes.append(self._fail(good[0].image_id, chunk.token, chunk.leases,
                                                 f"{type(exc).__name__}: {exc}", good[0].key))
                return []
            log.warning("batch failed (%s); retrying its images one by one", exc)
            return [future for d in good
                    for future in self._collect(chunk, chunk.schedule.start_now([d.image]), [d])]
        metrics.batch_done(len(good), chunk.predictor.device)
        chunk.recorder.expect(len(good))
        return [chunk.pool.submit(self._upload, chunk, d, r) for d, r in zip(good, results)]

    def _upload(self, chunk: _ChunkRun, d: _Decoded, result) -> ImageOutcome:
        """Upload the image's PNG and JSON; the recorder records it with others (`_recorded`)."""
        job, predictor, token = chunk.job, chunk.predictor, chunk.token
        leases, recorder = chunk.leases, chunk.recorder
        entry = None
        try:
            start = time.perf_counter()
            try:
                stem = output_stem(d.key)
                png_uri = objects.join(job.dest, stem + ".png")
                json_uri = objects.join(job.dest, stem + ".json")
                document = result_document(result, PurePosixPath(stem).name + ".png", d.uri, predictor.model_info)
                body = json.dumps(document).encode()
                # Written only while this chunk's claim holds, never over a newer claim's outputs
                # (storage.fenced): a worker paused past its lease must not replace them.
                publish([(png_uri, result["png"], "image/png"), (json_uri, body, "application/json")],
                        lambda: self.store.holds_claim(d.image_id, token))
            except ClaimLost as exc:
                leases.drop(d.image_id)
                self._budget.release(d.image_id)
                return _report_refused(d.image_id, d.key, str(exc))
            except Exception as exc:
                return self._fail(d.image_id, token, leases, f"{type(exc).__name__}: {exc}", d.key)
            height, width = result["id_map"].shape
            timings = {"decode_ms": d.decode_ms, "model_ms": result["model_ms"],
                       "postprocess_ms": result["postprocess_ms"],
                       "upload_ms": (time.perf_counter() - start) * 1e3}
            success = ImageSuccess(d.image_id, output_png=png_uri, output_json=json_uri, height=height,
                                   width=width, segments_info=document["segments_info"], timings=timings)
            outcome = ImageOutcome(d.image_id, True)
            entry = (success, (d, stem, result, timings, outcome))
            return outcome
        finally:
            recorder.finished(entry)          # may record a batch here, this one's included

    def _recorded(self, job, leases: _LeaseKeeper, extra, recorded: bool) -> None:
        d, stem, result, timings, outcome = extra
        metrics.image_succeeded(timings, recorded)
        leases.drop(d.image_id)
        if not recorded:
            outcome.ok, outcome.refused = False, True
            outcome.error = "result not recorded: the claim expired and another worker took the image"
            log.warning("image %s refused: %s", printable(d.key), outcome.error,
                        extra={"image_id": d.image_id, "key": d.key, "refused": outcome.error})
        # After the result is recorded: an overlay is an extra that never fails or delays the
        # image, and its rendering does not count as upload time.
        try:
            if job.config.get("overlays") and recorded:
                write_overlay(job.dest, stem, d.image.pil(), result["id_map"], result["segments_info"],
                              job_label_map(self.store, job))
        finally:
            self._budget.release(d.image_id)        # its pixels are no longer needed
