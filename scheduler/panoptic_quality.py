"""Panoptic quality (PQ = SQ × RQ), the arithmetic only: no files, no command line.

The rules are panopticapi's ``pq_compute`` (Kirillov et al., "Panoptic Segmentation"), so that the
numbers are the ones papers and detectron2 report:

- A ground-truth (GT) segment and a predicted segment of the same category match when their
  IoU > 0.5, where the union leaves out the predicted pixels that are VOID (id 0) in the GT.
  Crowd GT segments (``iscrowd == 1``) are never matched.
- GT areas are the ``area`` of the GT's ``segments_info``; predicted areas are counted in the
  predicted PNG (each id of the PNG must be listed in ``segments_info`` and the other way round,
  VOID aside).
- Unmatched, non-crowd GT segments are false negatives. An unmatched predicted segment is a false
  positive unless more than half of it lies on GT VOID plus the crowd region of its own category
  (with several crowd segments of one category in an image, the last one listed, as panopticapi).
- Per category: PQ = Σ IoU / (TP + FP/2 + FN/2), SQ = Σ IoU / TP, RQ = TP / (TP + FP/2 + FN/2);
  All / Things / Stuff average over the categories of the category list (things: ``isthing == 1``)
  that have at least one TP, FP or FN. Categories outside the list count nowhere: a predicted
  segment of such a category is, in effect, unlabelled (panopticapi refuses such predictions; here
  they are counted in ``unknown_predictions``).

Everything per image is vectorised: one histogram of (GT id, predicted id) pairs over the pixels
(``np.unique`` of a combined 48-bit id), then array arithmetic over the pairs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

__all__ = ["PanopticQualityError", "PQStats", "image_stats", "summarize"]

ID_BITS = 24           # COCO panoptic ids are R + 256·G + 256²·B < 2**24
VOID = 0


class PanopticQualityError(ValueError):
    """The inputs break the COCO panoptic format (the message says how)."""


@dataclass
class PQStats:
    """Per category: summed IoU of the matches, TP, FP, FN (adds up over images)."""

    iou: dict[int, float] = field(default_factory=dict)
    tp: dict[int, int] = field(default_factory=dict)
    fp: dict[int, int] = field(default_factory=dict)
    fn: dict[int, int] = field(default_factory=dict)
    images: int = 0
    unknown_predictions: int = 0   # predicted segments whose category is not in the category list

    def add(self, other: "PQStats") -> "PQStats":
        for mine, theirs in ((self.iou, other.iou), (self.tp, other.tp), (self.fp, other.fp), (self.fn, other.fn)):
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + value
        self.images += other.images
        self.unknown_predictions += other.unknown_predictions
        return self

    def categories_seen(self) -> set[int]:
        return set(self.tp) | set(self.fp) | set(self.fn)


class _Segments:
    """A segments_info list as arrays, in panopticapi's dict order (first position of an id, last
    occurrence's values)."""

    def __init__(self, segments_info, what: str, need_area: bool):
        if not isinstance(segments_info, list):
            raise PanopticQualityError(f"{what}: segments_info must be a list, not {type(segments_info).__name__}")
        by_id: dict[int, Mapping] = {}
        for segment in segments_info:
            if not isinstance(segment, Mapping) or "id" not in segment or "category_id" not in segment:
                raise PanopticQualityError(f"{what}: every segment needs an id and a category_id, got {segment!r:.120}")
            by_id[_int(segment["id"], what, "id")] = segment
        n = len(by_id)
        self.ids = np.fromiter(by_id, np.int64, n)
        self.cats = np.fromiter((_int(s["category_id"], what, "category_id") for s in by_id.values()), np.int64, n)
        self.crowd = np.fromiter((_int(s.get("iscrowd", 0), what, "iscrowd") == 1 for s in by_id.values()), bool, n)
        if need_area:
            if any("area" not in s for s in by_id.values()):
                raise PanopticQualityError(f"{what}: a ground-truth segment has no area")
            self.area = np.fromiter((_int(s["area"], what, "area") for s in by_id.values()), np.int64, n)
        self.order = np.argsort(self.ids, kind="stable")
        self.sorted_ids = self.ids[self.order]

    def index(self, ids: np.ndarray) -> np.ndarray:
        """Position (in dict order) of each id, -1 where the id is not listed."""
        if not len(self.ids):
            return np.full(ids.shape, -1, np.int64)
        at = np.searchsorted(self.sorted_ids, ids)
        at_clipped = np.minimum(at, len(self.ids) - 1)
        found = self.sorted_ids[at_clipped] == ids
        return np.where(found, self.order[at_clipped], -1)


def _int(value, what: str, key: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise PanopticQualityError(f"{what}: segment {key} must be an integer, got {value!r:.60}")


def _per_category(stats: dict, cats: np.ndarray, weights: np.ndarray | None = None, as_int: bool = True) -> None:
    if not len(cats):
        return
    keys, inverse = np.unique(cats, return_inverse=True)
    sums = np.bincount(inverse, weights=weights, minlength=len(keys))
    for key, value in zip(keys.tolist(), sums.tolist()):
        stats[key] = stats.get(key, 0) + (int(round(value)) if as_int else value)


def image_stats(gt_ids: np.ndarray, gt_segments: list, pred_ids: np.ndarray, pred_segments: list,
                known_categories: Iterable[int] | None = None, what: str = "image") -> PQStats:
    """TP, FP, FN and IoU sums per category for one image.

    gt_ids, pred_ids: [H, W] integer id maps (decoded PNGs); *_segments: their ``segments_info``.
    known_categories: the category list (only to count ``unknown_predictions``).
    """
    gt_ids, pred_ids = np.asarray(gt_ids), np.asarray(pred_ids)
    if gt_ids.shape != pred_ids.shape:
        raise PanopticQualityError(f"{what}: the prediction is {pred_ids.shape[1]}×{pred_ids.shape[0]} pixels, "
                                   f"the ground truth {gt_ids.shape[1]}×{gt_ids.shape[0]}")
    gt = _Segments(gt_segments, f"{what} (ground truth)", need_area=True)
    pred = _Segments(pred_segments, f"{what} (prediction)", need_area=False)

    # One histogram of (GT id, predicted id) pairs.
    combined = (gt_ids.astype(np.uint64) << np.uint64(ID_BITS)) | pred_ids.astype(np.uint64)
    pairs, counts = np.unique(combined.ravel(), return_counts=True)
    g = (pairs >> np.uint64(ID_BITS)).astype(np.int64)
    p = (pairs & np.uint64((1 << ID_BITS) - 1)).astype(np.int64)
    counts = counts.astype(np.int64)

    # Predicted areas from the PNG; PNG and segments_info must list the same ids (VOID aside).
    pidx = pred.index(p)
    stray = np.unique(p[(pidx < 0) & (p != VOID)])
    if len(stray):
        raise PanopticQualityError(f"{what} (prediction): segment ids {stray[:5].tolist()} are in the PNG but not "
                                   f"in segments_info")
    listed = pidx >= 0
    p_area = np.bincount(pidx[listed], weights=counts[listed], minlength=len(pred.ids)).astype(np.int64)
    absent = pred.ids[p_area == 0]
    if len(absent):
        raise PanopticQualityError(f"{what} (prediction): segment ids {absent[:5].tolist()} are in segments_info "
                                   f"but not in the PNG")
    on_void = listed & (g == VOID)
    p_void = np.bincount(pidx[on_void], weights=counts[on_void], minlength=len(pred.ids)).astype(np.int64)

    # Matches: same category, GT not crowd, IoU > 0.5.
    gidx = gt.index(g)
    cand = listed & (gidx >= 0)
    cg, cp, cc = gidx[cand], pidx[cand], counts[cand]
    keep = ~gt.crowd[cg] & (gt.cats[cg] == pred.cats[cp])
    cg, cp, cc = cg[keep], cp[keep], cc[keep]
    union = p_area[cp] + gt.area[cg] - cc - p_void[cp]
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = cc / union
    match = iou > 0.5
    stats = PQStats(images=1)
    _per_category(stats.tp, gt.cats[cg[match]])
    _per_category(stats.iou, gt.cats[cg[match]], iou[match], as_int=False)
    gt_matched = np.zeros(len(gt.ids), bool)
    gt_matched[cg[match]] = True
    pred_matched = np.zeros(len(pred.ids), bool)
    pred_matched[cp[match]] = True

    # False negatives: unmatched GT segments that are not crowd.
    _per_category(stats.fn, gt.cats[~gt_matched & ~gt.crowd])

    # False positives: unmatched predictions, unless over half of them is VOID + own-category crowd.
    crowd_of_category: dict[int, int] = {}
    for position in np.flatnonzero(gt.crowd & ~gt_matched).tolist():    # dict order: the last one wins
        crowd_of_category[int(gt.cats[position])] = int(gt.ids[position])
    ignored = p_void.copy()
    if crowd_of_category and len(pred.ids):
        crowd_id = np.array([crowd_of_category.get(c, -1) for c in pred.cats.tolist()], np.int64)
        on_crowd = listed & (g == crowd_id[np.maximum(pidx, 0)])
        ignored += np.bincount(pidx[on_crowd], weights=counts[on_crowd], minlength=len(pred.ids)).astype(np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        false_positive = ~pred_matched & ~(ignored / p_area > 0.5)
    _per_category(stats.fp, pred.cats[false_positive])

    if known_categories is not None:
        known = np.fromiter(known_categories, np.int64)
        stats.unknown_predictions = int((~np.isin(pred.cats, known)).sum())
    return stats


def summarize(stats: PQStats, categories: Iterable[Mapping]) -> dict:
    """``{"All"|"Things"|"Stuff": {"pq", "sq", "rq", "n"}, "per_class": {id: {...}}}``.

    Values are fractions (panopticapi's scale; ×100 for the usual percentages). A group with no
    category present (n = 0) has pq, sq and rq None (panopticapi divides by zero there).
    ``per_class`` holds the categories present (TP + FP + FN > 0), with their counts.
    """
    by_id: dict[int, Mapping] = {}
    for category in categories:
        by_id[int(category["id"])] = category
    per_class: dict[int, dict] = {}
    for cat_id, category in by_id.items():
        tp, fp, fn = stats.tp.get(cat_id, 0), stats.fp.get(cat_id, 0), stats.fn.get(cat_id, 0)
        if tp + fp + fn == 0:
            continue
        iou = stats.iou.get(cat_id, 0.0)
        per_class[cat_id] = {
            "name": category.get("name", str(cat_id)), "isthing": category.get("isthing") == 1,
            "pq": iou / (tp + 0.5 * fp + 0.5 * fn), "sq": iou / tp if tp else 0.0,
            "rq": tp / (tp + 0.5 * fp + 0.5 * fn), "tp": tp, "fp": fp, "fn": fn,
        }
    result: dict = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        rows = [r for r in per_class.values() if isthing is None or r["isthing"] == isthing]
        n = len(rows)
        if n:
            result[name] = {key: sum(r[key] for r in rows) / n for key in ("pq", "sq", "rq")} | {"n": n}
        else:
            result[name] = {"pq": None, "sq": None, "rq": None, "n": 0}
    result["per_class"] = per_class
    return result
