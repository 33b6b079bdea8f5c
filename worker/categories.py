"""The 133 COCO panoptic categories (worker/panoptic_coco_categories.json).

DETR's class index *is* the COCO panoptic category id: indices 0..249 are ids, 250 is "no object";
only 133 of them are real categories (ids 1..200). Things have ids <= 90, stuff ids > 90. A model
with random weights can predict any index, so every helper also answers for unknown ids.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

THING_MAX_ID = 90


@functools.cache
def categories() -> tuple[dict, ...]:
    """The 133 categories as in the JSON file: id, name, supercategory, isthing, color."""
    text = resources.files(__package__).joinpath("panoptic_coco_categories.json").read_text(encoding="utf-8")
    return tuple(json.loads(text))


@functools.cache
def _by_id() -> dict[int, dict]:
    return {int(c["id"]): c for c in categories()}


def is_known(category_id: int) -> bool:
    """Whether the id is one of the 133 COCO panoptic categories."""
    return int(category_id) in _by_id()


def isthing(category_id: int) -> bool:
    """Thing (id <= 90) or stuff (id > 90); the rule holds for all 133 known categories."""
    return int(category_id) <= THING_MAX_ID


def category_name(category_id: int) -> str:
    """The category's name, or "unknown-<id>" for an id outside the 133."""
    c = _by_id().get(int(category_id))
    return c["name"] if c is not None else f"unknown-{int(category_id)}"


def color(category_id: int) -> tuple[int, int, int]:
    """The category's COCO display colour; a fixed colour derived from the id for unknown ids."""
    c = _by_id().get(int(category_id))
    if c is not None:
        return tuple(int(v) for v in c["color"])
    h = (int(category_id) * 2654435761) & 0xFFFFFF  # Knuth's multiplicative hash: stable, spread out
    return (h & 0xFF, (h >> 8) & 0xFF, (h >> 16) & 0xFF)
