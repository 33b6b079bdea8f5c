"""One image → one panoptic result: the code path shared by `predict`, `run` and the workers.

A `Predictor` owns a loaded model on its device and turns decoded images into COCO-panoptic
results in batches: preprocess → DETR (mask head pruned to confident queries) → postprocess.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from PIL import Image

from storage.objects import mask_url

from .config import DEFAULT_THRESHOLD, PRECISIONS, ModelConfig, parse_batch_size
from .cuda_graphs import DetectorGraphs, cuda_graphs_enabled
from .labels import LabelMap, coco_label_map
from .model import create_model
from .postprocess import start_postprocess
from .preprocess import PinnedStaging, RGBImage, prepare_batch, processed_size

__all__ = ["Predictor", "PendingBatch", "BatchSchedule", "ModelConfig", "DEFAULT_THRESHOLD", "PRECISIONS", "check_device",
           "resolve_device", "resolve_batch_size"]

# Batch size for batch_size="auto", per device type. CUDA: on an H200 with R101, 16 was faster
# than 32 in fp32 and within 10-12% of it in tf32/bf16, at 3.3-5.6 GiB of GPU memory (32 in fp32:
# 13.9 GiB); CPU: batching gains little there and padding costs (BENCHMARKS.md).
AUTO_BATCH_SIZE = {"cuda": 16, "cpu": 1}
# Threads that postprocess a batch's images concurrently on CUDA, each on its own stream: the
# per-image work is many small kernels, a few host syncs and the PNG encoding (zlib releases the
# GIL), so one thread leaves the GPU mostly idle. 8 is what was measured (BENCHMARKS.md); more
# threads also contend for the GIL with the thread that launches the model's kernels, so one per
# core (PANOPTIC_POSTPROCESS_THREADS) is for the GPU benchmark to A/B first.
POSTPROCESS_THREADS = 8


def postprocess_threads() -> int:
    return _positive_setting("PANOPTIC_POSTPROCESS_THREADS", POSTPROCESS_THREADS)


def _positive_setting(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return count


def batches_in_flight() -> int:
    """PANOPTIC_BATCHES_IN_FLIGHT: batches started ahead of the one being collected (default 1)."""
    return _positive_setting("PANOPTIC_BATCHES_IN_FLIGHT", 1)


def resolve_batch_size(value: int | str, device: torch.device) -> int:
    """A batch size as given (worker.config.parse_batch_size checks it) → images per pass on `device`."""
    try:
        size = parse_batch_size(value)
    except ValueError as exc:
        raise ValueError(f"--batch-size: {exc}") from None
    return AUTO_BATCH_SIZE.get(device.type, 1) if size == "auto" else size


def resolve_device(name: str) -> torch.device:
    """"auto" → the first CUDA device if there is one, else the CPU; others as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name}: not a device (auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_device(device: str, precision: str) -> torch.device:
    """The device a worker or `run` would use, or a ValueError that says why it cannot: checked
    before any job is touched, so that a misconfigured worker fails to start instead of failing
    every image it takes."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    resolved = resolve_device(device)
    if resolved.type != "cuda" and precision not in ("fp32", "tf32"):
        raise ValueError(f"--precision {precision} needs a CUDA device; the CPU runs fp32")
    return resolved


class Predictor:
    def __init__(self, config: ModelConfig, label_map: LabelMap | None = None):
        if not 0.0 <= config.threshold < 1.0:
            raise ValueError(f"--threshold must be in [0, 1), not {config.threshold}")
        self.config = config
        self.device = check_device(config.device, config.precision)
        self.batch_size = resolve_batch_size(config.batch_size, self.device)
        self.batches_in_flight = batches_in_flight()
        threads = postprocess_threads()
        # The label map: the one given (a job's), or the file given (--categories; read first, so a
        # bad one fails fast), else the one that came with the weights (a transformers id2label),
        # else COCO's. One that does not fit the class head is refused (LabelMapError, a ValueError).
        given = label_map or (LabelMap.load(config.categories) if config.categories else None)
        self.model = create_model(config.model, weights=config.weights)
        self.use_label_map(given)
        self.model = self.model.to(self.device)
        # Inference-only speed-ups, the same function up to float rounding: batch norms folded
        # into the convolutions and NHWC activations (1.3-1.5x on the R101 detector on the CPU).
        # On the CPU only the backbone goes NHWC: the mask head's group norms are slower so.
        self.model.detr.backbone[0].body.fold_batchnorm()
        self._graphs: DetectorGraphs | None = None
        self.set_memory_format(torch.channels_last)
        self._postprocess_pool = None
        self._staging = None
        if self.device.type == "cuda":
            if cuda_graphs_enabled():
                self._graphs = DetectorGraphs(self.model, functools.partial(self._autocast, cast_cache=False))
            self._staging = PinnedStaging(self.device)
            # cudnn.benchmark stays off: it re-tunes every new input shape, and here shapes vary
            # with each image size and each batch's count of kept queries. On an H200 with eight
            # COCO-like sizes it stalled a run for minutes (BENCHMARKS.md).
            self._postprocess_pool = ThreadPoolExecutor(threads, thread_name_prefix="postprocess")

    def use_label_map(self, label_map: LabelMap | None) -> None:
        """Name the class ids with `label_map` (None: the weights' own, else COCO's) from the next
        batch on (a worker's jobs may each have their own); LabelMapError when it does not fit
        the class head."""
        label_map = label_map or self.model.label_map or coco_label_map()
        label_map.check_head(self.model.num_classes, f"the weights ({mask_url(self.config.weights)})")
        self.label_map: LabelMap = label_map

    def set_memory_format(self, memory_format: torch.memory_format) -> None:
        """The layout of the model's activations: channels_last (the default, see above) or
        contiguous_format (NCHW; for benchmarks that compare the two)."""
        self._memory_format = memory_format
        converted = self.model if self.device.type == "cuda" else self.model.detr.backbone
        converted.to(memory_format=memory_format)
        if self._graphs is not None:
            self._graphs.clear()          # captured graphs read the weights' old storage

    def close(self) -> None:
        """Stop the postprocessing threads (their CUDA streams go with them) and drop the CUDA graphs."""
        if self._postprocess_pool is not None:
            self._postprocess_pool.shutdown(wait=True)
            self._postprocess_pool = None
        if self._graphs is not None:
            self._graphs.clear()          # their memory pools

    @property
    def model_info(self) -> dict:
        """What each result's JSON records about the model that made it."""
        return {"name": self.config.model, "weights_sha256": self.model.weights_sha256,
                "threshold": self.config.threshold, "label_map_sha256": self.label_map.sha256}

    def _autocast(self, cast_cache: bool = True):
        """The precision's context for a model pass. `cast_cache=False` for CUDA graph captures:
        a graph must not keep pointers into autocast's cache of cast weights, which is freed when
        the context exits (eager passes keep it: the mask head's chunks reuse their cast weights)."""
        if self.device.type == "cuda":
            # Process-wide switches, set per batch: one process may serve jobs of either kind.
            tf32 = self.config.precision == "tf32"
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
        dtype = PRECISIONS[self.config.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=getattr(torch, dtype), cache_enabled=cast_cache)

    @torch.inference_mode()
    def start_batch(self, images: list[Image.Image | RGBImage]) -> PendingBatch:
        """Run the model on RGB images (any sizes) and start their postprocessing.

        On the CPU, returns with the batch done. On CUDA, returns once the batch's work is queued
        on the device: the only wait is for the kept-query count (`forward_kept`); the
        postprocessing threads (on streams of their own) wait for the model's CUDA event, while
        the caller stages and queues the next batch, so that the GPU always has work.
        `PendingBatch.results()` waits for the results."""
        cfg = self.config
        start = time.perf_counter()
        started = None
        if self.device.type == "cuda":
            started = torch.cuda.Event(enable_timing=True)
            started.record(torch.cuda.current_stream(self.device))
        sizes = [processed_size(im.width, im.height, cfg.min_size, cfg.max_size) for im in images]
        batch = prepare_batch(images, sizes, self.device, self._staging)
        pixels = batch.images.contiguous(memory_format=self._memory_format)
        if self._graphs is not None:
            detected = self._graphs(pixels, batch.padding_mask, cfg.threshold, (cfg.precision,))
            with self._autocast():
                outputs = self.model.kept_masks(detected)
        else:
            with self._autocast():
                outputs = self.model.forward_kept(pixels, batch.padding_mask, cfg.threshold)
        outputs = {k: (v.float() if v.is_floating_point() else v) for k, v in outputs.items()}
        model_done = time.perf_counter()        # the CPU's model time (CUDA: see PendingBatch)
        futures = start_postprocess(outputs, batch.sizes, [(im.height, im.width) for im in images],
                                    executor=self._postprocess_pool, label_map=self.label_map)
        timing = None
        if started is not None:
            timing = (started, torch.cuda.Event(enable_timing=True))
            timing[1].record(torch.cuda.current_stream(self.device))
        return PendingBatch(futures, (model_done - start) * 1e3 / len(images), start if timing else model_done,
                            timing)

    def predict_batch(self, images: list[Image.Image]) -> list[dict]:
        """RGB images (any sizes) → one postprocessed result each ({id_map, png, segments_info}),
        with the batch's per-image share of model and postprocessing time (model_ms, postprocess_ms)."""
        return self.start_batch(images).results()

    def predict_batches(self, batches: Iterable[list[Image.Image | RGBImage]]) -> Iterator[list[dict]]:
        """`predict_batch` for each batch, in order, through the one batch schedule
        (`BatchSchedule`): on CUDA each batch's model is queued before the previous batch's
        results are collected."""
        schedule = BatchSchedule(self)
        for images in batches:
            for _, pending in schedule.start(images):
                yield pending.results()
        for _, pending in schedule.drain():
            yield pending.results()

    def predict(self, images: list[Image.Image]) -> list[dict]:
        """Any number of images, in batches of `batch_size`, results in input order."""
        batches = (images[start:start + self.batch_size] for start in range(0, len(images), self.batch_size))
        return [result for results in self.predict_batches(batches) for result in results]


class PendingBatch:
    """A batch whose model pass is done (CPU) or queued (CUDA) and whose postprocessing may still
    be running."""

    def __init__(self, futures: list[Future], model_ms: float, postprocess_started: float,
                 device_timing: tuple[torch.cuda.Event, torch.cuda.Event] | None = None):
        self._futures = futures
        self._model_ms = model_ms                  # per image
        self._started = postprocess_started
        self._device_timing = device_timing        # CUDA: events around the batch's device work
        self._finished = [postprocess_started]     # appended to by the threads that finish images
        for future in futures:
            # Runs in the finishing thread, or at once for a future already done.
            future.add_done_callback(lambda _: self._finished.append(time.perf_counter()))

    def done(self) -> bool:
        """Whether every image is postprocessed (always, where postprocessing runs in line: CPU)."""
        return all(future.done() for future in self._futures)

    def results(self) -> list[dict]:
        """Each image's result, with model_ms and postprocess_ms per image: the batch's model time
        and the wall time of its postprocessing (until its last image was done). On CUDA the model
        time is the device's (staging, preprocessing and model, between two CUDA events) and the
        postprocessing time the rest of the batch's wall time from its start."""
        results = [future.result() for future in self._futures]
        n = max(1, len(results))
        wall_ms = (max(self._finished) - self._started) * 1e3
        model_ms = self._model_ms
        if self._device_timing is not None:
            first, last = self._device_timing
            last.synchronize()
            model_ms = first.elapsed_time(last) / n
            wall_ms = max(0.0, wall_ms - model_ms * n)
        for result in results:
            result["model_ms"] = model_ms
            result["postprocess_ms"] = wall_ms / n
        return results


class BatchSchedule:
    """The one place where batches are started and collected: the worker (worker.pipeline),
    `predict`, `run` and the benchmarks all go through it.

    `start(images, tag)` starts a batch (`Predictor.start_batch`) and returns the batches ready to
    be collected, oldest first, as (tag, PendingBatch): on the CPU the batch itself (done in
    line); on CUDA the batch before it, whose postprocessing ran while this one was staged and
    queued, so that `in_flight` batches (PANOPTIC_BATCHES_IN_FLIGHT, default 1) stay started and
    the GPU always has the next one. A model
    pass that raises gives a batch whose results() raise the same, dealt with when it is collected
    (in order, like any other). `drain()` returns the batches still in flight."""

    def __init__(self, predictor: Predictor, in_flight: int | None = None):
        self.predictor = predictor
        self.in_flight = in_flight if in_flight is not None else predictor.batches_in_flight
        self._started: deque[tuple[object, PendingBatch]] = deque()

    def start_now(self, images: list) -> PendingBatch:
        """The batch's PendingBatch, outside the schedule (e.g. an image retried alone); if its
        model pass raised, one whose results() raise that."""
        try:
            return self.predictor.start_batch(images)
        except Exception as exc:
            failed = Future()
            failed.set_exception(exc)
            return PendingBatch([failed], 0.0, time.perf_counter())

    def start(self, images: list, tag: object = None) -> list[tuple[object, PendingBatch]]:
        self._started.append((tag, self.start_now(images)))
        ready = []
        while self._started and (len(self._started) > self.in_flight or self._started[0][1].done()):
            ready.append(self._started.popleft())
        return ready

    def take_oldest(self) -> tuple[object, PendingBatch] | None:
        """The oldest batch still in flight, handed back before its turn (e.g. to free memory its
        images hold), or None."""
        return self._started.popleft() if self._started else None

    def drain(self) -> list[tuple[object, PendingBatch]]:
        ready, self._started = list(self._started), deque()
        return ready
