"""Bad input: every file gives a correct result or a failed image with a clear error, never a dead
worker. The corpus is generated here (no committed binaries): truncated, empty and non-image
files, a real 30000×30000 PNG decompression bomb, CMYK, grayscale, 16-bit, RGBA and palette
images, animations, an EXIF-rotated JPEG, 1×1 and 10000×20 images, PNGs with bad CRCs, a folder
marker and a 50 MB object of random bytes.

Unit level through `worker.preprocess.decode_image`, then end to end: the whole corpus in a
SeaweedFS bucket, `panoptic-batch submit` and one `panoptic-batch worker` on Redis and PostgreSQL.
"""

from __future__ import annotations

import io
import json
import os
import struct
import time
import zlib
from dataclasses import dataclass

import boto3
import numpy as np
import pytest
from PIL import Image

from storage.jobs import JobStore
from tests.test_pipeline import MODEL_ARGS, cli, decode_ids, services_env, start_worker, stop_worker, wait_finished  # noqa: F401
from worker.predictor import ModelConfig, Predictor
from worker.preprocess import ImageDecodeError, check_bytes, decode_image, processed_size

# --------------------------------------------------------------------------------------------
# The corpus


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int, rows_per_segment: int = 1000) -> bytes:
    """A valid all-black 1-bit PNG of width×height, built without ever holding its pixels.

    The zlib stream is one raw-deflate segment of `rows_per_segment` zero rows, ended by a full
    flush (so it is byte-aligned and independent of what precedes it) and repeated; the Adler-32
    of n zero bytes is (n mod 65521) << 16 | 1. 30000×30000 takes about 110 kB and 10 ms.
    """
    row = 1 + (width + 7) // 8                          # filter byte + packed pixels
    assert height % rows_per_segment == 0
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = compressor.compress(bytes(row * rows_per_segment)) + compressor.flush(zlib.Z_FULL_FLUSH)
    total = row * height
    idat = (b"\x78\xda" + segment * (height // rows_per_segment) + b"\x03\x00"   # empty final block
            + struct.pack(">I", ((total % 65521) << 16) | 1))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)               # 1-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_16bit(width: int, height: int, colour_type: int, channels: int, seed: int = 3) -> bytes:
    """A 16-bit-per-sample PNG written by hand (PIL cannot write 16-bit colour PNGs)."""
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, 65536, (height, width * channels), dtype=np.uint16).astype(">u2")
    raw = b"".join(b"\x00" + samples[y].tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(raw))
            + png_chunk(b"IEND", b""))


def patch_png_size(png: bytes, width: int, height: int) -> bytes:
    """The PNG with another size in its header (CRC fixed): PIL sees the size, the data is short."""
    header = struct.pack(">II", width, height) + png[24:29]
    return png[:16] + header + struct.pack(">I", zlib.crc32(b"IHDR" + header)) + png[33:]


def corrupt_crc(png: bytes, kind: bytes) -> bytes:
    """The PNG with the CRC of its first `kind` chunk flipped (the chunk's data intact)."""
    start = png.index(kind)
    length = struct.unpack(">I", png[start - 4:start])[0]
    data = bytearray(png)
    data[start + 4 + length] ^= 0xFF
    return bytes(data)


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@dataclass(frozen=True)
class Case:
    data: bytes
    size: tuple[int, int] | None = None   # displayed (width, height) of a good image
    error: str | None = None              # what the error of a bad one must say


def exif_rotated_jpeg() -> bytes:
    """Stored 60 wide × 30 high with EXIF orientation 6: displayed 30 wide × 60 high."""
    stored = Image.new("RGB", (60, 30), (255, 0, 0))
    stored.paste((0, 0, 255), (0, 0, 10, 30))          # blue band on the stored left edge → top
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", exif=exif, quality=95)


def animation(fmt: str) -> bytes:
    frames = [Image.new("RGB", (24, 16), colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kwargs)


def rgba_png() -> bytes:
    image = noise(32, 24, 1).convert("RGBA")
    alpha = np.full((24, 32), 255, np.uint8)
    alpha[:, :8] = 0                                   # a transparent band: composited on white
    image.putalpha(Image.fromarray(alpha))
    return encode(image, "PNG")


def palette_png() -> bytes:
    image = noise(28, 20, 2).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(image, "PNG", transparency=0)


def corpus() -> dict[str, Case]:
    """Keys relative to SOURCE → what each file must give."""
    plain_jpeg = encode(noise(48, 32), "JPEG")
    plain_png = encode(noise(40, 30, 4), "PNG")
    gray16 = Image.fromarray(np.random.default_rng(5).integers(0, 65536, (24, 36), dtype=np.uint16))
    return {
        # good: a correct result at the displayed size
        "good/plain.jpg": Case(plain_jpeg, size=(48, 32)),
        "good/cmyk.jpg": Case(encode(noise(40, 30, 6).convert("CMYK"), "JPEG"), size=(40, 30)),
        "good/gray.jpg": Case(encode(noise(30, 40, 7).convert("L"), "JPEG"), size=(30, 40)),
        "good/gray16.png": Case(encode(gray16, "PNG"), size=(36, 24)),
        "good/rgb16.png": Case(png_16bit(20, 16, 2, 3), size=(20, 16)),
        "good/rgba16.png": Case(png_16bit(18, 14, 6, 4), size=(18, 14)),
        "good/rgba.png": Case(rgba_png(), size=(32, 24)),
        "good/palette.png": Case(palette_png(), size=(28, 20)),
        "good/animated.webp": Case(animation("WEBP"), size=(24, 16)),
        "good/animated-gif-named.png": Case(animation("GIF"), size=(24, 16)),   # content decides
        "good/exif-rotated.jpg": Case(exif_rotated_jpeg(), size=(30, 60)),
        "good/one-pixel.png": Case(encode(Image.new("RGB", (1, 1), (9, 99, 199)), "PNG"), size=(1, 1)),
        "good/strip.png": Case(encode(noise(10000, 20, 8), "PNG"), size=(10000, 20)),
        "good/tower.png": Case(encode(noise(20, 10000, 9), "PNG"), size=(20, 10000)),
        # PIL does not check IDAT CRCs; the pixel data is intact, so this is a good image
        "good/idat-bad-crc.png": Case(corrupt_crc(plain_png, b"IDAT"), size=(40, 30)),
        # bad: a failed image whose error says why
        "bad/truncated-jpeg.jpg": Case(plain_jpeg[: len(plain_jpeg) // 2], error="cannot decode image: image file is truncated"),
        "bad/truncated-png.png": Case(plain_png[: len(plain_png) // 2], error="cannot decode image: image file is truncated"),
        "bad/zero-bytes.jpg": Case(b"", error="empty file (0 bytes)"),
        "bad/text.jpg": Case(b"Not an image.\nJust some text in a file named .jpg\n" * 20,
                             error="cannot decode image: not a recognised image format"),
        "bad/bomb.png": Case(png_bomb(30000, 30000),
                             error="image is 900,000,000 pixels, above the limit of 100,000,000 (raise --max-pixels"),
        "bad/header-bad-crc.png": Case(corrupt_crc(plain_png, b"IHDR"),
                                       error="cannot decode image: corrupt PNG file: broken PNG file (bad header checksum"),
        "bad/postscript.jpg": Case(encode(noise(8, 8), "EPS"),
                                   error="cannot decode image: unsupported image format EPS"),
        "bad/random.jpg": Case(np.random.default_rng(10).bytes(1 << 20),
                               error="cannot decode image: not a recognised image format"),
    }


HUGE_KEY = "bad/huge-random.jpg"      # 50 MB of random bytes, only in the end-to-end test
HUGE_BYTES = 50 * 1024 * 1024
E2E_MAX_BYTES = 20_000_000
HUGE_ERROR = f"file is {HUGE_BYTES:,} bytes, above the limit of {E2E_MAX_BYTES:,} (raise --max-bytes"

# --------------------------------------------------------------------------------------------
# Unit level: decode_image

CORPUS = corpus()


@pytest.mark.parametrize("key", sorted(CORPUS))
def test_decode_gives_rgb_at_displayed_size_or_a_clear_error(key):
    case = CORPUS[key]
    if case.error:
        with pytest.raises(ImageDecodeError) as raised:
            decode_image(case.data)
        assert case.error in str(raised.value)
    else:
        image = decode_image(case.data)
        assert image.mode == "RGB" and image.size == case.size


def test_first_frame_of_animations():
    for key in ("good/animated.webp", "good/animated-gif-named.png"):
        pixels = np.asarray(decode_image(CORPUS[key].data))
        assert pixels[0, 0].tolist() == [255, 0, 0], key


def test_exif_rotation_gives_the_displayed_orientation():
    image = np.asarray(decode_image(CORPUS["good/exif-rotated.jpg"].data))
    assert image.shape == (60, 30, 3)
    top = image[:5].mean(axis=(0, 1))
    assert top[2] > 200 and top[0] < 60               # the stored left band is now on top


def test_transparency_and_16_bit_are_converted_sensibly():
    rgba = np.asarray(decode_image(CORPUS["good/rgba.png"].data))
    assert (rgba[:, :8] == 255).all()                  # transparent band shown on white
    gray = np.asarray(decode_image(CORPUS["good/gray16.png"].data))
    assert gray.min() < 20 and gray.max() > 235        # the 16-bit range mapped, not clipped
    assert np.asarray(decode_image(CORPUS["good/one-pixel.png"].data))[0, 0].tolist() == [9, 99, 199]


def test_bomb_is_refused_before_decoding():
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="900,000,000 pixels"):
        decode_image(CORPUS["bad/bomb.png"].data)
    assert time.perf_counter() - start < 1.0           # 900 MB never allocated
    with pytest.raises(ImageDecodeError, match="above the limit of 1,000"):
        decode_image(encode(Image.new("RGB", (40, 30)), "PNG"), max_pixels=1_000)


def test_pixel_limit_is_ours_not_pils(monkeypatch):
    """PIL warns above 89 Mpx and refuses above 179 Mpx by itself; --max-pixels decides instead.
    A header claiming 95 Mpx (default limit 100 M) or 200 Mpx (limit 300 M) gets past the size
    check, so its short data is what fails."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)   # restored afterwards
    small = encode(Image.new("L", (8, 8)), "PNG")
    for (width, height), limit in [((10000, 9500), 100_000_000), ((20000, 10000), 300_000_000)]:
        with pytest.raises(ImageDecodeError) as raised:
            decode_image(patch_png_size(small, width, height), max_pixels=limit)
        assert "truncated" in str(raised.value) and "pixels" not in str(raised.value)
    with pytest.raises(ImageDecodeError, match="above the limit of 300,000,000"):
        decode_image(patch_png_size(small, 30000, 30000), max_pixels=300_000_000)


def test_byte_limit():
    with pytest.raises(ImageDecodeError, match=r"file is 1,001 bytes, above the limit of 1,000 \(raise --max-bytes"):
        decode_image(b"\0" * 1001, max_bytes=1000)
    check_bytes(None, 1000)                            # unknown size: decided after download
    check_bytes(5_000, None)                           # no limit
    with pytest.raises(ImageDecodeError, match="above the limit"):
        check_bytes(1001, 1000)


def test_large_random_file_fails_cleanly():
    data = os.urandom(HUGE_BYTES)
    with pytest.raises(ImageDecodeError, match="not a recognised image format"):
        decode_image(data)


@pytest.mark.parametrize("size, expected", [
    ((10000, 20), (3, 1500)),          # DETR's rule: short side round(1333·20/10000) = 3
    ((20, 10000), (1500, 3)),
    ((1, 5000), (1333, 1)),            # the rule would give 0 px: one pixel across, long = max
])
def test_processed_size_of_extreme_aspect_ratios(size, expected):
    assert processed_size(*size) == expected


def test_processed_size_never_zero():
    for width, height in [(10000, 20), (20, 10000), (1, 100_000), (100_000, 1), (1, 1)]:
        h, w = processed_size(width, height, 64, 128)
        assert 1 <= h <= 1333 and 1 <= w <= 1333


def test_model_handles_strips_one_feature_row_high():
    predictor = Predictor(ModelConfig(model="detr-r50", weights="random", min_size=64, max_size=128,
                                      threshold=0.0, device="cpu", batch_size=2))
    strips = [Image.new("RGB", (10000, 20), (200, 30, 30)), Image.new("RGB", (20, 10000), (30, 200, 30))]
    results = predictor.predict_batch(strips + [Image.new("RGB", (60, 40))])
    assert [r["id_map"].shape for r in results] == [(20, 10000), (10000, 20), (40, 60)]
    for result in results:
        assert np.array_equal(decode_ids(result["png"]), result["id_map"])
        assert sum(s["area"] for s in result["segments_info"]) == int((result["id_map"] > 0).sum())


# --------------------------------------------------------------------------------------------
# End to end: SeaweedFS + submit + one worker on Redis and PostgreSQL


def test_bad_input_end_to_end(services_env, s3_bucket, tmp_path):
    env, queue = services_env
    s3 = boto3.client("s3")
    cases = corpus()
    for key, case in cases.items():
        s3.put_object(Bucket=s3_bucket, Key=f"in/{key}", Body=case.data)
    s3.put_object(Bucket=s3_bucket, Key=f"in/{HUGE_KEY}", Body=os.urandom(HUGE_BYTES))
    s3.put_object(Bucket=s3_bucket, Key="in/a-folder/", Body=b"")        # folder markers
    s3.put_object(Bucket=s3_bucket, Key="in/folder.jpg/", Body=b"")

    submitted = cli("submit", f"s3://{s3_bucket}/in", "--dest", f"s3://{s3_bucket}/out", "--queue", queue,
                    "--chunk-size", "5", "--max-bytes", str(E2E_MAX_BYTES), *MODEL_ARGS, env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]

    worker = start_worker(env, queue, tmp_path / "worker.log")
    try:
        status = wait_finished(job_id, env, timeout=300)
        alive = worker.poll() is None
    finally:
        stop_worker(worker)
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert alive, log[-3000:]
    assert "Traceback" not in log, log[-3000:]

    good = {k: c for k, c in cases.items() if c.size}
    bad = {k: c.error for k, c in cases.items() if c.error} | {HUGE_KEY: HUGE_ERROR}
    assert status["state"] == "partial", log[-3000:]
    assert (status["total"], status["succeeded"], status["failed"], status["pending"]) == \
        (len(good) + len(bad), len(good), len(bad), 0)

    rows = {row.key: row for row in JobStore(env["PANOPTIC_DATABASE_URL"]).images(job_id)}
    assert set(rows) == set(good) | set(bad)          # folder markers never registered
    for key, expected in bad.items():
        assert rows[key].state == "failed", key
        assert rows[key].error.startswith("ImageDecodeError: ") and expected in rows[key].error, (key, rows[key].error)
    for key, case in good.items():
        row = rows[key]
        assert row.state == "succeeded", (key, row.error)
        stem = key.rsplit(".", 1)[0]
        ids = decode_ids(s3.get_object(Bucket=s3_bucket, Key=f"out/{stem}.png")["Body"].read())
        document = json.loads(s3.get_object(Bucket=s3_bucket, Key=f"out/{stem}.json")["Body"].read())
        width, height = case.size
        assert ids.shape == (height, width) == (document["height"], document["width"]) == (row.height, row.width), key

    listed = {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket, Prefix="out/")
              for o in page.get("Contents", [])}
    stems = {k.rsplit(".", 1)[0] for k in good}
    assert listed == {f"out/{s}.png" for s in stems} | {f"out/{s}.json" for s in stems}
