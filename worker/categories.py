"""The 133 COCO panoptic categories: the default label map (`worker.labels.coco_label_map`).

Shortcuts to that map's names, flags and colours. Code that shows a job's results (stats, export,
report, overlays) asks the job's own map instead (worker.labels.job_label_map), which is this one
unless the job was given another. A map also answers for ids it lacks (a model with random
weights can predict any index): see worker/labels.py.
"""

from __future__ import annotations

import functools

from .labels import coco_label_map


@functools.cache
def categories() -> tuple[dict, ...]:
    """The 133 categories as in the JSON file: id, name, supercategory, isthing, color."""
    return tuple(coco_label_map().as_coco())


def is_known(category_id: int) -> bool:
    """Whether the id is one of the 133 COCO panoptic categories."""
    return coco_label_map().is_known(category_id)


def isthing(category_id: int) -> bool:
    """Thing or stuff, from the COCO label map (ids it lacks: things up to 90, its largest thing id)."""
    return coco_label_map().isthing(category_id)


def category_name(category_id: int) -> str:
    """The category's name, or "unknown-<id>" for an id outside the 133."""
    return coco_label_map().name(category_id)


def color(category_id: int) -> tuple[int, int, int]:
    """The category's COCO display colour; a fixed colour derived from the id for unknown ids."""
    return coco_label_map().color(category_id)
