"""Coloured panoptic overlays: a source image with its segments painted over it.

Each segment is filled semi-transparently in its category's colour from the label map (the job's;
COCO's by default, ``worker.labels``);
instances of one thing class get different shades of that colour, so that two adjacent people
are told apart. Segment borders are drawn, and each segment large enough to hold one gets a
label with its category name, placed at the segment's most interior point (the pixel farthest
from its border, nearest its centroid among equals).

Everything is vectorised with numpy; Pillow draws only the label texts.

    from worker.overlay import render_overlay, overlay_jpeg
    image = render_overlay(rgb_image, id_map, segments_info)        # PIL RGB image
    data = overlay_jpeg(rgb_image, id_map, segments_info)           # JPEG bytes, at most 2048 px
"""

from __future__ import annotations

import functools
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .labels import LabelMap, coco_label_map
from .output import decode_id_png

log = logging.getLogger(__name__)

# Overlays written by workers (--overlays) and the report's full-size overlays are scaled down to
# at most this many pixels on their longest side: plenty to inspect a result, small to store.
OVERLAY_MAX_SIDE = 2048
DEFAULT_ALPHA = 0.55
JPEG_QUALITY = 85
# Instance k of a thing class is its category colour moved towards white (> 0) or black (< 0) by
# SHADES[k % len(SHADES)]: instance 0 keeps the category colour, neighbours differ clearly.
SHADES = (0.0, 0.45, -0.45, 0.7, -0.25, 0.25, -0.65, 0.85)
# A segment gets a label only if it covers at least this share of the image (and the label fits).
MIN_LABEL_FRACTION = 0.002
# …and at least this share of the label's box lies on the segment.
MIN_LABEL_COVER = 0.6
# The interior point is searched on a copy of the id map at most this many pixels on a side.
_PLACEMENT_SIDE = 256
# Segment ids below this are mapped to colours through a lookup table, larger ones by search.
_LUT_LIMIT = 1 << 20
BORDER_RGB = (255, 255, 255)
BORDER_ALPHA = 0.8
LABEL_BOX_RGBA = (16, 16, 16, 175)
LABEL_TEXT_RGB = (255, 255, 255)


@dataclass(frozen=True)
class Label:
    """A label as drawn: the segment, its text and the box (x0, y0, x1, y1) it occupies."""
    segment_id: int
    text: str
    box: tuple[int, int, int, int]


def shade(rgb: Sequence[int], amount: float) -> tuple[int, int, int]:
    """Move a colour towards white (amount > 0) or black (amount < 0); 0 leaves it alone."""
    c = np.asarray(rgb, dtype=np.float64)
    c = c + (255.0 - c) * amount if amount >= 0 else c * (1.0 + amount)
    return tuple(int(v) for v in np.clip(np.rint(c), 0, 255))


def segment_colors(segments_info: Sequence[Mapping],
                   label_map: LabelMap | None = None) -> dict[int, tuple[int, int, int]]:
    """Segment id → display colour: the category colour (from `label_map`, default COCO's) for
    stuff; for things, the category colour shaded per instance (in segment id order), so
    instances of one class differ."""
    label_map = label_map or coco_label_map()
    colors: dict[int, tuple[int, int, int]] = {}
    seen: dict[int, int] = {}
    for segment in sorted(segments_info, key=lambda s: int(s["id"])):
        if int(segment["id"]) <= 0:        # 0 is void, never a segment
            continue
        category = int(segment["category_id"])
        base = label_map.color(category)
        thing = segment.get("isthing")
        if thing is None:
            thing = label_map.isthing(category)
        if thing:
            k = seen.get(category, 0)
            seen[category] = k + 1
            colors[int(segment["id"])] = shade(base, SHADES[k % len(SHADES)])
        else:
            colors[int(segment["id"])] = base
    return colors


@functools.lru_cache(maxsize=16)
def label_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at `size` pixels (its bitmap font where FreeType is missing)."""
    return ImageFont.load_default(size=size)


def font_size_for(height: int, width: int) -> int:
    """Label text height for an image: about 1/24 of its short side, 11 to 40 pixels."""
    return int(min(40, max(11, round(min(height, width) / 24))))


def _segment_index(id_map: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per pixel: 1 + the position of its id in the sorted array `ids`, or 0 (void or unknown)."""
    if ids.size == 0:
        return np.zeros(id_map.shape, np.int32)
    top = int(ids[-1])
    if 0 <= int(ids[0]) and top < _LUT_LIMIT:       # the usual small ids: one table lookup
        lut = np.zeros(top + 2, np.int32)
        lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
        return lut[np.clip(id_map, 0, top + 1)]
    pos = np.searchsorted(ids, id_map)
    pos = np.minimum(pos, ids.size - 1)
    return np.where(ids[pos] == id_map, pos + 1, 0).astype(np.int32)


def _borders(index: np.ndarray, thickness: int) -> np.ndarray:
    """Pixels on a boundary between two segments, or between a segment and void, `thickness` wide."""
    edge = np.zeros(index.shape, bool)
    horizontal = index[:, 1:] != index[:, :-1]
    vertical = index[1:, :] != index[:-1, :]
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    grown = edge
    for _ in range(max(0, thickness - 1) // 2):   # grow by one pixel on each side per step
        grown = grown.copy()
        grown[1:, :] |= edge[:-1, :]
        grown[:-1, :] |= edge[1:, :]
        grown[:, 1:] |= edge[:, :-1]
        grown[:, :-1] |= edge[:, 1:]
        edge = grown
    # Void next to void is no border; a border between void and a segment is drawn on the segment.
    return edge & (index > 0)


def _interior_points(index: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For segments 1..count of an index map: (x, y, depth) of the most interior pixel, in the
    map's coordinates; depth is the distance (in 4-steps) to the segment's border or the image
    edge. Segments absent from the map get depth 0 and position (0, 0)."""
    h, w = index.shape
    inside = index > 0
    # same[d]: the neighbour in direction d exists and belongs to the same segment
    up = np.zeros_like(inside)
    up[1:, :] = index[1:, :] == index[:-1, :]
    down = np.zeros_like(inside)
    down[:-1, :] = index[:-1, :] == index[1:, :]
    left = np.zeros_like(inside)
    left[:, 1:] = index[:, 1:] == index[:, :-1]
    right = np.zeros_like(inside)
    right[:, :-1] = index[:, :-1] == index[:, 1:]
    depth = inside.astype(np.int32)
    level = inside
    while level.any():
        nxt = level & up & down & left & right
        nxt[1:, :] &= level[:-1, :]
        nxt[:-1, :] &= level[1:, :]
        nxt[:, 1:] &= level[:, :-1]
        nxt[:, :-1] &= level[:, 1:]
        depth += nxt
        level = nxt
    flat = index.ravel()
    ys, xs = np.divmod(np.arange(flat.size), w)
    n = np.bincount(flat, minlength=count + 1).astype(np.float64)
    cx = np.bincount(flat, weights=xs, minlength=count + 1) / np.maximum(n, 1)
    cy = np.bincount(flat, weights=ys, minlength=count + 1) / np.maximum(n, 1)
    dist = (xs - cx[flat]) ** 2 + (ys - cy[flat]) ** 2
    # By segment, then depth, then closeness to the centroid: the last row of a segment wins.
    order = np.lexsort((-dist, depth.ravel(), flat))
    sorted_labels = flat[order]
    last = np.flatnonzero(np.r_[sorted_labels[1:] != sorted_labels[:-1], True])
    best = order[last]
    px = np.zeros(count + 1, np.int64)
    py = np.zeros(count + 1, np.int64)
    pd = np.zeros(count + 1, np.int64)
    labels = flat[best]
    px[labels], py[labels], pd[labels] = xs[best], ys[best], depth.ravel()[best]
    return px, py, pd


def _resize_ids(id_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an integer map to (width, height): each output pixel takes the
    source pixel under its centre."""
    h, w = id_map.shape
    if (w, h) == size:
        return id_map
    rows = np.minimum(((np.arange(size[1]) + 0.5) * (h / size[1])).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[0]) + 0.5) * (w / size[0])).astype(np.int64), w - 1)
    return id_map[rows[:, None], cols[None, :]]


def _rows(start: int, stop: int, step: float) -> slice:
    """The rows (or columns) of the scaled-down map that cover full-size pixels start..stop."""
    return slice(int(start / step), max(int(start / step) + 1, int(np.ceil(stop / step))))


def label_placements(id_map: np.ndarray, segments_info: Sequence[Mapping],
                     font_size: int | None = None, label_map: LabelMap | None = None) -> list[Label]:
    """Where render_overlay puts its labels: one per segment big enough to hold its text, centred
    on the segment's most interior point and kept inside the image; tiny segments get none.
    The text is the segment's category_name, else its name in `label_map` (COCO's by default)."""
    label_map = label_map or coco_label_map()
    id_map = np.asarray(id_map)
    h, w = id_map.shape
    segments_info = [s for s in segments_info if int(s["id"]) > 0]
    ids = np.array(sorted({int(s["id"]) for s in segments_info}), dtype=np.int64)
    if ids.size == 0 or h == 0 or w == 0:
        return []
    font = label_font(font_size or font_size_for(h, w))
    scale = max(1.0, max(h, w) / _PLACEMENT_SIDE)
    small = _resize_ids(id_map, (max(1, round(w / scale)), max(1, round(h / scale))))
    sx, sy = w / small.shape[1], h / small.shape[0]
    small_index = _segment_index(small, ids)
    px, py, depth = _interior_points(small_index, ids.size)
    area = np.bincount(small_index.ravel(), minlength=ids.size + 1) * (sx * sy)   # in full-size pixels
    pad = max(2, font.size // 5) if hasattr(font, "size") else 2
    labels = []
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    for segment in sorted(segments_info, key=lambda s: int(s["id"])):
        k = int(np.searchsorted(ids, int(segment["id"]))) + 1
        text = str(segment.get("category_name") or label_map.name(int(segment["category_id"])))
        x0, y0, x1, y1 = probe.textbbox((0, 0), text, font=font)
        box_w, box_h = (x1 - x0) + 2 * pad, (y1 - y0) + 2 * pad
        inner = depth[k] * min(sx, sy)       # distance from the interior point to the border, in pixels
        if (box_w > w or box_h > h or area[k] < max(MIN_LABEL_FRACTION * h * w, box_w * box_h)
                or 2 * inner < box_h):
            continue
        cx, cy = (px[k] + 0.5) * sx, (py[k] + 0.5) * sy
        left = int(np.clip(round(cx - box_w / 2), 0, w - box_w))
        top = int(np.clip(round(cy - box_h / 2), 0, h - box_h))
        # Mostly on its segment, or it would name its neighbour (thin or ragged segments).
        under = small_index[_rows(top, top + box_h, sy), _rows(left, left + box_w, sx)]
        if (under == k).mean() < MIN_LABEL_COVER:
            continue
        labels.append(Label(int(segment["id"]), text, (left, top, left + box_w, top + box_h)))
    return labels


def _as_rgb_array(image: Image.Image | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8, copy=False))
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(image)


def render_overlay(image: Image.Image | np.ndarray, id_map: np.ndarray, segments_info: Sequence[Mapping], *,
                   alpha: float = DEFAULT_ALPHA, borders: bool = True, labels: bool = True,
                   max_side: int | None = None, label_map: LabelMap | None = None) -> Image.Image:
    """The image with its panoptic segments painted over it, as a new RGB image.

    `id_map` is the int [H, W] map of segment ids (0 = void); `segments_info` the result's
    segments (id, category_id, and optionally isthing and category_name). The image is resized
    to the map's size if it differs. With `max_side`, the overlay is scaled down (the map with
    nearest neighbour) so that its longest side is at most that. Ids in the map that are not in
    `segments_info`, and void, are left unpainted. Colours (and names and thing/stuff where the
    segments lack them) come from `label_map`, COCO's by default.
    """
    id_map = np.asarray(id_map)
    if id_map.ndim != 2:
        raise ValueError(f"id map must be 2-D, got shape {id_map.shape}")
    h, w = id_map.shape
    if max_side and max(h, w) > max_side:
        factor = max_side / max(h, w)
        id_map = _resize_ids(id_map, (max(1, round(w * factor)), max(1, round(h * factor))))
        h, w = id_map.shape
    pixels = _as_rgb_array(image, (w, h))

    colors = segment_colors(segments_info, label_map)
    ids = np.array(sorted(colors), dtype=np.int64)
    index = _segment_index(id_map, ids)
    palette = np.zeros((ids.size + 1, 3), np.float32)
    if ids.size:
        palette[1:] = [colors[int(i)] for i in ids]
    # out = pixel + alpha · (colour − pixel) on segments; void stays as it is
    out = palette[index]
    out -= pixels
    out *= np.where(index > 0, np.float32(alpha), np.float32(0))[..., None]
    out += pixels
    if borders and ids.size:
        edge = _borders(index, thickness=max(1, round(min(h, w) / 200)))
        out[edge] = out[edge] * (1 - BORDER_ALPHA) + np.asarray(BORDER_RGB, np.float32) * BORDER_ALPHA
    out += 0.5
    result = Image.fromarray(out.astype(np.uint8), "RGB")    # values lie in [0.5, 255.5): rounds

    if labels and ids.size:
        size = font_size_for(h, w)
        placed = label_placements(id_map, segments_info, size, label_map)
        if placed:
            font = label_font(size)
            layer = Image.new("RGBA", result.size, (0, 0, 0, 0))
            draw = ImageDraw.Draw(layer)
            for label in placed:
                x0, y0, x1, y1 = label.box
                draw.rounded_rectangle((x0, y0, x1 - 1, y1 - 1), radius=max(2, (y1 - y0) // 5), fill=LABEL_BOX_RGBA)
                draw.text(((x0 + x1) / 2, (y0 + y1) / 2), label.text, font=font, fill=LABEL_TEXT_RGB, anchor="mm")
            result = Image.alpha_composite(result.convert("RGBA"), layer).convert("RGB")
    return result


def encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def overlay_jpeg(image: Image.Image | np.ndarray, id_map: np.ndarray, segments_info: Sequence[Mapping],
                 max_side: int | None = OVERLAY_MAX_SIDE, quality: int = JPEG_QUALITY,
                 label_map: LabelMap | None = None) -> bytes:
    """render_overlay as JPEG bytes (the `<stem>.overlay.jpg` that `--overlays` writes)."""
    return encode_jpeg(render_overlay(image, id_map, segments_info, max_side=max_side, label_map=label_map), quality)


def overlay_from_outputs(image_bytes: bytes, png_bytes: bytes, json_bytes: bytes | str,
                         max_side: int | None = OVERLAY_MAX_SIDE, label_map: LabelMap | None = None) -> Image.Image:
    """An overlay rebuilt from a result's files: the source image's bytes, the panoptic PNG and
    the JSON document beside it."""
    from .preprocess import decode_image

    document = json.loads(json_bytes)
    id_map = decode_id_png(png_bytes)
    h, w = id_map.shape
    # The result was made from this image, so it is allowed at least the result's size.
    image = decode_image(image_bytes, max_pixels=max(h * w, 1) * 4, max_bytes=None)
    return render_overlay(image, id_map, document.get("segments_info", []), max_side=max_side, label_map=label_map)


OVERLAY_SUFFIX = ".overlay.jpg"


def overlay_uri(dest: str, stem: str) -> str:
    """Where `--overlays` puts an image's overlay: DEST/<stem>.overlay.jpg, beside its PNG and JSON."""
    from storage.objects import join
    return join(dest, stem + OVERLAY_SUFFIX)


def write_overlay(dest: str, stem: str, image: Image.Image, id_map: np.ndarray,
                  segments_info: Sequence[Mapping], label_map: LabelMap | None = None) -> bool:
    """Render and write DEST/<stem>.overlay.jpg (transient store errors retried); True if written.

    Called after the image's PNG and JSON are written. The overlay is a view of the result, not
    the result: when it cannot be rendered or written, the reason is logged as a warning and the
    image still succeeds (its PNG and JSON are safe), and `panoptic-batch report` renders the
    overlay from them instead.
    """
    from storage import objects

    uri = overlay_uri(dest, stem)
    try:
        data = overlay_jpeg(image, id_map, segments_info, label_map=label_map)
        objects.write_bytes_retrying(uri, data, content_type="image/jpeg")
        return True
    except Exception as exc:           # noqa: BLE001 - any failure here must leave the result alone
        log.warning("overlay %s not written (the result is): %s: %s", objects.mask_url(uri), type(exc).__name__, exc)
        return False
