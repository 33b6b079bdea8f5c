"""The per-image output files: the COCO panoptic PNG and the JSON document beside it.

PNG: 8-bit RGB, segment id = R + 256·G + 256²·B, 0 = VOID (panopticapi's id2rgb/rgb2id convention).
JSON: {"file_name", "image", "height", "width", "segments_info", "model": {"name",
"weights_sha256", "threshold"}}. Both are named after the image's key (`output_stem`).
"""

from __future__ import annotations

import io
import struct
import unicodedata
import zlib
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from .text import BIDI_CONTROLS  # they make "x\u202egnp.jpg" display as "xgpj.png" (spoofing)

MAX_ID = 256 ** 3 - 1
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


def encode_id_png(id_map: np.ndarray, compress_level: int = 1) -> bytes:
    """The id map as an 8-bit RGB PNG: rows unfiltered (PNG filter type 0), deflated by zlib.

    Written here rather than by Pillow, whose encoder tries all five PNG filters on every row:
    on id maps (flat regions, which deflate as well unfiltered) that took 2–5× as long for ~13% fewer
    bytes, and PNG encoding was two thirds of the worker's postprocessing on a GPU machine
    (BENCHMARKS.md). zlib releases the GIL, so the postprocessing threads encode in parallel.
    """
    ids = np.asarray(id_map)
    if ids.ndim != 2 or not ids.size:
        raise ValueError(f"id map must be 2-D and not empty, got shape {ids.shape}")
    height, width = ids.shape
    rows = np.zeros((height, 1 + 3 * width), np.uint8)       # column 0: each row's filter type (0)
    rows[:, 1:] = id_to_rgb(ids).reshape(height, 3 * width)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)   # 8-bit RGB, no interlace
    return b"".join([_PNG_SIGNATURE, _png_chunk(b"IHDR", header),
                     _png_chunk(b"IDAT", zlib.compress(rows, compress_level)), _png_chunk(b"IEND", b"")])


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
    `weights_sha256` and `threshold`.
    """
    height, width = np.asarray(result["id_map"]).shape
    segments = [{k: seg[k] for k in SEGMENT_KEYS} for seg in result["segments_info"]]
    threshold = _model_field(model_info, "threshold")
    return {
        "file_name": file_name,
        "image": image_uri,
        "height": int(height),
        "width": int(width),
        "segments_info": segments,
        "model": {
            "name": _model_field(model_info, "name"),
            "weights_sha256": _model_field(model_info, "weights_sha256"),
            "threshold": None if threshold is None else float(threshold),
        },
    }


def output_stem(key: str) -> str:
    """The image's path relative to SOURCE with its extension removed; never escapes DEST.

    Unicode is NFC-normalised; empty and "." components are dropped ("a//b.jpg" → "a/b"); keys
    with a ".." component, control characters, bidirectional overrides or backslashes (a path
    separator on Windows) are refused with a ValueError that says why.
    """
    text = unicodedata.normalize("NFC", key)
    bad = sorted({c for c in text if c == "\\" or unicodedata.category(c) == "Cc" or c in BIDI_CONTROLS})
    if bad:
        shown = ", ".join("backslash" if c == "\\" else f"U+{ord(c):04X}" for c in bad)
        raise ValueError(f"unsafe image key {key!r}: it contains {shown} (control characters, bidirectional "
                         f"overrides and backslashes are not allowed in output names)")
    parts = [part for part in text.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"unsafe image key {key!r}: '..' would put its outputs outside DEST")
    stem = PurePosixPath(*parts).with_suffix("") if parts else None
    if stem is None or stem.name in ("", ".", ".."):      # "", "/", "..jpg", "...jpg"
        raise ValueError(f"unusable image key {key!r}: no file name to name its outputs after")
    return str(stem)
