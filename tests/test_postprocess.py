"""worker.postprocess: reference vectors, exactness of the resampling, properties, batching."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bench.postprocess_bench import plain_postprocess
from tests.paths import TEST_DATA
from tests.synthetic_outputs import (NO_OBJECT, batch_outputs, single_outputs, smooth_field, stuff_ids,
                                     synthetic_batch, synthetic_image, thing_ids)
from worker.model import kept_queries
from worker.output import decode_id_png
from worker.postprocess import (MIN_AREA, bilinear_resize_exact, panoptic_postprocess, pil_nearest_indices,
                                postprocess_kept)

VECTORS = TEST_DATA / "postprocess-vectors"

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def check_result(result: dict, target: tuple[int, int]) -> None:
    """Invariants of one image's result."""
    id_map, segments = result["id_map"], result["segments_info"]
    assert id_map.dtype == np.int32 and id_map.shape == tuple(target)
    assert np.array_equal(decode_id_png(result["png"]), id_map)
    assert [s["id"] for s in segments] == list(range(1, len(segments) + 1))   # contiguous from 1
    present = set(np.unique(id_map).tolist()) - {0}
    assert present == {s["id"] for s in segments}
    if segments:
        assert (id_map != 0).all()             # VOID only when nothing was kept
    assert sum(s["area"] for s in segments) == int((id_map != 0).sum())
    stuff = [s["category_id"] for s in segments if not s["isthing"]]
    assert len(stuff) == len(set(stuff))       # a stuff class at most once
    for s in segments:
        assert set(s) == {"id", "category_id", "category_name", "isthing", "area", "bbox", "score", "iscrowd"}
        mask = id_map == s["id"]
        assert s["area"] == int(mask.sum()) > MIN_AREA
        ys, xs = np.nonzero(mask)
        assert s["bbox"] == [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
        assert all(type(v) is int for v in s["bbox"]) and type(s["area"]) is int
        assert s["isthing"] is (s["category_id"] <= 90)
        assert isinstance(s["score"], float) and 0.85 < s["score"] <= 1.0
        assert s["iscrowd"] == 0


def same_results(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert np.array_equal(x["id_map"], y["id_map"])
        assert x["segments_info"] == y["segments_info"]


# --------------------------------------------------------------------------------------------
# reference vectors (DETR's reference postprocessor)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", range(8))
def test_reference_vectors(case):
    data = np.load(VECTORS / f"case{case:02d}.npz")
    meta = json.loads((VECTORS / f"case{case:02d}.json").read_text())
    outputs = {k: torch.from_numpy(data[k].astype(np.float32)) for k in ("pred_logits", "pred_boxes", "pred_masks")}
    h, w = (int(v) for v in data["processed_size"])
    assert data["pred_masks"].shape[-2:] == (math.ceil(h / 4), math.ceil(w / 4))
    result = panoptic_postprocess(outputs, [(h, w)], [tuple(int(v) for v in data["target_size"])],
                                  threshold=meta["threshold"])[0]
    check_result(result, tuple(data["target_size"]))
    ref, ours = data["reference_id_map"], result["id_map"]
    ref_segments = {s["id"]: s for s in meta["reference_segments_info"]}
    if not ref_segments:
        assert (ours == 0).all() and result["segments_info"] == []
        return
    # same partition up to renumbering: the (reference id, our id) pairs form a bijection
    pairs = np.unique(np.stack([ref.ravel(), ours.ravel()], 1), axis=0)
    assert len(set(pairs[:, 0])) == len(pairs) == len(set(pairs[:, 1]))
    assert set(pairs[:, 0].tolist()) == set(ref_segments)           # reference id 0 is a real segment
    ours_by_id = {s["id"]: s for s in result["segments_info"]}
    assert len(ours_by_id) == len(ref_segments)
    for r, o in pairs.tolist():
        assert ours_by_id[o]["category_id"] == ref_segments[r]["category_id"]
        assert ours_by_id[o]["area"] == ref_segments[r]["area"]
        assert ours_by_id[o]["isthing"] == ref_segments[r]["isthing"]


# --------------------------------------------------------------------------------------------
# resampling
# --------------------------------------------------------------------------------------------

def test_pil_nearest_indices_match_pillow():
    rng = np.random.default_rng(0)
    pairs = [(200, 300), (300, 200), (1, 1), (1, 7), (7, 1), (1066, 640), (800, 480)]
    pairs += [tuple(int(v) for v in rng.integers(1, 1500, 2)) for _ in range(3000)]
    for n_in, n_out in pairs:
        row = Image.fromarray(np.arange(n_in, dtype=np.int32)[None, :])          # mode "I"
        got = np.asarray(row.resize((n_out, 1), Image.NEAREST))[0]
        assert np.array_equal(pil_nearest_indices(n_in, n_out), got), (n_in, n_out)
    # the vertical axis follows the same rule
    col = Image.fromarray(np.arange(1066, dtype=np.int32)[:, None])
    assert np.array_equal(np.asarray(col.resize((1, 333), Image.NEAREST))[:, 0], pil_nearest_indices(1066, 333))
    # the closed form (k + 0.5)·in/out is not PIL's rule
    closed = ((np.arange(300) + 0.5) * 200 / 300).astype(np.int64)
    assert not np.array_equal(closed, pil_nearest_indices(200, 300))


@pytest.mark.parametrize("src,dst", [((25, 25), (100, 100)), ((200, 267), (800, 1066)), ((67, 50), (266, 200)),
                                     ((30, 17), (30, 120)), ((13, 80), (50, 80)), ((50, 75), (199, 301)),
                                     ((1, 40), (3, 160)), ((38, 50), (150, 200)), ((40, 30), (100, 29)),
                                     ((16, 17), (64, 65))])
def test_bilinear_emulation_is_bit_exact(src, dst):
    # (outputs with h + w <= 128 go through another CPU kernel; the postprocessor calls F.interpolate there)
    assert sum(dst) > 128
    x = torch.randn(5, *src, generator=torch.Generator().manual_seed(sum(src) + sum(dst))) * 15
    ref = F.interpolate(x[:, None], size=dst, mode="bilinear", align_corners=False)[:, 0]
    assert torch.equal(bilinear_resize_exact(x, dst), ref)


# --------------------------------------------------------------------------------------------
# properties on synthetic outputs
# --------------------------------------------------------------------------------------------

sizes = st.tuples(st.integers(4, 140), st.integers(4, 140))
targets = st.tuples(st.integers(1, 120), st.integers(1, 120))


@SETTINGS
@given(seed=st.integers(0, 2 ** 32 - 1), processed=sizes, target=targets, n_kept=st.integers(0, 12),
       dup=st.integers(0, 3), unknown=st.integers(0, 2))
def test_properties_and_plain_equivalence(seed, processed, target, n_kept, dup, unknown):
    image = synthetic_image(np.random.default_rng(seed), processed, n_kept, duplicate_stuff=dup,
                            unknown_ids=min(unknown, n_kept))
    outputs = single_outputs(image)
    assert kept_queries(outputs["pred_logits"], 0.85)[0].nonzero().flatten().tolist() == image.kept
    result = panoptic_postprocess(outputs, [processed], [target])
    check_result(result[0], target)
    # the plain per-segment implementation gives exactly the same result
    same_results(result, plain_postprocess(outputs, [processed], [target]))


@SETTINGS
@given(seed=st.integers(0, 2 ** 32 - 1), shapes=st.lists(st.tuples(sizes, targets), min_size=2, max_size=3),
       garbage=st.booleans())
def test_padded_batch_equals_single_images(seed, shapes, garbage):
    rng = np.random.default_rng(seed)
    images = [synthetic_image(rng, p, int(rng.integers(0, 10)), duplicate_stuff=int(rng.integers(0, 2)))
              for p, _ in shapes]
    processed, target = [p for p, _ in shapes], [t for _, t in shapes]
    batch = panoptic_postprocess(batch_outputs(images, pad_value=None if garbage else 0.0, rng=rng), processed, target)
    singles = [panoptic_postprocess(single_outputs(im), [p], [t])[0] for im, p, t in zip(images, processed, target)]
    same_results(batch, singles)
    for a, b in zip(batch, singles):
        assert a["png"] == b["png"]


def test_kept_path_equals_full_path():
    outputs, images = synthetic_batch(7, [(120, 160), (96, 200), (64, 64)], [8, 0, 5], duplicate_stuff=1)
    sizes, targets = [(120, 160), (96, 200), (64, 64)], [(90, 120), (48, 100), (128, 128)]
    keep = kept_queries(outputs["pred_logits"], 0.85)
    kept = {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"], "keep": keep,
            "kept_masks": outputs["pred_masks"][keep]}
    full = panoptic_postprocess(outputs, sizes, targets)
    same_results(postprocess_kept(kept, sizes, targets), full)
    assert full[1]["segments_info"] == [] and (full[1]["id_map"] == 0).all()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2 ** 32 - 1), processed=st.tuples(st.integers(150, 420), st.integers(150, 420)),
       target=st.tuples(st.integers(30, 500), st.integers(30, 500)), n_kept=st.integers(5, 25))
def test_medium_sizes_match_plain(seed, processed, target, n_kept):
    image = synthetic_image(np.random.default_rng(seed), processed, n_kept, duplicate_stuff=2)
    outputs = single_outputs(image)
    result = panoptic_postprocess(outputs, [processed], [target])
    check_result(result[0], target)
    same_results(result, plain_postprocess(outputs, [processed], [target]))


def test_realistic_size_matches_plain():
    outputs, _ = synthetic_batch(3, [(800, 1066)], [24], duplicate_stuff=2)
    same_results(panoptic_postprocess(outputs, [(800, 1066)], [(480, 640)]),
                 plain_postprocess(outputs, [(800, 1066)], [(480, 640)]))


def _contested_everywhere(seed: int = 5, k: int = 12, processed=(800, 1066)) -> dict[str, torch.Tensor]:
    """Kept masks that differ by noise only, so that no cell has a clear winner (what an untrained
    or badly calibrated model gives); one query sits 4 sigma below the others and wins only a few
    pixels, which are dropped and reassigned."""
    rng = np.random.default_rng(seed)
    h4, w4 = math.ceil(processed[0] / 4), math.ceil(processed[1] / 4)
    base = smooth_field(rng, h4, w4).astype(np.float32)
    masks = base + rng.normal(0.0, 0.01, (k, h4, w4)).astype(np.float32)
    masks[-1] -= 0.04
    cats = thing_ids()[:k // 2] + stuff_ids()[:2] * (k // 4) + stuff_ids()[2:2 + k - k // 2 - 2 * (k // 4)]
    return _outputs(dict(enumerate(cats)), masks)


@pytest.mark.parametrize("upsample_whole", [True, False])
def test_contested_masks_match_plain(upsample_whole, monkeypatch):
    """Both ways of taking the argmax (upsampling whole masks, or pixel by pixel in contested
    cells) give the plain implementation's result when every cell is contested."""
    import worker.postprocess as pp
    calls = []
    original = pp._QueryArgmax._upsampled_argmax
    monkeypatch.setattr(pp._QueryArgmax, "_upsampled_argmax", lambda self: calls.append(1) or original(self))
    monkeypatch.setattr(pp, "_DENSE_FRACTION", 0.25 if upsample_whole else 2.0)
    outputs = _contested_everywhere()
    ours = panoptic_postprocess(outputs, [(800, 1066)], [(480, 640)])
    check_result(ours[0], (480, 640))
    same_results(ours, plain_postprocess(outputs, [(800, 1066)], [(480, 640)]))
    assert bool(calls) is upsample_whole


# --------------------------------------------------------------------------------------------
# hand-made cases
# --------------------------------------------------------------------------------------------

def _outputs(classes: dict[int, int], masks: np.ndarray, confidence: dict[int, float] | None = None):
    """100 queries; `classes` maps query → class index (kept); the others predict no object."""
    q = 100
    logits = np.zeros((1, q, NO_OBJECT + 1), np.float32)
    logits[0, :, NO_OBJECT] = 10.0
    for qi, cat in classes.items():
        logits[0, qi, NO_OBJECT] = 0.0
        logits[0, qi, cat] = (confidence or {}).get(qi, 12.0)
    full = np.full((1, q, *masks.shape[1:]), -100.0, np.float32)
    full[0, :masks.shape[0]] = masks
    return {"pred_logits": torch.from_numpy(logits), "pred_boxes": torch.zeros(1, q, 4),
            "pred_masks": torch.from_numpy(full)}


def _thirds(h4: int, w4: int) -> np.ndarray:
    """Three queries owning the left, middle and right thirds (smooth ramps)."""
    x = np.arange(w4, dtype=np.float32)[None, :].repeat(h4, 0)
    centres = [w4 / 6, w4 / 2, 5 * w4 / 6]
    return np.stack([-np.abs(x - c) for c in centres])


@pytest.mark.parametrize("processed", [(60, 60), (100, 150)])   # F.interpolate path and emulated path
def test_stuff_queries_of_one_class_merge(processed):
    h4, w4 = math.ceil(processed[0] / 4), math.ceil(processed[1] / 4)
    masks = _thirds(h4, w4)
    merged = panoptic_postprocess(_outputs({0: 1, 1: 184, 2: 184}, masks, {1: 9.0, 2: 12.0}), [processed], [processed])[0]
    apart = panoptic_postprocess(_outputs({0: 1, 1: 184, 2: 187}, masks, {1: 9.0, 2: 12.0}), [processed], [processed])[0]
    check_result(merged, processed)
    assert len(apart["segments_info"]) == 3 and len(merged["segments_info"]) == 2
    person, stuff = merged["segments_info"]
    assert person["category_id"] == 1 and stuff["category_id"] == 184 and not stuff["isthing"]
    assert stuff["area"] == apart["segments_info"][1]["area"] + apart["segments_info"][2]["area"]
    assert np.array_equal(merged["id_map"] == 2, apart["id_map"] >= 2)       # the union of both
    scores = _outputs({0: 1, 1: 184, 2: 184}, masks, {1: 9.0, 2: 12.0})["pred_logits"][0].softmax(-1).amax(-1)
    assert stuff["score"] == float(scores[2]) == float(scores[1:3].max()) > float(scores[1])


@pytest.mark.parametrize("processed", [(40, 40), (100, 100)])
def test_small_segment_is_dropped_and_its_pixels_reassigned(processed):
    h4, w4 = math.ceil(processed[0] / 4), math.ceil(processed[1] / 4)
    masks = _thirds(h4, w4)[:2]
    spike = masks.max(0, keepdims=True) - 5.0
    spike[0, h4 // 2, w4 // 4] += 40.0                      # wins a few pixels around one mask pixel
    masks = np.concatenate([masks, spike])
    with_spike = _outputs({0: 1, 1: 3, 2: 5}, masks)
    without = _outputs({0: 1, 1: 3}, masks)
    big = panoptic_postprocess(with_spike, [processed], [processed])[0]
    assert [s["category_id"] for s in big["segments_info"]] == [1, 3, 5]    # present at full size
    target = (processed[0] // 5, processed[1] // 5)
    small = panoptic_postprocess(with_spike, [processed], [target])[0]
    check_result(small, target)
    assert [s["category_id"] for s in small["segments_info"]] == [1, 3]
    same_results([small], panoptic_postprocess(without, [processed], [target]))


def test_no_kept_query_gives_all_void():
    outputs = _outputs({}, np.zeros((1, 30, 40), np.float32))
    result = panoptic_postprocess(outputs, [(120, 160)], [(45, 61)])[0]
    assert result["segments_info"] == []
    assert result["id_map"].shape == (45, 61) and (result["id_map"] == 0).all()
    assert (decode_id_png(result["png"]) == 0).all()


def test_every_segment_too_small_gives_all_void():
    image = synthetic_image(np.random.default_rng(5), (150, 200), 6)
    result = panoptic_postprocess(single_outputs(image), [(150, 200)], [(2, 2)])[0]
    assert result["segments_info"] == [] and (result["id_map"] == 0).all()


def test_unknown_class_index_is_reported():
    masks = _thirds(25, 30)
    result = panoptic_postprocess(_outputs({0: 12, 1: 240, 2: 1}, masks), [(100, 120)], [(100, 120)])[0]
    by_cat = {s["category_id"]: s for s in result["segments_info"]}
    assert by_cat[12]["category_name"] == "unknown-12" and by_cat[12]["isthing"] is True
    assert by_cat[240]["category_name"] == "unknown-240" and by_cat[240]["isthing"] is False
    assert by_cat[1]["category_name"] == "person"


def test_half_precision_masks_are_accepted():
    outputs, _ = synthetic_batch(11, [(100, 140)], [6])
    half = dict(outputs, pred_masks=outputs["pred_masks"].half())
    as_float = dict(outputs, pred_masks=outputs["pred_masks"].half().float())
    same_results(panoptic_postprocess(half, [(100, 140)], [(75, 105)]),
                 panoptic_postprocess(as_float, [(100, 140)], [(75, 105)]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    sizes, targets = [(800, 1066), (600, 800), (200, 266)], [(480, 640), (1200, 1600), (120, 160)]
    outputs, _ = synthetic_batch(21, sizes, [25, 12, 8], duplicate_stuff=2)
    cpu = panoptic_postprocess(outputs, sizes, targets)
    gpu = panoptic_postprocess({k: v.cuda() for k, v in outputs.items()}, sizes, targets)
    contested = _contested_everywhere()          # upsampled whole on the CPU, pixel by pixel on CUDA
    cpu += panoptic_postprocess(contested, [(800, 1066)], [(480, 640)])
    gpu += panoptic_postprocess({k: v.cuda() for k, v in contested.items()}, [(800, 1066)], [(480, 640)])
    for a, b in zip(cpu, gpu):
        assert np.array_equal(a["id_map"], b["id_map"])
        assert [(s["id"], s["category_id"], s["area"], s["bbox"]) for s in a["segments_info"]] == \
               [(s["id"], s["category_id"], s["area"], s["bbox"]) for s in b["segments_info"]]
