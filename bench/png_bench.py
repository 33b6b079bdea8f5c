"""Benchmark: the output PNG's bytes and encode time, ours against Pillow's and the previous encoder.

    python -m bench.png_bench [--repeats 15] [--maps-per-size 4] [--seed 0] [--explore]

Maps: the two COCO ground-truth id maps in tests/data/panoptic-maps/, and synthetic DETR outputs
(tests/synthetic_outputs: smooth curved boundaries, ~40% stuff classes merged into large regions)
with 10–60 kept queries, run through the real postprocessor to 640×480 and 1333×800.
Encoders, interleaved in every round so that all see the same machine load:
  before  the previous `encode_id_png`: rows unfiltered, zlib level 1 (copied below);
  pillow  Pillow's default PNG encoder (compress_level 6, its adaptive per-row filter choice);
  ours    `worker.output.encode_id_png` as installed (zlib-ng, or zlib where zlib-ng is missing);
  zlib    ours with the standard zlib at the same level: the fallback without zlib-ng.
Each output is decoded by Pillow and must give the map's ids back (asserted). The table gives bytes
and median time per map, bytes/Pillow's, and time/before's as the median of the per-round ratios
(and, in brackets, as the ratio of the two best times: the steadier figure on a loaded machine).

--explore adds the measurements behind the choice of filter, library and level: every row filter
(none, Sub, Up, Paeth, a per-row minimum-sum-of-absolute-differences choice among None/Sub/Up) with
zlib, zlib-ng and isal (where installed: `pip install isal`) at several levels.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from tests.synthetic_outputs import synthetic_batch
from worker import output
from worker.output import decode_id_png, encode_id_png, id_to_rgb, rgb_to_id
from worker.postprocess import panoptic_postprocess

PANOPTIC_MAPS = Path(__file__).resolve().parents[1] / "tests" / "data" / "panoptic-maps"
SIZES = {"640×480": ((800, 1066), (480, 640)), "1333×800": ((800, 1333), (800, 1333))}


def encode_before(id_map: np.ndarray) -> bytes:
    """`worker.output.encode_id_png` before issue 19: rows unfiltered, zlib level 1."""
    height, width = id_map.shape
    rows = np.zeros((height, 1 + 3 * width), np.uint8)
    rows[:, 1:] = id_to_rgb(id_map).reshape(height, 3 * width)
    return _png(width, height, zlib.compress(rows, 1))


def encode_pillow(id_map: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(id_to_rgb(id_map), "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def encode_zlib_fallback(id_map: np.ndarray) -> bytes:
    height, width = id_map.shape
    return _png(width, height, zlib.compress(output._up_filtered_rows(id_map), output.PNG_COMPRESS_LEVEL))


def _png(width: int, height: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def id_maps(maps_per_size: int, seed: int) -> dict[str, np.ndarray]:
    maps = {}
    for path in sorted(PANOPTIC_MAPS.glob("*.png")):
        with Image.open(path) as im:
            maps[f"COCO {path.stem}"] = rgb_to_id(np.asarray(im.convert("RGB")))
    rng = np.random.default_rng(seed)
    for label, (processed, target) in SIZES.items():
        for i in range(maps_per_size):
            kept = int(rng.integers(10, 61))
            outputs, _ = synthetic_batch(seed * 1000 + i, [processed], [kept])
            result = panoptic_postprocess(outputs, [processed], [target])[0]
            maps[f"DETR {label} #{i + 1}, {len(result['segments_info'])} segments"] = result["id_map"]
    return maps


def timed_rounds(encoders: dict[str, Callable], id_map: np.ndarray, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in encoders}
    for name, encode in encoders.items():        # warm-up (first-call allocations, imports)
        encode(id_map)
    for _ in range(repeats):
        for name, encode in encoders.items():
            start = time.perf_counter()
            encode(id_map)
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(times: list[float], reference: list[float]) -> float:
    """Median over the rounds of the two times' ratio within a round (the load drifts less within one)."""
    return statistics.median(t / r for t, r in zip(times, reference))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds per map")
    ap.add_argument("--maps-per-size", type=int, default=4, help="synthetic maps per size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--explore", action="store_true", help="also every filter × library × level")
    args = ap.parse_args(argv)

    maps = id_maps(args.maps_per_size, args.seed)
    encoders = {"before": encode_before, "pillow": encode_pillow, "ours": encode_id_png,
                "zlib": encode_zlib_fallback}
    print(f"# {platform.machine()}, Python {platform.python_version()}, numpy {np.__version__}, "
          f"Pillow {Image.__version__}, zlib {zlib.ZLIB_RUNTIME_VERSION}; ours deflates with "
          f"{output.PNG_DEFLATE} level {output.PNG_COMPRESS_LEVEL}; times: median of {args.repeats} "
          f"interleaved rounds, time ratios: median of the per-round ratios; every output decodes "
          f"to the map's ids.")
    print("| map | before: bytes, ms | Pillow: bytes, ms | ours: bytes, ms | ours bytes / Pillow's "
          "| ours time / before's (best-of) | zlib fallback: bytes / Pillow's, time / before's |")
    print("|---|---|---|---|---|---|---|")
    summary: dict[str, list[float]] = {"bytes": [], "time": [], "zlib bytes": [], "zlib time": [], "best": []}
    for label, id_map in maps.items():
        sizes = {}
        for name, encode in encoders.items():
            png = encode(id_map)
            assert np.array_equal(decode_id_png(png), id_map), f"{name} is not lossless on {label}"
            sizes[name] = len(png)
        times = timed_rounds(encoders, id_map, args.repeats)
        med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        ratios = (sizes["ours"] / sizes["pillow"], paired_ratio(times["ours"], times["before"]),
                  sizes["zlib"] / sizes["pillow"], paired_ratio(times["zlib"], times["before"]),
                  min(times["ours"]) / min(times["before"]))
        for key, value in zip(summary, ratios):
            summary[key].append(value)
        print(f"| {label} | {sizes['before']:,}, {med['before']:.2f} | {sizes['pillow']:,}, {med['pillow']:.2f} "
              f"| {sizes['ours']:,}, {med['ours']:.2f} | **{ratios[0]:.2f}** | **{ratios[1]:.2f}** ({ratios[4]:.2f}) "
              f"| {ratios[2]:.2f}, {ratios[3]:.2f} |")
    print(f"\nours: bytes {min(summary['bytes']):.2f}–{max(summary['bytes']):.2f}× Pillow's, time "
          f"{min(summary['time']):.2f}–{max(summary['time']):.2f}× before's (best-of: "
          f"{min(summary['best']):.2f}–{max(summary['best']):.2f}×); zlib fallback: bytes "
          f"{min(summary['zlib bytes']):.2f}–{max(summary['zlib bytes']):.2f}×, time "
          f"{min(summary['zlib time']):.2f}–{max(summary['zlib time']):.2f}×")
    if args.explore:
        explore(maps, max(3, args.repeats // 3))


# --- --explore: the candidates ------------------------------------------------------------------

def _rgb_rows(id_map: np.ndarray) -> np.ndarray:
    height, width = id_map.shape
    return id_to_rgb(id_map).reshape(height, 3 * width)


def _with_type(filtered: np.ndarray, kind: int) -> np.ndarray:
    rows = np.empty((filtered.shape[0], filtered.shape[1] + 1), np.uint8)
    rows[:, 0] = kind
    rows[:, 1:] = filtered
    return rows


def _sub(raw: np.ndarray) -> np.ndarray:
    out = raw.copy()
    np.subtract(raw[:, 3:], raw[:, :-3], out=out[:, 3:])
    return out


def _up(raw: np.ndarray) -> np.ndarray:
    out = raw.copy()
    np.subtract(raw[1:], raw[:-1], out=out[1:])
    return out


def _paeth(raw: np.ndarray) -> np.ndarray:
    r = raw.astype(np.int16)
    left = np.zeros_like(r)
    left[:, 3:] = r[:, :-3]
    up = np.zeros_like(r)
    up[1:] = r[:-1]
    up_left = np.zeros_like(r)
    up_left[1:, 3:] = r[:-1, :-3]
    p = left + up - up_left
    pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - up_left)
    predictor = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, up_left))
    return (r - predictor).astype(np.uint8)


def filter_rows(id_map: np.ndarray, how: str) -> np.ndarray:
    if how == "up":
        return output._up_filtered_rows(id_map)
    raw = _rgb_rows(id_map)
    if how == "none":
        return _with_type(raw, 0)
    if how == "sub":
        return _with_type(_sub(raw), 1)
    if how == "paeth":
        return _with_type(_paeth(raw), 4)
    # "minsum": per row, the one of None/Sub/Up with the least sum of |byte as int8| (libpng's rule)
    candidates = [_with_type(raw, 0), _with_type(_sub(raw), 1), _with_type(_up(raw), 2)]
    costs = np.stack([np.abs(c[:, 1:].view(np.int8).astype(np.int16)).sum(1) for c in candidates])
    best = costs.argmin(0)
    rows = candidates[0]
    for kind in (1, 2):
        rows[best == kind] = candidates[kind][best == kind]
    return rows


def explore(maps: dict[str, np.ndarray], repeats: int) -> None:
    compressors: dict[str, tuple[Callable, list[int]]] = {"zlib": (zlib.compress, [1, 6, 9])}
    try:
        from zlib_ng import zlib_ng
        compressors["zlib-ng"] = (zlib_ng.compress, [1, 2, 3, 4, 5, 6, 9])
    except ImportError:
        print("(zlib-ng not installed)")
    try:
        from isal import isal_zlib
        compressors["isal"] = (isal_zlib.compress, [0, 1, 3])   # its level 2 is its level 1 here
    except ImportError:
        print("(isal not installed: pip install isal)")
    filters = ["none", "sub", "up", "paeth", "minsum"]
    columns = [(lib, level) for lib, (_, levels) in compressors.items() for level in levels]
    print(f"\n--explore: PNG bytes / Pillow's and time (filter + deflate) / before's ({repeats} rounds "
          "interleaved with the previous encoder, median of the per-round ratios), the median over "
          "the maps and [the worst map] of each")
    print("| filter | " + " | ".join(f"{lib} {level}" for lib, level in columns) + " |")
    print("|---|" + "---|" * len(columns))
    stats = {(f, c): ([], []) for f in filters for c in columns}
    for id_map in maps.values():
        pillow_bytes = len(encode_pillow(id_map))
        for how in filters:
            rows = filter_rows(id_map, how)
            candidates = {"before": encode_before}
            for lib, level in columns:
                compress = compressors[lib][0]
                data = compress(rows, level)
                assert zlib.decompress(data) == rows.tobytes()
                png_bytes = len(_png(id_map.shape[1], id_map.shape[0], data))
                stats[how, (lib, level)][0].append(png_bytes / pillow_bytes)
                candidates[lib, level] = lambda m, c=compress, lv=level, h=how: c(filter_rows(m, h), lv)
            times = timed_rounds(candidates, id_map, repeats)
            for column in columns:
                stats[how, column][1].append(paired_ratio(times[column], times["before"]))
    for how in filters:
        cells = []
        for column in columns:
            size, speed = stats[how, column]
            cells.append(f"{statistics.median(size):.2f} [{max(size):.2f}], "
                         f"{statistics.median(speed):.2f} [{max(speed):.2f}]")
        print(f"| {how} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
