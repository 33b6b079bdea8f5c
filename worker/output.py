"""The per-image output files: the COCO panoptic PNG and the JSON document beside it.

PNG: 8-bit RGB, segment id = R + 256·G + 256²·B, 0 = VOID (panopticapi's id2rgb/rgb2id convention).
JSON: {"file_name", "image", "height", "width", "segments_info", "model": {"name",
"weights_sha256", "threshold", "label_map_sha256"}}. Both are named after the image's key (`output_stem`).
"""

from __future__ import annotations

import io
import struct
import unicodedata
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from .text import BIDI_CONTROLS  # they make "x\u202egnp.jpg" display as "xgpj.png" (spoofing)

try:
    # zlib-ng: the same deflate stream format as zlib, 2–3× faster at level 6 here (BENCHMARKS.md).
    from zlib_ng.zlib_ng import compress as _deflate
    PNG_DEFLATE = "zlib-ng"
except ImportError:       # an install without the dependency: a few percent more bytes, ~2× the time
    from zlib import compress as _deflate
    PNG_DEFLATE = "zlib"

MAX_ID = 256 ** 3 - 1
PNG_COMPRESS_LEVEL = 6
SEGMENT_KEYS = ("id", "category_id", "category_name", "isthing", "area", "bbox", "score", "iscrowd")


def id_to_rgb(id_map: np.ndarray) -> np.ndarray:
    """int [H, W] → uint8 [H, W, 3] with id = R + 256·G + 256²·B."""
    ids = np.asarray(id_map)
    if ids.ndim != 2:
        raise ValueError(f"id map must be 2-D, got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() > MAX_ID):
        raise ValueError(f"segment ids must lie in [0, {MAX_ID}]")
    ids = ids.astype(np.uint32, copy=False)
    rgb = np.empty((*ids.shape, 3), np.uint8)
    rgb[..., 0] = ids & 0xFF
    rgb[..., 1] = (ids >> 8) & 0xFF
    rgb[..., 2] = (ids >> 16) & 0xFF
    return rgb


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] → int32 [H, W]."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an [H, W, 3] array, got shape {rgb.shape}")
    rgb = rgb.astype(np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def encode_id_png(id_map: np.ndarray, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """The id map as an 8-bit RGB PNG: the first row unfiltered, every other row with the PNG "Up"
    filter, deflated at level 6 by zlib-ng (by the standard library's zlib where zlib-ng is missing).

    Written here rather than by Pillow, whose encoder tries all five PNG filters on every row.
    Measured by bench/png_bench.py on two COCO ground-truth maps and eight synthetic DETR maps
    (BENCHMARKS.md, "PNG encoding"): 0.88–0.97× the bytes of Pillow's default encoder in under a
    third of its time, and 0.2–0.8× the time of the previous encoder here (rows unfiltered, zlib
    level 1), which wrote 1.7–2.7× Pillow's bytes. Up turns a segment's inside into runs of zeros;
    Sub and a per-row choice (libpng's heuristic) gave more bytes, Paeth as many bytes in 5× the
    time. zlib-ng level 1 wrote up to 4.35× Pillow's bytes, levels 2–5 up to 1.04–0.97×, level 6
    up to 0.97× (2% fewer than 5, in a few percent more time); isal's best level wrote 1.6×
    (median). With zlib instead of zlib-ng (the fallback), 0–5% more bytes in 1.0–1.6× the
    previous encoder's time.
    The deflate and numpy's array work run without the GIL, so postprocessing threads encode in
    parallel (tests/test_output_format.py checks that another thread keeps running).
    """
    ids = np.asarray(id_map)
    if ids.ndim != 2 or not ids.size:
        raise ValueError(f"id map must be 2-D and not empty, got shape {ids.shape}")
    height, width = ids.shape
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)   # 8-bit RGB, no interlace
    idat = _deflate(_up_filtered_rows(ids), compress_level)
    return b"".join([_PNG_SIGNATURE, _png_chunk(b"IHDR", header), _png_chunk(b"IDAT", idat),
                     _png_chunk(b"IEND", b"")])


def _up_filtered_rows(ids: np.ndarray) -> np.ndarray:
    """The PNG scanlines of the id map's RGB pixels, each led by its filter type byte: row 0 as is
    (type 0), every later row as each byte minus the byte above it, mod 256 (type 2, "Up")."""
    if ids.dtype in (np.dtype(np.int32), np.dtype(np.uint32)):
        ids32 = ids.view(np.uint32)                 # negative int32 ids come out above MAX_ID here
        if ids32.max() > MAX_ID:
            raise ValueError(f"segment ids must lie in [0, {MAX_ID}]")
    else:
        if ids.min() < 0 or ids.max() > MAX_ID:
            raise ValueError(f"segment ids must lie in [0, {MAX_ID}]")
        ids32 = ids.astype(np.uint32)
    height, width = ids.shape
    # Each pixel's id as 4 bytes, least significant first: R, G, B and a zero byte.
    id_bytes = np.ascontiguousarray(ids32.astype("<u4", copy=False)).view(np.uint8).reshape(height, width, 4)
    rows = np.empty((height, 1 + 3 * width), np.uint8)
    rows[0, 0], rows[1:, 0] = 0, 2
    rgb = rows[:, 1:].reshape(height, width, 3)     # a view of the rows' pixel bytes
    rgb[0] = id_bytes[0, :, :3]
    for channel in range(3):    # plane by plane: numpy's loops run along rows, not over 3 bytes
        np.subtract(id_bytes[1:, :, channel], id_bytes[:-1, :, channel], out=rgb[1:, :, channel])
    return rows


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decode_id_png(data: bytes) -> np.ndarray:
    """A panoptic PNG → int32 id map [H, W]."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode != "RGB":
            im = im.convert("RGB")
        return rgb_to_id(np.asarray(im))


def _model_field(model_info: Any, key: str) -> Any:
    if isinstance(model_info, Mapping):
        return model_info.get(key)
    return getattr(model_info, key, None)


def result_document(result: Mapping, file_name: str, image_uri: str, model_info: Any) -> dict:
    """The JSON document for one image.

    result: a postprocessor result ({"id_map", "png", "segments_info"}); file_name: the PNG's name;
    image_uri: where the source image came from; model_info: a mapping (or object) with `name`,
    `weights_sha256`, `threshold` and optionally `label_map_sha256`.
    """
    height, width = np.asarray(result["id_map"]).shape
    segments = [{k: seg[k] for k in SEGMENT_KEYS} for seg in result["segments_info"]]
    threshold = _model_field(model_info, "threshold")
    model = {"name": _model_field(model_info, "name"),
             "weights_sha256": _model_field(model_info, "weights_sha256"),
             "threshold": None if threshold is None else float(threshold)}
    label_map_sha256 = _model_field(model_info, "label_map_sha256")
    if label_map_sha256:        # which label map named the categories (worker.labels)
        model["label_map_sha256"] = label_map_sha256
    return {
        "file_name": file_name,
        "image": image_uri,
        "height": int(height),
        "width": int(width),
        "segments_info": segments,
        "model": model,
    }


def output_stem(key: str) -> str:
    """The image's path relative to SOURCE with its extension removed; never escapes DEST.

    Unicode is NFC-normalised; empty and "." components are dropped ("a//b.jpg" → "a/b"); keys
    with a ".." component, control characters, bidirectional overrides or backslashes (a path
    separator on Windows) are refused with a ValueError that says why.
    """
    text = unicodedata.normalize("NFC", key)
    # Plain ASCII keys (nearly all) have nothing to refuse but backslashes: skip the per-character
    # scan, which would be most of submit's cost per key (every key's name is checked there).
    if not (text.isascii() and text.isprintable()) or "\\" in text:
        bad = sorted({c for c in text if c == "\\" or unicodedata.category(c) == "Cc" or c in BIDI_CONTROLS})
        if bad:
            shown = ", ".join("backslash" if c == "\\" else f"U+{ord(c):04X}" for c in bad)
            raise ValueError(f"unsafe image key {key!r}: it contains {shown} (control characters, bidirectional "
                             f"overrides and backslashes are not allowed in output names)")
    parts = [part for part in text.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"unsafe image key {key!r}: '..' would put its outputs outside DEST")
    name = parts[-1] if parts else ""
    dot = name.rfind(".")
    if 0 < dot < len(name) - 1:            # the extension, as pathlib sees one: ".x" and "x." have none
        name = name[:dot]
    if name in ("", ".", ".."):            # "", "/", "..jpg", "...jpg"
        raise ValueError(f"unusable image key {key!r}: no file name to name its outputs after")
    return "/".join(parts[:-1] + [name])
