"""Decoding and resizing as DETR was evaluated, and the padded batches the model sees."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from worker.preprocess import (IMAGENET_MEAN, IMAGENET_STD, ImageDecodeError, decode_image, image_tensor,
                               pad_batch, processed_size)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("size, expected", [
    ((640, 480), (800, 1066)),      # (w, h) → (h, w): shortest side to 800
    ((480, 640), (1066, 800)),
    ((640, 427), (800, 1199)),
    ((2000, 500), (333, 1332)),     # longest side capped at 1333 (DETR rounds the short side)
    ((800, 800), (800, 800)),       # already at size: untouched
    ((1, 1), (800, 800)),
])
def test_processed_size(size, expected):
    assert processed_size(*size) == expected


def test_processed_size_custom_limits():
    assert processed_size(640, 480, min_size=400, max_size=600) == (400, 533)
    assert processed_size(640, 480, min_size=400, max_size=500) == (375, 500)


def test_exif_orientation_is_applied():
    # Stored 60 wide × 30 high, with orientation 6 ("rotate 90° clockwise to display").
    stored = Image.new("RGB", (60, 30), (255, 0, 0))
    stored.paste((0, 0, 255), (0, 0, 10, 30))    # blue band on the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    shown = decode_image(encode(stored, "JPEG", exif=exif, quality=95))
    assert shown.size == (30, 60)
    top = np.asarray(shown)[:5].mean(axis=(0, 1))
    assert top[2] > 200 and top[0] < 60            # the left band is now on top


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "1", "LA"])
def test_any_mode_becomes_rgb(mode):
    image = Image.new("RGB", (20, 10), (10, 200, 30)).convert(mode)
    decoded = decode_image(encode(image, "JPEG" if mode in ("L", "CMYK") else "PNG"))
    assert decoded.mode == "RGB" and decoded.size == (20, 10)


def test_transparent_pixels_are_shown_on_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(decode_image(encode(image, "PNG"))).min() == 255


def test_16_bit_grayscale_keeps_its_range():
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    decoded = decode_image(encode(Image.fromarray(values), "PNG"))
    assert np.asarray(decoded)[0, :, 0].tolist() == [0, 128, 255]


def test_animation_uses_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert np.asarray(decode_image(data))[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize("data, message", [
    (b"", "empty file"),
    (b"plain text, not an image", "cannot decode image"),
])
def test_bad_bytes_have_clear_errors(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data)


def test_truncated_jpeg_is_refused():
    data = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    with pytest.raises(ImageDecodeError, match="cannot decode image"):
        decode_image(data[: len(data) // 2])


def test_pixel_limit_is_checked_before_decoding():
    data = encode(Image.new("L", (300, 300)), "PNG")
    with pytest.raises(ImageDecodeError, match="90,000 pixels, above the limit of 50,000"):
        decode_image(data, max_pixels=50_000)


def test_image_tensor_normalises_with_imagenet_statistics():
    mean_colour = tuple(round(255 * m) for m in IMAGENET_MEAN)
    x = image_tensor(Image.new("RGB", (30, 20), mean_colour), (40, 60))
    assert x.shape == (3, 40, 60) and x.dtype == torch.float32
    assert x.abs().max() < 0.01
    white = image_tensor(Image.new("RGB", (30, 20), (255, 255, 255)), (20, 30))
    expected = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    assert torch.allclose(white[:, 0, 0], expected, atol=1e-5)


def test_pad_batch_zero_pads_and_masks():
    a, b = torch.ones(3, 4, 6), torch.full((3, 5, 3), 2.0)
    batch = pad_batch([a, b])
    assert batch.images.shape == (2, 3, 5, 6) and batch.sizes == [(4, 6), (5, 3)]
    assert torch.equal(batch.images[0, :, :4, :6], a) and batch.images[0, :, 4:].abs().sum() == 0
    assert torch.equal(batch.images[1, :, :5, :3], b) and batch.images[1, :, :, 3:].abs().sum() == 0
    assert batch.padding_mask[0].sum() == 5 * 6 - 4 * 6 and not batch.padding_mask[0, :4, :6].any()
    assert batch.padding_mask[1].sum() == 5 * 6 - 5 * 3 and not batch.padding_mask[1, :5, :3].any()


@pytest.mark.parametrize("min_size,max_size", [(800, 1333), (96, 160), (480, 640)])
def test_batched_preprocessing_equals_the_per_image_path_bit_for_bit(min_size, max_size):
    """prepare_batch resizes and normalises the images that share a size in one op; on the CPU the
    batch is exactly the per-image tensors padded together (what the model saw before)."""
    from worker.preprocess import RGBImage, prepare_batch

    rng = np.random.default_rng(3)
    shapes = [(640, 480), (640, 480), (480, 640), (640, 480), (500, 375), (33, 17), (480, 640)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in shapes]
    sizes = [processed_size(im.width, im.height, min_size, max_size) for im in images]
    for chosen in ([0, 1, 3], [0], list(range(len(images))), [2, 6, 0]):
        expected = pad_batch([image_tensor(images[i], sizes[i]) for i in chosen])
        # PIL images and RGBImages (what the worker's download threads make) alike.
        given = [RGBImage.from_pil(images[i]) if i % 2 else images[i] for i in chosen]
        batch = prepare_batch(given, [sizes[i] for i in chosen], torch.device("cpu"))
        assert torch.equal(batch.images, expected.images)
        assert torch.equal(batch.padding_mask, expected.padding_mask)
        assert batch.sizes == expected.sizes


def test_rgb_image_keeps_the_decoded_pixels_and_size():
    from worker.preprocess import RGBImage

    image = decode_image(encode(Image.new("RGB", (30, 20), (10, 200, 30)), "PNG"))
    rgb = RGBImage.from_pil(image)
    assert (rgb.width, rgb.height, rgb.size) == (30, 20, (30, 20))
    assert rgb.pixels.dtype == torch.uint8 and rgb.pixels.shape == (20, 30, 3)
    assert np.array_equal(np.asarray(rgb.pil()), np.asarray(image))


def test_pinned_staging_packs_a_batch_of_images_byte_for_byte():
    """The CUDA staging's host side (pack_pixels, run on CPU tensors): every image's bytes in order,
    whatever their sizes, and a buffer of the wrong size refused rather than half filled."""
    from worker.preprocess import pack_pixels

    generator = torch.Generator().manual_seed(3)
    pixels = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=generator)
              for h, w in [(48, 64), (7, 5), (64, 48)]]
    total = sum(p.numel() for p in pixels)
    packed = pack_pixels(pixels, torch.empty(total, dtype=torch.uint8))
    assert torch.equal(packed, torch.cat([p.reshape(-1) for p in pixels]))
    with pytest.raises(ValueError):
        pack_pixels(pixels, torch.empty(total + 1, dtype=torch.uint8))
