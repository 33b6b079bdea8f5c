"""The output format: COCO panoptic PNG (checked with panopticapi), JSON document, categories."""

from __future__ import annotations

import base64
import html
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from panopticapi.evaluation import pq_compute
from panopticapi.utils import id2rgb, rgb2id
from PIL import Image

from tests.paths import COCO_GT
from tests.synthetic_outputs import synthetic_batch
from worker import categories
from worker import output
from worker.output import decode_id_png, encode_id_png, id_to_rgb, result_document, rgb_to_id
from worker.postprocess import panoptic_postprocess

PANOPTIC_MAPS = sorted(COCO_GT.glob("*.png"))


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


@pytest.mark.parametrize("layout", ["int64", "uint32", "uint16", "uint8", "big-endian int32",
                                    "transposed", "every other column"])
def test_png_round_trip_for_any_integer_array(layout):
    rng = np.random.default_rng(7)
    base = rng.integers(0, 256 ** 3, (37, 53)).astype(np.int64)
    base[:, :20] = 5                                                # flat runs as well as noise
    arrays = {
        "int64": base,
        "uint32": base.astype(np.uint32),
        "uint16": (base % 65_536).astype(np.uint16),
        "uint8": (base % 256).astype(np.uint8),
        "big-endian int32": base.astype(">i4"),
        "transposed": base.astype(np.int32).T,
        "every other column": base.astype(np.int32)[:, ::2],
    }
    id_map = arrays[layout]
    assert np.array_equal(decode_id_png(encode_id_png(id_map)), id_map.astype(np.int64))


def _pillow_default_png(id_map: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(id2rgb(id_map.astype(np.int64)).astype(np.uint8), "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def _coco_id_map(path: Path) -> np.ndarray:
    return rgb2id(np.asarray(Image.open(path), dtype=np.uint32)).astype(np.int32)


@pytest.mark.parametrize("path", PANOPTIC_MAPS, ids=lambda p: p.name)
def test_png_of_coco_map_is_no_larger_than_pillows_and_lossless(path):
    id_map = _coco_id_map(path)
    png = encode_id_png(id_map)
    assert len(png) <= len(_pillow_default_png(id_map)), f"{output.PNG_DEFLATE}: larger than Pillow's"
    with Image.open(io.BytesIO(png)) as im:
        assert (im.format, im.mode) == ("PNG", "RGB")
        assert np.array_equal(rgb2id(np.asarray(im)), id_map)      # panopticapi reads the ids back


# Draws each PNG (a data: URL, which leaves the canvas readable) into a canvas and writes what the
# browser decoded into the DOM, which --dump-dom prints: size, opaque or not, and a checksum.
BROWSER_PROBE = """<!doctype html><body><pre id="probe"></pre><script>
const pngs = %s;
Promise.all(pngs.map((src) => new Promise((resolve) => {
  const im = new Image();
  im.onload = () => {
    const canvas = document.createElement("canvas");
    canvas.width = im.naturalWidth; canvas.height = im.naturalHeight;
    const context = canvas.getContext("2d");
    context.drawImage(im, 0, 0);
    const rgba = context.getImageData(0, 0, canvas.width, canvas.height).data;
    let checksum = 0, opaque = true;
    for (let p = 0, i = 0; p < rgba.length; p += 4) {
      for (let c = 0; c < 3; c++, i++) checksum += rgba[p + c] * (i %% 65521 + 1);
      opaque = opaque && rgba[p + 3] === 255;
    }
    resolve([canvas.width, canvas.height, opaque, checksum]);
  };
  im.onerror = () => resolve("undecodable");
  im.src = src;
}))).then((seen) => { document.getElementById("probe").textContent = JSON.stringify(seen); });
</script></body>"""


def _rgb_checksum(id_map: np.ndarray) -> int:
    values = id_to_rgb(id_map).reshape(-1).astype(np.int64)
    return int((values * (np.arange(values.size) % 65_521 + 1)).sum())


def test_png_decodes_to_the_same_pixels_in_headless_chromium(tmp_path):
    from tests.test_report import headless
    outputs, _ = synthetic_batch(5, [(800, 1066)], [30])
    id_maps = [_coco_id_map(path) for path in PANOPTIC_MAPS]
    id_maps.append(panoptic_postprocess(outputs, [(800, 1066)], [(480, 640)])[0]["id_map"])
    sources = ["data:image/png;base64," + base64.b64encode(encode_id_png(m)).decode() for m in id_maps]
    page = tmp_path / "pngs.html"
    page.write_text(BROWSER_PROBE % json.dumps(sources), encoding="utf-8")
    dump = headless(["--virtual-time-budget=10000", "--dump-dom", page.as_uri()], tmp_path / "profile")
    assert dump.returncode == 0, dump.stderr[-3000:]
    found = re.search(r'<pre id="probe">(.+?)</pre>', dump.stdout, re.S)
    assert found, f"the page did not finish: {dump.stdout[-2000:]} {dump.stderr[-2000:]}"
    expected = [[m.shape[1], m.shape[0], True, _rgb_checksum(m)] for m in id_maps]
    assert json.loads(html.unescape(found.group(1))) == expected


def test_png_deflates_with_zlib_ng_when_it_is_installed():
    # zlib-ng is a runtime dependency (pyproject.toml); the zlib fallback is for installs without it.
    expected = "zlib-ng" if importlib.util.find_spec("zlib_ng") else "zlib"
    assert output.PNG_DEFLATE == expected


def test_png_without_zlib_ng_falls_back_to_zlib_with_no_more_bytes_than_pillow():
    # A fresh interpreter in which `import zlib_ng` fails, as in an install without the dependency.
    script = """
import sys
sys.modules["zlib_ng"] = None
import numpy as np
from tests.test_output_format import PANOPTIC_MAPS, _coco_id_map, _pillow_default_png
from worker import output
assert output.PNG_DEFLATE == "zlib", output.PNG_DEFLATE
for path in PANOPTIC_MAPS:
    id_map = _coco_id_map(path)
    png = output.encode_id_png(id_map)
    assert np.array_equal(output.decode_id_png(png), id_map), path.name
    assert len(png) <= len(_pillow_default_png(id_map)), path.name
print("ok", len(PANOPTIC_MAPS))
"""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", str(len(PANOPTIC_MAPS))]


def test_png_encoding_lets_other_threads_run():
    # While a thread encodes a large map, this thread keeps running. A GIL held through the deflate
    # (80–95% of the encode on this map) would stop it for at least that long; the threshold
    # (a quarter of the encode) leaves room for the OS descheduling us on a busy machine, and
    # three tries for a noisy one.
    id_map = np.random.default_rng(3).integers(0, 256, (1200, 1600), dtype=np.int32)
    start = time.perf_counter()
    encode_id_png(id_map)
    alone = time.perf_counter() - start
    longest_stalls = []
    for _ in range(3):
        encoder = threading.Thread(target=encode_id_png, args=(id_map,))
        longest, last = 0.0, time.perf_counter()
        encoder.start()
        while encoder.is_alive():
            now = time.perf_counter()
            longest, last = max(longest, now - last), now
        encoder.join()
        longest_stalls.append(longest)
        if longest < alone / 4:
            break
    assert min(longest_stalls) < alone / 4, (alone, longest_stalls)


def test_postprocessed_png_reads_back_with_panopticapi():
    outputs, _ = synthetic_batch(4, [(96, 128)], [9])
    result = panoptic_postprocess(outputs, [(96, 128)], [(72, 96)])[0]
    rgb = np.asarray(Image.open(io.BytesIO(result["png"])))
    assert np.array_equal(rgb2id(rgb), result["id_map"])


def test_pq_of_ground_truth_against_its_re_encoding_is_100(tmp_path):
    gt_json = COCO_GT / "panoptic_examples.json"
    gt_folder = COCO_GT
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
