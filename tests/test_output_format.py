"""The output format: COCO panoptic PNG (checked with panopticapi), JSON document, categories."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from panopticapi.evaluation import pq_compute
from panopticapi.utils import id2rgb, rgb2id
from PIL import Image

from tests.synthetic_outputs import synthetic_batch
from worker import categories
from worker.output import decode_id_png, encode_id_png, id_to_rgb, result_document, rgb_to_id
from worker.postprocess import panoptic_postprocess

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
COCO_SAMPLE = SHARED / "data" / "coco-sample"


# --------------------------------------------------------------------------------------------
# PNG
# --------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.int32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=24),
                  elements=st.integers(0, 256 ** 3 - 1)))
def test_png_round_trip_agrees_with_panopticapi(id_map):
    png = encode_id_png(id_map)
    with Image.open(io.BytesIO(png)) as im:
        im.verify()                                                 # chunk CRCs and structure
    with Image.open(io.BytesIO(png)) as im:
        assert im.mode == "RGB" and im.format == "PNG"
        decoded_rgb = np.asarray(im)
    assert np.array_equal(rgb2id(decoded_rgb), id_map)             # panopticapi reads what we wrote
    assert np.array_equal(decode_id_png(png), id_map)
    assert np.array_equal(id_to_rgb(id_map), id2rgb(id_map.astype(np.int64)))
    assert np.array_equal(rgb_to_id(id2rgb(id_map.astype(np.int64))), id_map)
    assert decode_id_png(png).dtype == np.int32


def test_png_rejects_out_of_range_ids():
    with pytest.raises(ValueError):
        encode_id_png(np.array([[256 ** 3]], np.int64))
    with pytest.raises(ValueError):
        encode_id_png(np.array([[-1]], np.int32))
    with pytest.raises(ValueError):
        encode_id_png(np.zeros((0, 4), np.int32))


def test_png_of_flat_segments_is_small():
    # Four segments in quadrants of a 480×640 map: 900 KiB of pixels, a few KiB of PNG.
    id_map = np.zeros((480, 640), np.int32)
    id_map[:240, 320:], id_map[240:, :320], id_map[240:, 320:] = 1 + 256 * 7, 65_536 * 3, 255
    png = encode_id_png(id_map)
    assert len(png) < 8 * 1024
    assert np.array_equal(decode_id_png(png), id_map)


def test_postprocessed_png_reads_back_with_panopticapi():
    outputs, _ = synthetic_batch(4, [(96, 128)], [9])
    result = panoptic_postprocess(outputs, [(96, 128)], [(72, 96)])[0]
    rgb = np.asarray(Image.open(io.BytesIO(result["png"])))
    assert np.array_equal(rgb2id(rgb), result["id_map"])


def test_pq_of_ground_truth_against_its_re_encoding_is_100(tmp_path):
    gt_json = COCO_SAMPLE / "panoptic_examples.json"
    gt_folder = COCO_SAMPLE / "panoptic"
    gt = json.loads(gt_json.read_text())
    pred_folder = tmp_path / "pred"
    pred_folder.mkdir()
    annotations = []
    for ann in gt["annotations"]:
        id_map = rgb2id(np.asarray(Image.open(gt_folder / ann["file_name"]), dtype=np.uint32)).astype(np.int32)
        (pred_folder / ann["file_name"]).write_bytes(encode_id_png(id_map))
        assert np.array_equal(decode_id_png((pred_folder / ann["file_name"]).read_bytes()), id_map)
        segments = []
        for seg in ann["segments_info"]:
            mask = id_map == seg["id"]
            ys, xs = np.nonzero(mask)
            segments.append({"id": seg["id"], "category_id": seg["category_id"], "iscrowd": 0,
                             "area": int(mask.sum()),
                             "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]})
        annotations.append({"image_id": ann["image_id"], "file_name": ann["file_name"], "segments_info": segments})
    pred_json = tmp_path / "pred.json"
    pred_json.write_text(json.dumps({"images": gt["images"], "annotations": annotations,
                                     "categories": gt["categories"]}))
    local_gt = tmp_path / "gt.json"
    shutil.copy(gt_json, local_gt)
    results = pq_compute(str(local_gt), str(pred_json), gt_folder=str(gt_folder), pred_folder=str(pred_folder))
    assert results["All"]["n"] > 0
    assert results["All"]["pq"] == pytest.approx(1.0)
    assert results["All"]["sq"] == pytest.approx(1.0) and results["All"]["rq"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# JSON document
# --------------------------------------------------------------------------------------------

def test_result_document():
    outputs, _ = synthetic_batch(8, [(120, 160)], [7], duplicate_stuff=1)
    result = panoptic_postprocess(outputs, [(120, 160)], [(90, 121)])[0]
    model = {"name": "detr-r101", "weights_sha256": "ab" * 32, "threshold": 0.85}
    doc = result_document(result, "dir/img.png", "s3://bucket/prefix/dir/img.jpg", model)
    assert list(doc) == ["file_name", "image", "height", "width", "segments_info", "model"]
    assert doc["file_name"] == "dir/img.png" and doc["image"] == "s3://bucket/prefix/dir/img.jpg"
    assert (doc["height"], doc["width"]) == (90, 121)
    assert doc["model"] == model
    assert doc["segments_info"] == result["segments_info"] and doc["segments_info"]
    for seg in doc["segments_info"]:
        assert list(seg) == ["id", "category_id", "category_name", "isthing", "area", "bbox", "score", "iscrowd"]
    assert json.loads(json.dumps(doc)) == doc                       # plain JSON types only


def test_result_document_accepts_an_object_and_empty_results():
    class Info:
        name, weights_sha256, threshold = "detr-r50", "00" * 32, 0.7
    empty = {"id_map": np.zeros((3, 4), np.int32), "png": encode_id_png(np.zeros((3, 4), np.int32)),
             "segments_info": []}
    doc = result_document(empty, "a.png", "/data/a.jpg", Info())
    assert doc["segments_info"] == [] and (doc["height"], doc["width"]) == (3, 4)
    assert doc["model"] == {"name": "detr-r50", "weights_sha256": "00" * 32, "threshold": 0.7}


# --------------------------------------------------------------------------------------------
# categories
# --------------------------------------------------------------------------------------------

def test_categories():
    cats = categories.categories()
    assert len(cats) == 133 and len({c["id"] for c in cats}) == 133
    assert all(1 <= c["id"] <= 200 for c in cats)
    assert all(categories.isthing(c["id"]) == bool(c["isthing"]) for c in cats)
    assert sum(categories.isthing(c["id"]) for c in cats) == 80
    assert categories.category_name(1) == "person" and categories.is_known(1)
    assert categories.category_name(12) == "unknown-12" and not categories.is_known(12)
    assert categories.category_name(249) == "unknown-249" and not categories.isthing(249)
    assert categories.color(1) == (220, 20, 60)
    c = categories.color(12)
    assert c == categories.color(12) and len(c) == 3 and all(0 <= v <= 255 for v in c)
    assert categories.categories() is cats                           # loaded once
