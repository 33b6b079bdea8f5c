"""Overlay rendering (worker/overlay.py): colours, instance shades, borders, labels, sizes."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from worker.categories import color
from worker.output import encode_id_png
from worker.overlay import (DEFAULT_ALPHA, SHADES, label_placements, overlay_from_outputs, overlay_jpeg,
                            render_overlay, segment_colors, shade, write_overlay)

PERSON, CAR, SKY, GRASS = 1, 3, 187, 193
H, W = 240, 320


def scene():
    """Sky over grass, two touching people, a tiny car, a void strip and an id without segment info."""
    yy, xx = np.mgrid[0:H, 0:W]
    ids = np.where(yy < 120, 10, 20).astype(np.int32)                    # sky, grass
    ids[(xx - 100) ** 2 + (yy - 150) ** 2 < 45 ** 2] = 31               # person 1
    ids[(xx - 180) ** 2 + (yy - 150) ** 2 < 45 ** 2] = 32               # person 2, touching person 1
    ids[5:9, 300:304] = 40                                              # a 4×4 car: too small for a label
    ids[:, :6] = 0                                                      # void
    ids[200:, 280:] = 99                                                # not in segments_info
    segments = [dict(id=10, category_id=SKY, category_name="sky-other-merged", isthing=False),
                dict(id=20, category_id=GRASS, category_name="grass-merged", isthing=False),
                dict(id=31, category_id=PERSON, category_name="person", isthing=True),
                dict(id=32, category_id=PERSON, category_name="person", isthing=True),
                dict(id=40, category_id=CAR, category_name="car", isthing=True)]
    return ids, segments


def grey(value=100, h=H, w=W):
    return Image.new("RGB", (w, h), (value, value, value))


def blend(base, rgb, alpha=DEFAULT_ALPHA):
    return np.asarray(base, float) * (1 - alpha) + np.asarray(rgb, float) * alpha


def near(pixel, expected) -> bool:
    """Equal up to rounding."""
    return bool((np.abs(np.asarray(pixel, float) - expected) <= 0.5 + 1e-9).all())


def test_segments_are_filled_in_their_category_colours_and_void_is_left_alone():
    ids, segments = scene()
    out = np.asarray(render_overlay(grey(), ids, segments, borders=False, labels=False)).astype(int)
    assert out.shape == (H, W, 3)
    assert near(out[30, 200], blend([100] * 3, color(SKY)))           # stuff: the category colour
    assert near(out[110 + 100, 60], blend([100] * 3, color(GRASS)))
    assert near(out[150, 100], blend([100] * 3, color(PERSON)))       # first instance: the colour itself
    assert (out[:, :6] == 100).all()                                       # void: the image as it is
    assert (out[210:, 290:] == 100).all()                                  # unknown id: unpainted
    # every pixel of a segment gets the same colour (on a uniform image)
    for segment_id in (10, 20, 31, 32):
        values = out[ids == segment_id]
        assert (values == values[0]).all()


def test_instances_of_one_thing_class_get_different_shades_stuff_does_not():
    colours = segment_colors([dict(id=i, category_id=PERSON, isthing=True) for i in (5, 3, 9, 7)]
                             + [dict(id=i, category_id=SKY, isthing=False) for i in (11, 12)])
    people = [colours[i] for i in (3, 5, 7, 9)]             # shaded in id order
    assert people[0] == color(PERSON)
    assert len(set(people)) == 4
    assert people[1] == shade(color(PERSON), SHADES[1])
    assert colours[11] == colours[12] == color(SKY)
    # distinguishable: adjacent instances differ by a clearly visible amount
    a, b = np.asarray(people[0], float), np.asarray(people[1], float)
    assert np.abs(a - b).sum() > 60
    # unknown ids (a random model predicts any index) get a fixed colour too
    assert segment_colors([dict(id=1, category_id=240)])[1] == color(240)

    ids, segments = scene()
    out = np.asarray(render_overlay(grey(), ids, segments, borders=False, labels=False)).astype(int)
    assert not (out[150, 80] == out[150, 200]).all()        # the two touching people differ


def test_borders_between_segments_and_towards_void():
    ids, segments = scene()
    plain = np.asarray(render_overlay(grey(), ids, segments, borders=False, labels=False)).astype(int)
    bordered = np.asarray(render_overlay(grey(), ids, segments, labels=False)).astype(int)
    changed = (plain != bordered).any(axis=-1)
    assert changed[150, 133:137].any()                      # where the two people touch
    assert changed[119:121, 250].any()                      # sky | grass
    assert changed[60, 6]                                   # segment next to void
    assert not changed[30, 200] and not changed[150, 100]  # interiors untouched
    assert not changed[:, :6].any()                         # void itself is never painted
    assert bordered[119:121, 250].max() > 200              # light borders


def test_labels_name_the_large_segments_at_their_interior_and_skip_tiny_ones():
    ids, segments = scene()
    labels = label_placements(ids, segments)
    by_segment = {label.segment_id: label for label in labels}
    assert set(by_segment) == {10, 20, 31, 32}              # not the 4×4 car
    assert by_segment[31].text == "person" and by_segment[10].text == "sky-other-merged"
    for label in labels:
        x0, y0, x1, y1 = label.box
        assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
        assert y1 - y0 >= 11                                 # readable: Pillow's font at 11 px or more
        assert (ids[y0:y1, x0:x1] == label.segment_id).mean() > 0.6
    # person 1's label sits inside person 1, near its centre
    x0, y0, x1, y1 = by_segment[31].box
    assert abs((x0 + x1) / 2 - 100) < 25 and abs((y0 + y1) / 2 - 150) < 25

    plain = np.asarray(render_overlay(grey(), ids, segments, labels=False)).astype(int)
    labelled = np.asarray(render_overlay(grey(), ids, segments)).astype(int)
    changed = (plain != labelled).any(axis=-1)
    inside = np.zeros_like(changed)
    for label in labels:
        x0, y0, x1, y1 = label.box
        inside[y0:y1, x0:x1] = True
        box = labelled[y0:y1, x0:x1]
        assert (box.min(axis=-1) > 200).sum() >= 20          # white text…
        assert (box.max(axis=-1) < 90).sum() >= 20           # …on a dark box
    assert changed.any() and not (changed & ~inside).any()   # labels change nothing outside their boxes
    assert not changed[4:10, 299:305].any()                  # the tiny car has no label


def test_no_label_that_does_not_fit_the_image():
    ids = np.full((30, 40), 1, np.int32)
    segments = [dict(id=1, category_id=197, category_name="building-other-merged", isthing=False)]
    assert label_placements(ids, segments) == []
    ids = np.full((120, 400), 1, np.int32)
    assert [label.text for label in label_placements(ids, segments)] == ["building-other-merged"]


def test_sizes_image_resized_to_the_map_and_max_side():
    ids, segments = scene()
    out = render_overlay(grey(w=W * 2, h=H * 2), ids, segments)               # a larger image: resized
    assert out.size == (W, H)
    small = render_overlay(grey(), ids, segments, max_side=160, labels=False, borders=False)
    assert small.size == (160, 120)
    assert near(np.asarray(small)[15, 100], blend([100] * 3, color(SKY)))
    assert render_overlay(np.full((H, W, 3), 100, np.uint8), ids, []).size == (W, H)  # no segments at all
    with pytest.raises(ValueError):
        render_overlay(grey(), ids[None], segments)


def test_rendering_is_vectorised_fast_enough():
    import time
    ids, segments = scene()
    big_ids = np.kron(ids, np.ones((6, 6), np.int32))                       # 1920 × 1440
    start = time.perf_counter()
    render_overlay(grey(h=H * 6, w=W * 6), big_ids, segments)
    assert time.perf_counter() - start < 10          # generous: shared CI cores; ~0.5 s on one idle core


def test_overlay_from_outputs_and_jpeg():
    ids, segments = scene()
    source = io.BytesIO()
    grey(120).save(source, "PNG")
    document = {"height": H, "width": W, "segments_info": segments}
    image = overlay_from_outputs(source.getvalue(), encode_id_png(ids), json.dumps(document))
    assert image.size == (W, H)
    assert (np.asarray(image)[30, 200] != 120).any()
    data = overlay_jpeg(grey(), ids, segments)
    with Image.open(io.BytesIO(data)) as jpeg:
        assert jpeg.format == "JPEG" and jpeg.size == (W, H)


def test_write_overlay_reports_failure_instead_of_raising(tmp_path, caplog):
    ids, segments = scene()
    assert write_overlay(str(tmp_path), "a/b", grey(), ids, segments)
    with Image.open(tmp_path / "a" / "b.overlay.jpg") as jpeg:
        assert jpeg.size == (W, H)
    (tmp_path / "c.overlay.jpg").mkdir()                    # the file cannot be written
    assert not write_overlay(str(tmp_path), "c", grey(), ids, segments)
    assert "c.overlay.jpg not written" in caplog.text
