"""worker.labels: label maps from COCO panoptic categories, their validation, hash and head check,
and the postprocessor taking thing/stuff and names from them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.synthetic_outputs import NO_OBJECT
from worker import categories
from worker.labels import LabelMap, LabelMapError, coco_label_map
from worker.postprocess import panoptic_postprocess

TWO = [{"id": 0, "name": "road", "isthing": 0, "color": [128, 64, 128]},
       {"id": 1, "name": "crate", "isthing": 1, "supercategory": "cargo"}]


def test_coco_default_is_the_file_and_the_categories_module_uses_it():
    coco = coco_label_map()
    assert len(coco) == 133 and coco.max_id == 200
    assert [c["id"] for c in categories.categories()] == [c.id for c in coco.categories]
    assert categories.categories() == tuple(coco.as_coco())
    assert sum(c.isthing for c in coco.categories) == 80
    # COCO's own layout, things 1..90 then stuff: ids it lacks follow that split
    assert coco.isthing(12) and not coco.isthing(91) and not coco.isthing(249)
    assert coco.name(184) == "tree-merged" and coco.color(1) == (220, 20, 60)


def test_loads_a_list_or_a_coco_panoptic_file(tmp_path):
    as_list, as_file = tmp_path / "list.json", tmp_path / "panoptic_val.json"
    as_list.write_text(json.dumps(TWO))
    as_file.write_text(json.dumps({"images": [], "annotations": [], "categories": TWO}))
    a, b = LabelMap.load(as_list), LabelMap.load(as_file)
    assert a.sha256 == b.sha256
    assert a.name(1) == "crate" and a.isthing(1) and not a.isthing(0)
    assert a.color(0) == (128, 64, 128)
    assert a.color(1) == a.color(1) and len(a.color(1)) == 3          # no colour given: a fixed one
    assert a.as_coco()[0] == {"id": 0, "name": "road", "isthing": 0, "color": [128, 64, 128]}
    assert a.name(7) == "unknown-7" and not a.is_known(7)


def test_sha256_is_canonical():
    base = LabelMap.from_categories(TWO)
    reordered = LabelMap.from_categories([{"supercategory": "cargo", "isthing": True, "name": "crate", "id": 1},
                                          {"color": [128, 64, 128], "name": "road", "id": 0, "isthing": False,
                                           "frequency": "c"}])
    assert base.sha256 == reordered.sha256 and len(base.sha256) == 64
    renamed = LabelMap.from_categories([dict(TWO[0]), dict(TWO[1], name="box")])
    flipped = LabelMap.from_categories([dict(TWO[0], isthing=1), TWO[1]])
    recoloured = LabelMap.from_categories([dict(TWO[0], color=[0, 0, 0]), TWO[1]])
    assert len({base.sha256, renamed.sha256, flipped.sha256, recoloured.sha256}) == 4
    assert coco_label_map().sha256 != base.sha256


@pytest.mark.parametrize("data, message", [
    ([], "empty"),
    ({"images": []}, 'without "categories"'),
    ("person", "must be a list"),
    ([{"id": 1, "name": "a", "isthing": 1}, {"id": 1, "name": "b", "isthing": 0}], "id 1 appears more than once"),
    ([{"id": 1, "isthing": 1}], "category #1 has no name"),
    ([{"id": 1, "name": "a", "isthing": 1}, {"name": "b"}], "category #2 has no id, isthing"),
    ([{"id": "1", "name": "a", "isthing": 1}], "id must be a non-negative integer"),
    ([{"id": -3, "name": "a", "isthing": 1}], "id must be a non-negative integer"),
    ([{"id": True, "name": "a", "isthing": 1}], "id must be a non-negative integer"),
    ([{"id": 1, "name": "", "isthing": 1}], "name must be a non-empty string"),
    ([{"id": 1, "name": "a", "isthing": "yes"}], "isthing must be 0, 1, true or false"),
    ([{"id": 1, "name": "a", "isthing": 2}], "isthing must be 0, 1, true or false"),
    ([{"id": 1, "name": "a", "isthing": 1, "color": [1, 2]}], "color must be [r, g, b]"),
    ([{"id": 1, "name": "a", "isthing": 1, "color": [1, 2, 300]}], "color must be [r, g, b]"),
    ([{"id": 1, "name": "a", "isthing": 1, "supercategory": 5}], "supercategory must be a string"),
    (["person"], "category #1 is a str"),
])
def test_bad_label_maps_are_refused_with_the_reason(tmp_path, data, message):
    path = tmp_path / "cats.json"
    path.write_text(json.dumps(data))
    with pytest.raises(LabelMapError, match=message.replace("[", r"\[")) as info:
        LabelMap.load(path)
    assert str(path) in str(info.value)


def test_unreadable_files_are_refused(tmp_path):
    with pytest.raises(LabelMapError, match="cannot read label map"):
        LabelMap.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(LabelMapError, match="not valid JSON"):
        LabelMap.load(tmp_path / "bad.json")


def test_head_check():
    twenty = LabelMap.from_categories([{"id": i, "name": f"c{i}", "isthing": int(i < 12)} for i in range(1, 21)])
    twenty.check_head(21)                    # DETR: num_classes = largest id + 1
    twenty.check_head(250)                   # DETR's panoptic default, as the official heads
    with pytest.raises(LabelMapError, match="names id 20"):
        twenty.check_head(20)                # the map names an id the head cannot produce
    with pytest.raises(LabelMapError, match="ends at id 20.*--categories"):
        twenty.check_head(40)                # the head predicts ids above the map's
    coco_label_map().check_head(250)
    with pytest.raises(LabelMapError, match="names id 200.*own categories .--categories FILE"):
        coco_label_map().check_head(21)      # a non-COCO head needs its own label map


def _thirds_outputs(labels_by_query: dict[int, int], num_logits: int):
    """Three queries splitting a 100×120 image into vertical thirds, with the given class ids."""
    import torch
    q = 10
    logits = np.zeros((1, q, num_logits), np.float32)
    logits[0, :, num_logits - 1] = 10.0
    for query, cat in labels_by_query.items():
        logits[0, query] = 0.0
        logits[0, query, cat] = 12.0
    masks = np.full((1, q, 25, 30), -20.0, np.float32)
    for query in labels_by_query:
        masks[0, query, :, query * 10:(query + 1) * 10] = 20.0
    return {"pred_logits": torch.from_numpy(logits), "pred_boxes": torch.zeros((1, q, 4)),
            "pred_masks": torch.from_numpy(masks)}


def test_postprocess_takes_stuff_and_names_from_the_label_map():
    # ids 1 and 2: COCO things (person, bicycle); in this map 1 is stuff, so its two queries merge
    own = LabelMap.from_categories([{"id": 1, "name": "sea", "isthing": 0}, {"id": 2, "name": "boat", "isthing": 1}])
    outputs = _thirds_outputs({0: 1, 1: 1, 2: 2}, num_logits=4)
    ours = panoptic_postprocess(outputs, [(100, 120)], [(100, 120)], label_map=own)[0]["segments_info"]
    assert [(s["category_id"], s["category_name"], s["isthing"], s["area"]) for s in ours] == \
           [(1, "sea", False, 100 * 80), (2, "boat", True, 100 * 40)]
    outputs = _thirds_outputs({0: 1, 1: 1, 2: 2}, num_logits=NO_OBJECT + 1)
    coco = panoptic_postprocess(outputs, [(100, 120)], [(100, 120)])[0]["segments_info"]
    assert [(s["category_id"], s["category_name"], s["isthing"], s["area"]) for s in coco] == \
           [(1, "person", True, 100 * 40), (1, "person", True, 100 * 40), (2, "bicycle", True, 100 * 40)]
