"""The detector as CUDA graphs: one replay per batch instead of ~800 kernel launches.

On a GPU worker the thread that drives the model launches every kernel of the backbone, the
transformer and the heads from Python; on an H200 the model side alone (`Predictor`, no files or
SQL) then reached 104 bf16 images/s with the device idle between launches. With these graphs it
reached 121 (another lease of the same card, 2026-12-04; BENCHMARKS.md). Opt-in for now
(`cuda_graphs_enabled`).

`DetectorGraphs` captures `DETRPanoptic.detect` (no host round trip in it) once per input shape
and replays it; the mask head, whose size depends on the kept-query count, stays eager.

A shape is captured the second time it is seen (one-off shapes, e.g. a chunk's last odd batch,
run eagerly) and at most `max_graphs` are kept (least recently used first out: each holds the
memory of one detector pass). A capture that fails falls back to eager for that shape, for good;
one refused because the card's memory is short is tried again when the shape next repeats.
Results equal the eager pass's up to the algorithms the libraries pick (float rounding).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace

import torch

from .model.segmentation import DETRPanoptic, DetectorPass

log = logging.getLogger(__name__)

MAX_GRAPHS = 4
MAX_SEEN_SHAPES = 256    # shapes whose repeat count is kept (least recently seen first out)
WARMUP_PASSES = 2        # eager passes on a side stream before capturing: library handles, workspaces
MIN_FREE_FRACTION = 0.4  # capture only while this much of the card's memory is free


def cuda_graphs_enabled() -> bool:
    """PANOPTIC_CUDA_GRAPHS: 1 captures the detector on CUDA devices, 0 (default) runs it eagerly.

    Off by default: on an H200 (2026-12-04) a bf16 `run` was limited by its postprocessing threads
    and went no faster with graphs (77.6 images/s either way, same run), at 5.3 GiB more device
    memory, and the CUDA test that compares graph and eager results has not run on a GPU yet."""
    value = os.environ.get("PANOPTIC_CUDA_GRAPHS", "0")
    if value not in ("0", "1"):
        raise ValueError(f"PANOPTIC_CUDA_GRAPHS must be 0 or 1, not {value!r}")
    return value == "1"


class _Captured:
    def __init__(self, graph: torch.cuda.CUDAGraph, images: torch.Tensor, mask: torch.Tensor, out: DetectorPass):
        self.graph, self.images, self.mask, self.out = graph, images, mask, out


class DetectorGraphs:
    """`model.detect(images, padding_mask, threshold)` through CUDA graphs, one per input shape.

    `autocast` makes the precision's context (entered around captures and eager passes alike).
    The returned pass's tensors that outlive the batch's model step (logits, boxes, keep: read by
    the postprocessing threads) are copies; the others (attention, laterals, context) are the
    graph's own buffers, valid until the next replay of the same shape, which the caller's
    stream orders after the mask head that reads them."""

    def __init__(self, model: DETRPanoptic, autocast: Callable[[], contextlib.AbstractContextManager],
                 max_graphs: int = MAX_GRAPHS):
        self.model = model
        self.autocast = autocast
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self._seen: OrderedDict[tuple, int] = OrderedDict()     # key → passes, bounded
        self._failed: set[tuple] = set()
        self.captures = 0           # graphs captured (tests, logs)
        self.replays = 0

    def __call__(self, images: torch.Tensor, padding_mask: torch.Tensor, threshold: float,
                 key_extra: tuple = ()) -> DetectorPass:
        key = (tuple(images.shape), images.stride(), images.dtype, tuple(padding_mask.shape), float(threshold),
               images.device, *key_extra)
        seen = self._seen[key] = self._seen.pop(key, 0) + 1
        if len(self._seen) > MAX_SEEN_SHAPES:
            self._seen.popitem(last=False)
        captured = self._graphs.get(key)
        if captured is None and seen >= 2 and key not in self._failed:
            captured = self._capture(key, images, padding_mask, threshold, first_try=seen == 2)
        if captured is None:
            with self.autocast():
                return self.model.detect(images, padding_mask, threshold)
        self._graphs.move_to_end(key)
        captured.images.copy_(images)
        captured.mask.copy_(padding_mask)
        captured.graph.replay()
        self.replays += 1
        out = captured.out
        return replace(out, pred_logits=out.pred_logits.clone(), pred_boxes=out.pred_boxes.clone(),
                       keep=out.keep.clone())

    def _capture(self, key, images, padding_mask, threshold, first_try: bool) -> _Captured | None:
        try:
            free, total = torch.cuda.mem_get_info(images.device)
        except Exception:
            free, total = 0, 0                          # not a CUDA device: the capture below fails
        if total and free < MIN_FREE_FRACTION * total:
            # A graph keeps a pass's activations for good: on a card this full, eager passes
            # (which return their memory) are safer than one more graph. Not marked failed: the
            # memory may be free when the shape repeats (logged once per shape).
            if first_try:
                log.info("not capturing a CUDA graph for input %s: %.1f of %.1f GiB free", tuple(images.shape),
                         free / 2**30, total / 2**30)
            return None
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)            # its memory pool goes with it
        static_images = torch.empty_strided(images.shape, images.stride(), dtype=images.dtype, device=images.device)
        static_images.copy_(images)
        static_mask = padding_mask.clone()
        try:
            side = torch.cuda.Stream(images.device)
            side.wait_stream(torch.cuda.current_stream(images.device))
            with torch.cuda.stream(side), self.autocast():
                for _ in range(WARMUP_PASSES):
                    self.model.detect(static_images, static_mask, threshold)
            torch.cuda.current_stream(images.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the postprocessing threads go on launching and synchronising their own
            # streams while this thread captures.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"), self.autocast():
                out = self.model.detect(static_images, static_mask, threshold)
        except Exception as exc:          # e.g. an operation a graph cannot hold: this shape stays eager
            self._failed.add(key)
            log.warning("CUDA graph capture failed for input %s (%s: %s); running that shape eagerly",
                        tuple(images.shape), type(exc).__name__, exc)
            return None
        self.captures += 1
        captured = self._graphs[key] = _Captured(graph, static_images, static_mask, out)
        return captured

    def clear(self) -> None:
        """Drop every graph (and its memory); shapes are captured again when they repeat."""
        self._graphs.clear()
        self._seen.clear()

    def __len__(self) -> int:
        return len(self._graphs)

