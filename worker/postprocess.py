"""Panoptic postprocessing: DETR outputs → per-image id map, PNG and segments_info.

Semantics are those of DETR's reference panoptic postprocessor (docs/postprocessing.md lists the
three places where this one differs on purpose). Why one file: the exact argmax (the bilinear
emulation, contested cells, refinement) and the segment bookkeeping that drives it are one
algorithm whose invariant (bit-identical to F.interpolate and argmax) is stated once, below. Per
image:

1. keep the queries whose best class is not "no object" and whose probability is > threshold;
2. upsample each kept query's mask logits (its valid, unpadded region: ceil(h/4) × ceil(w/4))
   bilinearly (align_corners=False) to the processed size (h, w);
3. give each pixel to the kept query with the highest mask logit; the queries of one *stuff*
   class (by the label map, COCO's by default) form one segment;
4. resize the id map to the target (original) size with PIL's NEAREST convention;
5. drop every segment of <= 4 pixels at the target size, with its queries, and redo 3–5.

How it is computed (all pixel work in torch on the masks' device):

- Only the processed pixels that the nearest resize samples matter, so the argmax runs on that
  grid of processed rows × columns (never on the full processed size) and is expanded to the target
  size with index_select.
- The bilinear upsampling is never materialised. A grid pixel's value for a query is a convex
  combination of the four mask logits of its source cell, so a query whose minimum over a cell beats
  every other query's maximum over that cell (by a margin far above rounding error) wins every pixel
  of that cell. Only pixels in contested cells are interpolated, with exactly the arithmetic of
  PyTorch's CPU bilinear kernel (`F.interpolate`, generic path): source index and both blends are
  fused multiply-adds, reproduced here in float64 and rounded once to float32. The results are
  therefore bit-identical to upsampling with F.interpolate on the CPU and taking the argmax (first
  index on ties). For a processed size with h + w <= 128, where PyTorch switches to another CPU
  kernel, F.interpolate itself is used (it is cheap there). On the CPU, when most cells are
  contested (masks that differ little anywhere), whole masks are upsampled with F.interpolate a
  few queries at a time instead: the same values, faster than going pixel by pixel.
- When small segments are dropped, only the pixels whose winner was dropped are recomputed (among
  the remaining queries); every other pixel keeps its winner, which is still the first maximum.
- Areas come from a bincount of the target-size id map, boxes from per-row and per-column
  bincounts; one small transfer per loop iteration, then the id map for the PNG.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .labels import LabelMap, coco_label_map
from .model.segmentation import kept_queries
from .output import encode_id_png

__all__ = ["panoptic_postprocess", "postprocess_kept", "start_postprocess", "pil_nearest_indices", "bilinear_source",
           "DEFAULT_THRESHOLD", "MASK_STRIDE", "MIN_AREA"]

DEFAULT_THRESHOLD = 0.85
MASK_STRIDE = 4
MIN_AREA = 4  # a segment of at most this many pixels (at the target size) is dropped

# PyTorch's CPU bilinear kernel takes another (channels-last) path for outputs with h + w <= 128.
_SMALL_OUTPUT = 128
# Elements (queries × pixels) per chunk when interpolating contested pixels exactly.
_EXACT_CHUNK = 1 << 21
# On the CPU, when more than this fraction of the grid lies in contested cells, upsampling every
# kept mask with F.interpolate itself (the reference's kernel, so the same values) and taking the
# argmax beats interpolating pixel by pixel: 15 queries at 800×1066 with every cell contested took
# 0.26–0.56 s one pixel at a time, 0.05–0.13 s upsampled whole.
_DENSE_FRACTION = 0.25
# Upsampled elements (queries × processed pixels) held at once on that path (32 MiB of float32).
_DENSE_CHUNK = 1 << 23


# --------------------------------------------------------------------------------------------
# Index vectors
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1024)
def pil_nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index per output index of PIL's Image.resize(NEAREST) along one axis.

    PIL walks x_0 = 0.5·s, x_{k+1} = x_k + s with s = n_in / n_out in double precision, one
    addition at a time, and takes int(x_k). (The closed form (k + 0.5)·s differs from this running
    sum where it is an exact integer, e.g. 200 → 300.) Read-only int64 array of length n_out.
    """
    n_in, n_out = int(n_in), int(n_out)
    if n_in <= 0 or n_out <= 0:
        raise ValueError(f"sizes must be positive, got {n_in} → {n_out}")
    s = n_in / n_out
    x = 0.5 * s
    out = []
    append = out.append
    for _ in range(n_out):
        append(int(x))
        x += s
    idx = np.minimum(np.array(out, dtype=np.int64), n_in - 1)
    idx.flags.writeable = False
    return idx


@functools.lru_cache(maxsize=1024)
def bilinear_source(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(i0, i1, l0, l1) per output index for bilinear resizing n_in → n_out, align_corners=False.

    Output k is l0[k]·in[i0[k]] + l1[k]·in[i1[k]], with the float32 weights PyTorch's CPU kernel
    computes: scale = float32(n_in) / n_out, source = fma(scale, k + 0.5, -0.5) clamped at 0,
    i0 = min(floor(source), n_in - 1), l1 = clamp(source - i0, 0, 1), l0 = 1 - l1,
    i1 = i0 + (i0 < n_in - 1); equal sizes copy (l0 = 1, l1 = 0).
    """
    n_in, n_out = int(n_in), int(n_out)
    if n_in <= 0 or n_out <= 0:
        raise ValueError(f"sizes must be positive, got {n_in} → {n_out}")
    if n_in == n_out:
        i0 = np.arange(n_out, dtype=np.int64)
        i1 = i0.copy()
        l0 = np.ones(n_out, np.float32)
        l1 = np.zeros(n_out, np.float32)
    else:
        scale = np.float32(n_in) / np.float32(n_out)
        centre = np.arange(n_out, dtype=np.float32) + np.float32(0.5)
        # The product of two float32 is exact in float64 and so is subtracting 0.5 at these
        # magnitudes: one rounding to float32, as a fused multiply-add does.
        src = (np.float64(scale) * centre.astype(np.float64) - 0.5).astype(np.float32)
        src = np.maximum(src, np.float32(0))
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        l1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
        l0 = (np.float32(1) - l1).astype(np.float32)
        i1 = i0 + (i0 < n_in - 1)
    for a in (i0, i1, l0, l1):
        a.flags.writeable = False
    return i0, i1, l0, l1


@dataclass(frozen=True)
class _Geometry:
    """Index tensors for one (mask size, processed size, target size) on one device.

    The grid is the set of processed rows × columns that the nearest resize samples (ascending);
    inv_r / inv_c map each target row / column to its grid row / column (None: the identity).
    """
    h4: int
    w4: int
    h: int
    w: int
    grid_rows: torch.Tensor   # [nr] processed rows of the grid
    grid_cols: torch.Tensor   # [nc]
    inv_r: torch.Tensor | None  # [H] grid row of each target row
    inv_c: torch.Tensor | None  # [W]
    r0: torch.Tensor          # [nr] bilinear source rows and weights of each grid row
    r1: torch.Tensor
    rl0: torch.Tensor
    rl1: torch.Tensor
    c0: torch.Tensor          # [nc] the same for columns
    c1: torch.Tensor
    cl0: torch.Tensor
    cl1: torch.Tensor


@functools.lru_cache(maxsize=128)
def _geometry(h4: int, w4: int, h: int, w: int, H: int, W: int, device: torch.device) -> _Geometry:
    rows, inv_r = np.unique(pil_nearest_indices(h, H), return_inverse=True)
    cols, inv_c = np.unique(pil_nearest_indices(w, W), return_inverse=True)
    yi0, yi1, yl0, yl1 = bilinear_source(h4, h)
    xi0, xi1, xl0, xl1 = bilinear_source(w4, w)

    def t(a):
        return torch.tensor(np.ascontiguousarray(a), device=device)

    return _Geometry(h4, w4, h, w, t(rows), t(cols),
                     None if len(rows) == H else t(inv_r.reshape(-1)),
                     None if len(cols) == W else t(inv_c.reshape(-1)),
                     t(yi0[rows]), t(yi1[rows]), t(yl0[rows]), t(yl1[rows]),
                     t(xi0[cols]), t(xi1[cols]), t(xl0[cols]), t(xl1[cols]))


# --------------------------------------------------------------------------------------------
# Exact bilinear values and the per-pixel argmax
# --------------------------------------------------------------------------------------------

def _fma(a: torch.Tensor, b64: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 a·b + c rounded once (b given in float64): a·b is exact in float64."""
    return torch.addcmul(c.double(), a.double(), b64).float()


def _bilinear_values(flat: torch.Tensor, w4: int, y0, y1, wy0, wy1, x0, x1, wx0, wx1,
                     offset: torch.Tensor | int = 0) -> torch.Tensor:
    """Bilinear values of flattened mask logits at pixels given by their sources.

    flat: [Q·h4·w4] (queries one after the other); y0, y1, wy0, wy1, x0, x1, wx0, wx1: [P] source
    rows, columns and weights; offset: where each value's query starts in `flat`, broadcast
    against [P] (e.g. [Q', 1]·h4·w4 for Q' queries at every pixel, or [P]). PyTorch's CPU kernel
    computes t_i = fma(in[y_i, x0], wx0, in[y_i, x1]·wx1) and out = fma(t0, wy0, t1·wy1).
    """
    wx0d, wy0d = wx0.double(), wy0.double()
    r0, r1 = y0 * w4 + offset, y1 * w4 + offset
    t0 = _fma(flat[r0 + x0], wx0d, flat[r0 + x1] * wx1)
    t1 = _fma(flat[r1 + x0], wx0d, flat[r1 + x1] * wx1)
    return _fma(t0, wy0d, t1 * wy1)


def bilinear_resize_exact(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[Q, h4, w4] → [Q, h, w], bit-identical to F.interpolate(bilinear, align_corners=False) on
    the CPU (generic kernel, h + w > 128). For tests; the postprocessor never materialises this."""
    q, h4, w4 = masks.shape
    h, w = size
    dev = masks.device
    yi0, yi1, yl0, yl1 = (torch.tensor(a, device=dev) for a in bilinear_source(h4, h))
    xi0, xi1, xl0, xl1 = (torch.tensor(a, device=dev) for a in bilinear_source(w4, w))
    rr = torch.arange(h, device=dev).repeat_interleave(w)
    cc = torch.arange(w, device=dev).repeat(h)
    offset = torch.arange(q, device=dev)[:, None] * (h4 * w4)
    out = _bilinear_values(masks.float().reshape(-1), w4, yi0[rr], yi1[rr], yl0[rr], yl1[rr],
                           xi0[cc], xi1[cc], xl0[cc], xl1[cc], offset)
    return out.view(q, h, w)


class _QueryArgmax:
    """One image's per-grid-pixel argmax over its kept queries' upsampled mask logits.

    `first()` gives, per grid pixel, the position (0..K-1) of the query with the highest value, the
    first one on ties; `refine(grid, active, rr, cc)` recomputes it among the `active` queries at
    the given grid pixels (those whose winner was dropped: every other pixel keeps its winner).
    """

    def __init__(self, masks: torch.Tensor, g: _Geometry):
        self.g = g
        self.k = masks.shape[0]
        self.device = masks.device
        self.small = g.h + g.w <= _SMALL_OUTPUT
        if self.small:
            up = F.interpolate(masks[:, None], size=(g.h, g.w), mode="bilinear", align_corners=False)[:, 0]
            self.values = up.index_select(1, g.grid_rows).index_select(2, g.grid_cols)
        else:
            self.masks = masks
            self.flat = masks.reshape(-1)

    def first(self) -> torch.Tensor:
        g = self.g
        nr, nc = g.grid_rows.numel(), g.grid_cols.numel()
        if self.k == 1:
            return torch.zeros((nr, nc), dtype=torch.long, device=self.device)
        if self.small:
            return self.values.argmax(0)
        k, n = self.k, g.h4 * g.w4
        # Minimum and maximum of each query over each source cell {i0, i0+1} × {j0, j0+1} (the
        # last row / column pairs with itself, as the kernel's clamped i1 does).
        padded = F.pad(self.masks[:, None], (0, 1, 0, 1), mode="replicate")[:, 0]
        lo = torch.minimum(padded[:, :-1], padded[:, 1:])
        hi = torch.maximum(padded[:, :-1], padded[:, 1:])
        cell_min = torch.minimum(lo[..., :-1], lo[..., 1:]).reshape(k, n)
        cell_max = torch.maximum(hi[..., :-1], hi[..., 1:]).reshape(k, n)
        # An interpolated value lies within its cell's [min, max] up to a few float32 roundings
        # (< 2^-20 of the largest magnitude); demand a margin far above that.
        margin = self.masks.abs().amax() * 2.0 ** -14
        best, arg = cell_min.max(0)
        others = cell_max.scatter(0, arg[None], float("-inf")).amax(0)
        winner = torch.where(best > others + margin, arg, -1)
        grid = winner.view(g.h4, g.w4).index_select(0, g.r0).index_select(1, g.c0)
        rr, cc = (grid < 0).nonzero(as_tuple=True)
        if self.device.type == "cpu" and rr.numel() > _DENSE_FRACTION * grid.numel():
            return self._upsampled_argmax()
        if rr.numel():
            grid[rr, cc] = self._contested(cell_max, best - margin, rr, cc)
        return grid

    def _upsampled_argmax(self) -> torch.Tensor:
        """The argmax at every grid pixel from F.interpolate's upsampled masks, a chunk of queries
        at a time (CPU only: this is the kernel the emulation reproduces bit for bit)."""
        g = self.g
        step = max(1, _DENSE_CHUNK // (g.h * g.w))
        best = arg = None
        for s in range(0, self.k, step):
            up = F.interpolate(self.masks[s:s + step, None], size=(g.h, g.w), mode="bilinear", align_corners=False)
            values, index = up[:, 0].max(0)   # over every processed pixel: cheaper than gathering the grid first
            if best is None:
                best, arg = values, index
            else:
                better = values > best                 # ties keep the earlier query, as argmax does
                best = torch.where(better, values, best)
                arg = torch.where(better, index + s, arg)
        return arg.index_select(0, g.grid_rows).index_select(1, g.grid_cols)

    def _contested(self, cell_max, floor, rr, cc) -> torch.Tensor:
        """Exact argmax at grid pixels (rr, cc) of contested cells.

        Only candidates are interpolated: queries whose maximum over the pixel's cell is above
        `floor` (the best cell minimum less the margin); any other query is strictly below the
        best one everywhere in the cell.
        """
        g = self.g
        n = g.h4 * g.w4
        out = torch.empty(rr.numel(), dtype=torch.long, device=rr.device)
        step = max(1, _EXACT_CHUNK // self.k)
        for s in range(0, rr.numel(), step):
            r, c = rr[s:s + step], cc[s:s + step]
            cell = g.r0[r] * g.w4 + g.c0[c]
            qi, pi = (cell_max[:, cell] > floor[cell]).nonzero(as_tuple=True)
            r, c = r[pi], c[pi]
            values = _bilinear_values(self.flat, g.w4, g.r0[r], g.r1[r], g.rl0[r], g.rl1[r],
                                      g.c0[c], g.c1[c], g.cl0[c], g.cl1[c], qi * n)
            top = torch.full((cell.numel(),), float("-inf"), device=rr.device)
            top.scatter_reduce_(0, pi, values, "amax")
            is_top = values == top[pi]
            first = torch.full((cell.numel(),), self.k - 1, dtype=torch.long, device=rr.device)
            first.scatter_reduce_(0, pi[is_top], qi[is_top], "amin")   # the first query on ties
            out[s:s + step] = first
        return out

    def refine(self, grid: torch.Tensor, active: torch.Tensor, rr: torch.Tensor, cc: torch.Tensor) -> None:
        """Set grid[rr, cc] to the argmax among `active` (ascending query positions), in place."""
        if active.numel() == 1:
            grid[rr, cc] = active[0]
            return
        if self.small:
            values = self.values.index_select(0, active)[:, rr, cc]
            grid[rr, cc] = active[values.argmax(0)]
            return
        g = self.g
        step = max(1, _EXACT_CHUNK // active.numel())
        offset = active[:, None] * (g.h4 * g.w4)
        for s in range(0, rr.numel(), step):
            r, c = rr[s:s + step], cc[s:s + step]
            values = _bilinear_values(self.flat, g.w4, g.r0[r], g.r1[r], g.rl0[r], g.rl1[r],
                                      g.c0[c], g.c1[c], g.cl0[c], g.cl1[c], offset)   # [active, p]
            grid[r, c] = active[values.argmax(0)]


# --------------------------------------------------------------------------------------------
# Segments
# --------------------------------------------------------------------------------------------

def _group(active: Sequence[int], labels: Sequence[int], k: int,
           label_map: LabelMap) -> tuple[list[int], list[list[int]]]:
    """Segment of each query (1-based, 0 for inactive) and each segment's queries: one segment per
    thing query, one per stuff class; numbered in the order of their first query."""
    seg_of = [0] * k
    members: list[list[int]] = []
    stuff: dict[int, int] = {}
    for q in active:
        cat = labels[q]
        thing = label_map.isthing(cat)
        s = stuff.get(cat) if not thing else None
        if s is None:
            members.append([q])
            s = len(members)
            if not thing:
                stuff[cat] = s
        else:
            members[s - 1].append(q)
        seg_of[q] = s
    return seg_of, members


def _void_result(height: int, width: int) -> dict:
    id_map = np.zeros((height, width), np.int32)
    return {"id_map": id_map, "png": encode_id_png(id_map), "segments_info": []}


def _expand(grid_map: torch.Tensor, g: _Geometry) -> torch.Tensor:
    """Grid → target size (the nearest resize)."""
    if g.inv_r is not None:
        grid_map = grid_map.index_select(0, g.inv_r)
    if g.inv_c is not None:
        grid_map = grid_map.index_select(1, g.inv_c)
    return grid_map


def _postprocess_image(masks: torch.Tensor, labels: list[int], scores: list[float],
                       processed: tuple[int, int], target: tuple[int, int], label_map: LabelMap) -> dict:
    """masks: [K, h4, w4] float32 mask logits of the image's kept queries (valid region)."""
    H, W = target
    k = len(labels)
    if k == 0:
        return _void_result(H, W)
    dev = masks.device
    g = _geometry(masks.shape[1], masks.shape[2], processed[0], processed[1], H, W, dev)
    argmax = _QueryArgmax(masks, g)
    grid = argmax.first()                     # query position per grid pixel
    active = list(range(k))
    while True:
        seg_of, members = _group(active, labels, k, label_map)
        n_seg = len(members)
        lut = torch.tensor(seg_of, dtype=torch.int32, device=dev)
        id_map = _expand(lut[grid], g)                                          # [H, W] int32
        area = torch.bincount(id_map.view(-1), minlength=n_seg + 1).tolist()
        small = {s for s in range(1, n_seg + 1) if area[s] <= MIN_AREA}
        if not small:
            break
        active = [q for q in active if seg_of[q] not in small]
        if not active:
            return _void_result(H, W)
        dropped = torch.tensor([seg_of[q] in small for q in range(k)], device=dev)
        rr, cc = dropped[grid].nonzero(as_tuple=True)
        if rr.numel():
            argmax.refine(grid, torch.tensor(active, dtype=torch.long, device=dev), rr, cc)

    rows = torch.arange(H, dtype=torch.int32, device=dev)[:, None]
    cols = torch.arange(W, dtype=torch.int32, device=dev)[None, :]
    per_row = torch.bincount((id_map * H + rows).view(-1), minlength=(n_seg + 1) * H).view(n_seg + 1, H)
    per_col = torch.bincount((id_map * W + cols).view(-1), minlength=(n_seg + 1) * W).view(n_seg + 1, W)
    in_row, in_col = (per_row > 0).to(torch.uint8), (per_col > 0).to(torch.uint8)
    box = torch.stack([in_col.argmax(1), in_row.argmax(1),
                       W - 1 - in_col.flip(1).argmax(1), H - 1 - in_row.flip(1).argmax(1)], 1).tolist()
    id_np = id_map.cpu().numpy()

    segments = []
    for s, qs in enumerate(members, start=1):
        cat = int(labels[qs[0]])
        x0, y0, x1, y1 = box[s]
        segments.append({
            "id": s,
            "category_id": cat,
            "category_name": label_map.name(cat),
            "isthing": label_map.isthing(cat),
            "area": int(area[s]),
            "bbox": [int(x0), int(y0), int(x1 - x0 + 1), int(y1 - y0 + 1)],
            "score": float(max(scores[q] for q in qs)),
            "iscrowd": 0,
        })
    return {"id_map": id_np, "png": encode_id_png(id_np), "segments_info": segments}


def _pair(size) -> tuple[int, int]:
    if isinstance(size, torch.Tensor):
        size = size.tolist()
    h, w = size
    return int(h), int(w)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------

_side_streams = threading.local()


def _postprocess_job(masks: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor, keep: torch.Tensor,
                     processed: tuple[int, int], target: tuple[int, int], label_map: LabelMap) -> dict:
    """One image's result from its kept masks and its queries' [Q] labels, scores and keep flags
    (read to the host here, in the thread that postprocesses the image, not by the caller)."""
    kept = keep.nonzero().flatten()
    return _postprocess_image(masks, labels[kept].tolist(), scores[kept].tolist(), processed, target, label_map)


def _on_side_stream(ready: torch.cuda.Event, *args) -> dict:
    """`_postprocess_job` on this thread's own CUDA stream, after the `ready` event.

    Returns only after copying the id map to the host (which waits for this stream), so the
    caller's tensors are no longer in use once the result is back."""
    device = args[0].device
    stream = getattr(_side_streams, "stream", None)
    if stream is None or stream.device != device:
        stream = _side_streams.stream = torch.cuda.Stream(device)
    stream.wait_event(ready)
    with torch.inference_mode(), torch.cuda.stream(stream):  # both are per thread
        return _postprocess_job(*args)


def _in_thread(*args) -> dict:
    with torch.inference_mode():        # per thread
        return _postprocess_job(*args)


@torch.inference_mode()
def postprocess_kept(outputs_kept: Mapping[str, torch.Tensor], processed_sizes, target_sizes,
                     executor: Executor | None = None, label_map: LabelMap | None = None) -> list[dict]:
    """Results from the pruned model pass (`model.forward_kept`).

    outputs_kept: {"pred_logits" [B,Q,C+1], "keep" [B,Q] bool, "kept_masks" [K,H',W'] for the kept
    queries in (image, query) order, optionally "kept_counts" [B] on the host, ...};
    processed_sizes / target_sizes: B pairs (h, w).
    Returns per image {"id_map": int32 [H, W] (0 = VOID), "png": bytes, "segments_info": [...]}.
    With an `executor` (threads), images are postprocessed concurrently (with CUDA tensors each
    thread on its own CUDA stream); results are the same. `label_map` names the class ids and
    says which are stuff (default: the COCO panoptic categories).
    """
    return [f.result() for f in start_postprocess(outputs_kept, processed_sizes, target_sizes, executor, label_map)]


@torch.inference_mode()
def start_postprocess(outputs_kept: Mapping[str, torch.Tensor], processed_sizes, target_sizes,
                      executor: Executor | None = None, label_map: LabelMap | None = None) -> list[Future]:
    """`postprocess_kept` that returns at once with one future per image when given an
    `executor`: the caller may start the next model pass meanwhile. The futures hold the
    tensors they read, so the caller may drop its own. Without one, the futures are done."""
    logits, keep, masks = outputs_kept["pred_logits"], outputs_kept["keep"], outputs_kept["kept_masks"]
    label_map = label_map or coco_label_map()
    batch = logits.shape[0]
    if len(processed_sizes) != batch or len(target_sizes) != batch:
        raise ValueError(f"{batch} images but {len(processed_sizes)} processed and {len(target_sizes)} target sizes")
    # No host round trip here on CUDA: the model thread goes on to the next batch while these
    # kernels run; each image's thread reads its own labels and scores (`_postprocess_job`).
    scores, labels = logits.float().softmax(-1).max(-1)
    keep = keep.to(torch.bool)
    counts = outputs_kept["kept_counts"] if "kept_counts" in outputs_kept else keep.sum(1)
    counts = counts.tolist()
    if masks.shape[0] != sum(counts):
        raise ValueError(f"{masks.shape[0]} kept masks for {sum(counts)} kept queries")
    jobs = []
    start = 0
    for b in range(batch):
        n = counts[b]
        h, w = _pair(processed_sizes[b])
        H, W = _pair(target_sizes[b])
        h4, w4 = math.ceil(h / MASK_STRIDE), math.ceil(w / MASK_STRIDE)
        image_masks = masks[start:start + n, :h4, :w4].float().contiguous()
        jobs.append((image_masks, labels[b], scores[b], keep[b], (h, w), (H, W), label_map))
        start += n
    if executor is None:
        return [_done(_postprocess_job(*job)) for job in jobs]
    if masks.device.type != "cuda":
        return [executor.submit(_in_thread, *job) for job in jobs]
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(masks.device))   # the masks above are computed there
    return [executor.submit(_on_side_stream, ready, *job) for job in jobs]


def _done(result) -> Future:
    future = Future()
    future.set_result(result)
    return future


@torch.inference_mode()
def panoptic_postprocess(outputs: Mapping[str, torch.Tensor], processed_sizes, target_sizes,
                         threshold: float = DEFAULT_THRESHOLD, label_map: LabelMap | None = None) -> list[dict]:
    """Results from the full model outputs {"pred_logits" [B,Q,C+1], "pred_boxes", "pred_masks"
    [B,Q,H',W']} (a possibly padded batch); sizes are B pairs (h, w). See `postprocess_kept`."""
    keep = kept_queries(outputs["pred_logits"], threshold)
    kept = {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs.get("pred_boxes"),
            "keep": keep, "kept_masks": outputs["pred_masks"][keep]}
    return postprocess_kept(kept, processed_sizes, target_sizes, label_map=label_map)
