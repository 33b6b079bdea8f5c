"""Label maps: which class index of a model is which category, and whether it is a thing or stuff.

DETR's class index *is* the category id: a head with C + 1 outputs predicts ids 0..C-1 and "no
object" (index C). A label map names some of those ids, COCO-panoptic style:

    [{"id": 1, "name": "person", "isthing": 1, "color": [220, 20, 60], "supercategory": "person"}, ...]

(`color` and `supercategory` optional), given as such a list or as a COCO panoptic JSON file
holding one under "categories". The default is the 133 COCO panoptic categories
(worker/panoptic_coco_categories.json).

Thing or stuff comes from the map. A model may still predict an id the map lacks (a random
model predicts any): it is named "unknown-<id>" and counts as a thing when it is at most the
map's largest thing id, as stuff above it — for COCO (things 1..90, stuff 92..200) that is the
rule the official checkpoints were trained with, derived here from the map itself.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

__all__ = ["Category", "LabelMap", "LabelMapError", "coco_label_map", "job_label_map", "DETR_PANOPTIC_CLASSES"]

# DETR's panoptic training sets num_classes = 250 whatever the dataset ("large enough to hold the
# largest id + 1"), so its heads have 251 outputs; a head built from a dataset has max id + 2.
DETR_PANOPTIC_CLASSES = 250


class LabelMapError(ValueError):
    """A label map that cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    isthing: bool
    color: tuple[int, int, int] | None = None
    supercategory: str | None = None


def _unknown_color(category_id: int) -> tuple[int, int, int]:
    h = (int(category_id) * 2654435761) & 0xFFFFFF  # Knuth's multiplicative hash: stable, spread out
    return (h & 0xFF, (h >> 8) & 0xFF, (h >> 16) & 0xFF)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_category(entry, position: int, source: str) -> tuple[Category, dict]:
    where = f"{source}: category #{position + 1}"
    if not isinstance(entry, Mapping):
        raise LabelMapError(f"{where} is a {type(entry).__name__}, not an object with id, name and isthing")
    missing = [key for key in ("id", "name", "isthing") if key not in entry]
    if missing:
        raise LabelMapError(f"{where} has no {', '.join(missing)} (every category needs id, name and isthing)")
    category_id, name, isthing = entry["id"], entry["name"], entry["isthing"]
    if not _is_int(category_id) or category_id < 0:
        raise LabelMapError(f"{where}: id must be a non-negative integer, not {category_id!r:.40}")
    where = f"{source}: category id {category_id}"
    if not isinstance(name, str) or not name.strip():
        raise LabelMapError(f"{where}: name must be a non-empty string, not {name!r:.40}")
    if isthing not in (0, 1) or not isinstance(isthing, int):          # 0, 1, true or false
        raise LabelMapError(f"{where}: isthing must be 0, 1, true or false, not {isthing!r:.40}")
    color = entry.get("color")
    if color is not None:
        if (not isinstance(color, Sequence) or isinstance(color, str) or len(color) != 3
                or not all(_is_int(v) and 0 <= v <= 255 for v in color)):
            raise LabelMapError(f"{where}: color must be [r, g, b] with integers 0..255, not {color!r:.40}")
        color = tuple(color)
    supercategory = entry.get("supercategory")
    if supercategory is not None and not isinstance(supercategory, str):
        raise LabelMapError(f"{where}: supercategory must be a string, not {supercategory!r:.40}")
    category = Category(category_id, name, bool(isthing), color, supercategory)
    as_coco = {**entry, "isthing": int(bool(isthing))}
    if color is not None:
        as_coco["color"] = list(color)
    return category, as_coco


class LabelMap:
    """A validated label map. Build it with `from_categories`, `load` or `coco_label_map()`."""

    def __init__(self, categories: Sequence[Category], coco_entries: Sequence[dict], source: str):
        self.source = source
        self._categories = tuple(categories)
        self._entries = tuple(coco_entries)
        self._by_id = {c.id: c for c in self._categories}
        things = [c.id for c in self._categories if c.isthing]
        self._max_thing_id = max(things) if things else -1
        self.max_id = max(self._by_id)

    # ---------------------------------------------------------------------------------- building

    @classmethod
    def from_categories(cls, categories, source: str = "label map") -> LabelMap:
        """From a COCO panoptic `categories` list, or a COCO panoptic document holding one."""
        if isinstance(categories, Mapping):
            if "categories" not in categories:
                raise LabelMapError(f"{source}: a JSON object without \"categories\" (expected a list of "
                                    f"categories or a COCO panoptic file)")
            categories = categories["categories"]
        if not isinstance(categories, list):
            raise LabelMapError(f"{source}: categories must be a list, not {type(categories).__name__}")
        if not categories:
            raise LabelMapError(f"{source}: the category list is empty")
        parsed = [_parse_category(entry, i, source) for i, entry in enumerate(categories)]
        seen: set[int] = set()
        for category, _ in parsed:
            if category.id in seen:
                raise LabelMapError(f"{source}: category id {category.id} appears more than once")
            seen.add(category.id)
        return cls([c for c, _ in parsed], [e for _, e in parsed], source)

    @classmethod
    def load(cls, path: str | Path) -> LabelMap:
        """From a JSON file (a categories list or a COCO panoptic file)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise LabelMapError(f"cannot read label map {path}: {exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LabelMapError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_categories(data, str(path))

    # ---------------------------------------------------------------------------------- queries

    @property
    def categories(self) -> tuple[Category, ...]:
        return self._categories

    def as_coco(self) -> list[dict]:
        """The categories as a COCO panoptic `categories` list (isthing as 0/1), in file order."""
        return [dict(entry) for entry in self._entries]

    def __len__(self) -> int:
        return len(self._categories)

    # Maps are equal when they name the same ids alike (their SHA-256), wherever they were read.
    def __eq__(self, other) -> bool:
        return isinstance(other, LabelMap) and other.sha256 == self.sha256

    def __hash__(self) -> int:
        return hash(self.sha256)

    @property
    def is_coco(self) -> bool:
        """Whether this is the default map, the 133 COCO panoptic categories."""
        return self == coco_label_map()

    def is_known(self, category_id: int) -> bool:
        return int(category_id) in self._by_id

    def isthing(self, category_id: int) -> bool:
        """The map's flag; for an id it lacks, whether the id is at most its largest thing id."""
        c = self._by_id.get(int(category_id))
        return c.isthing if c is not None else int(category_id) <= self._max_thing_id

    def name(self, category_id: int) -> str:
        c = self._by_id.get(int(category_id))
        return c.name if c is not None else f"unknown-{int(category_id)}"

    def color(self, category_id: int) -> tuple[int, int, int]:
        """The category's colour; a fixed colour derived from the id where the map gives none."""
        c = self._by_id.get(int(category_id))
        if c is not None and c.color is not None:
            return c.color
        return _unknown_color(category_id)

    @functools.cached_property
    def sha256(self) -> str:
        """SHA-256 of a canonical JSON form (sorted by id; id, name, isthing as 0/1, color and
        supercategory where given; sorted keys, no spaces, UTF-8): equal maps hash alike
        whatever their key order, whitespace or file layout, and other keys do not count."""
        canonical = []
        for c in sorted(self._categories, key=lambda c: c.id):
            entry = {"id": c.id, "name": c.name, "isthing": int(c.isthing)}
            if c.color is not None:
                entry["color"] = list(c.color)
            if c.supercategory is not None:
                entry["supercategory"] = c.supercategory
            canonical.append(entry)
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def check_head(self, num_classes: int, weights: str = "the weights") -> None:
        """Refuse a class head (num_classes ids + "no object") that does not fit this map.

        DETR builds its head from a dataset with num_classes = largest id + 1; its panoptic
        training uses 250 whatever the dataset (the official checkpoints). A map naming an id the
        head cannot produce, or a head producing ids above the map's largest (trained on another
        dataset), is refused."""
        if self.max_id >= num_classes:
            raise LabelMapError(
                f"{weights} predict category ids 0..{num_classes - 1}, but the label map {self.source} "
                f"names id {self.max_id}: the weights were not trained with these categories"
                + ("" if self.source != COCO_SOURCE else ": give the model's own categories (--categories FILE)"))
        if num_classes != self.max_id + 1 and num_classes != DETR_PANOPTIC_CLASSES:
            raise LabelMapError(
                f"{weights} predict category ids 0..{num_classes - 1}, but the label map {self.source} ends at "
                f"id {self.max_id} (a head trained on it has {self.max_id + 2} outputs, or 251 with DETR's "
                f"panoptic default): give the model's own categories (--categories FILE)")


COCO_SOURCE = "COCO panoptic (default)"


@functools.cache
def coco_label_map() -> LabelMap:
    """The 133 COCO panoptic categories: the default label map."""
    text = resources.files(__package__).joinpath("panoptic_coco_categories.json").read_text(encoding="utf-8")
    return LabelMap.from_categories(json.loads(text), COCO_SOURCE)


_stored_maps: dict[str, LabelMap] = {}      # by SHA-256: a stored map never changes


def job_label_map(store, job) -> LabelMap:
    """The label map a job was recorded with: the one stored with it (storage.jobs.label_maps), or
    COCO's for a job without one (recorded with the default, or before label maps were stored)."""
    sha256 = getattr(job, "label_map_sha256", None)
    if sha256 is None:
        return coco_label_map()
    if sha256 not in _stored_maps:
        categories = store.label_map_categories(sha256)
        if categories is None:          # the foreign key makes this a broken database, not a user's mistake
            raise LabelMapError(f"job {job.id}: its label map {sha256} is missing from the database")
        _stored_maps[sha256] = LabelMap.from_categories(categories, f"the job's label map (SHA-256 {sha256[:12]}…)")
    return _stored_maps[sha256]
