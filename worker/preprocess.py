"""Image bytes → the normalised, resized tensors DETR expects, and padded batches of them.

Decoding: EXIF orientation applied (results are in the displayed orientation), first frame of
animations, any mode converted to RGB. Resizing: shortest side `min_size` with the longest side
at most `max_size` (DETR's evaluation rule), bilinear with antialiasing, then ImageNet mean/std.
"""

from __future__ import annotations

import functools
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIZE, DEFAULT_MIN_SIZE

# The only formats PIL may parse: those of the listed extensions (JPEG includes multi-picture
# MPO), plus GIF found under them. Never EPS (Ghostscript) or PIL's many rarely used parsers.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageDecodeError(ValueError):
    """The bytes are not an image we can use; the message says why."""


def check_bytes(size: int | None, max_bytes: int | None = DEFAULT_MAX_BYTES) -> None:
    """ImageDecodeError if a file of `size` bytes is above `max_bytes` (None: no limit)."""
    if size is not None and max_bytes is not None and size > max_bytes:
        raise ImageDecodeError(f"file is {size:,} bytes, above the limit of {max_bytes:,} "
                               f"(raise --max-bytes to accept it)")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_bytes: int | None = DEFAULT_MAX_BYTES) -> Image.Image:
    """Bytes → RGB PIL image in its displayed orientation, or ImageDecodeError."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    check_bytes(len(data), max_bytes)
    # PIL's own bomb check (a warning above MAX_IMAGE_PIXELS, an error above twice that) must never
    # refuse what --max-pixels accepts; it stays on for what our check below does not see (GIF
    # frames larger than the canvas, TIFF tiles). Only ever raised, so threads cannot undo it.
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(f"image is {width}×{height} = {width * height:,} pixels, above the "
                                       f"limit of {max_pixels:,} (raise --max-pixels to accept it)")
            image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise ImageDecodeError(f"image is {size}, above the limit of {max_pixels:,} (raise --max-pixels "
                               f"to accept it); refused before decoding") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"cannot decode image: {_unidentified_reason(data)}") from exc
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError…) for bad files
        raise ImageDecodeError(f"cannot decode image: {exc or type(exc).__name__}") from exc


def _unidentified_reason(data: bytes) -> str:
    """Why Image.open refused `data`: a corrupt file of a format we read (the parser's reason),
    a format we do not read, or no image format at all."""
    Image.init()
    prefix = data[:16]
    claimed = []
    for fmt, (factory, accept) in Image.OPEN.items():
        try:
            verdict = accept(prefix) if accept is not None else False
        except Exception:
            continue
        if verdict and not isinstance(verdict, str):   # a str is PIL's "looks like it, but…"
            claimed.append((fmt, factory))
    for fmt, factory in claimed:
        if fmt in SUPPORTED_FORMATS:
            try:
                factory(io.BytesIO(data), "")
            except Exception as exc:
                return f"corrupt {fmt} file: {exc or type(exc).__name__}"
            return f"corrupt {fmt} file"
    if claimed:
        return (f"unsupported image format {claimed[0][0]} (supported: JPEG, PNG, WebP, BMP, TIFF, GIF)")
    return "not a recognised image format"


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):
        # 16-bit grayscale (PIL's "I;16*" or "I"): map the 16-bit range to 8 bits, since
        # PIL's own convert clips everything above 255 to white.
        array = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.rint(array).clip(0, 255).astype(np.uint8))
    elif image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparency over white, the way the image is shown to a person.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def processed_size(width: int, height: int, min_size: int = DEFAULT_MIN_SIZE,
                   max_size: int = DEFAULT_MAX_SIZE) -> tuple[int, int]:
    """(h, w) after resizing the shortest side to `min_size`, the longest kept ≤ `max_size`."""
    short, long = min(width, height), max(width, height)
    size = min_size
    if long / short * size > max_size:
        size = int(round(max_size * short / long))
    if size < 1:
        # Aspect ratios beyond 2·max_size : 1 (a 10000×20 strip at max_size 128): DETR's rule
        # would make the short side 0 px. Keep one pixel across, the long side at max_size.
        return (max_size, 1) if width < height else (1, max_size)
    if short == size:
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


class RGBImage:
    """A decoded image as a uint8 [h, w, 3] tensor, made off the model thread (by the worker's
    download threads) so that the model thread only stages, resizes and normalises batches.

    Quacks like the PIL image it came from where the worker looks (width, height, size);
    `pil()` gives a PIL image again (a copy; only overlays need one)."""

    __slots__ = ("pixels",)

    def __init__(self, pixels: torch.Tensor):
        self.pixels = pixels

    @classmethod
    def from_pil(cls, image: Image.Image) -> RGBImage:
        return cls(torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()))

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as PIL's Image.size."""
        return self.width, self.height

    def pil(self) -> Image.Image:
        return Image.fromarray(self.pixels.numpy())


def rgb_pixels(image: Image.Image | RGBImage) -> torch.Tensor:
    """uint8 [h, w, 3] pixels of a PIL RGB image or an RGBImage (the latter without a copy)."""
    if isinstance(image, RGBImage):
        return image.pixels
    return RGBImage.from_pil(image).pixels


@functools.lru_cache(maxsize=8)
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std ×255 as [1, 3, 1, 1] on `device`: made once, since each
    torch.tensor(..., device="cuda") is a blocking copy from pageable memory."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255.0
    return mean, std


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean, std = _mean_std(x.device)
    return (x - mean) / std


def _resized(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [n, h, w, 3] (all one size) → normalised float32 [n, 3, *size]: one batched op
    per step. The per-image and batched forms give the same bits (tests/test_preprocess.py)."""
    x = pixels.permute(0, 3, 1, 2).float()
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return _normalise(x)


def image_tensor(image: Image.Image | RGBImage, size: tuple[int, int],
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """RGB image → normalised float32 [3, h, w] at `size` (h, w), resized on `device`."""
    pixels = rgb_pixels(image)
    if torch.device(device).type == "cuda":
        pixels = pixels.pin_memory().to(device, non_blocking=True)
    else:
        pixels = pixels.to(device)
    return _resized(pixels[None], size)[0]


@dataclass
class Batch:
    images: torch.Tensor         # [B, 3, H, W], zero beyond each image's own size
    padding_mask: torch.Tensor   # [B, H, W], True on padding
    sizes: list[tuple[int, int]] # each image's processed (h, w)


def pad_batch(tensors: list[torch.Tensor]) -> Batch:
    """Zero-pad [3, h_i, w_i] tensors to the batch's largest h and w, with a padding mask."""
    height = max(t.shape[1] for t in tensors)
    width = max(t.shape[2] for t in tensors)
    first = tensors[0]
    images = first.new_zeros((len(tensors), 3, height, width))
    mask = torch.ones((len(tensors), height, width), dtype=torch.bool, device=first.device)
    for i, t in enumerate(tensors):
        images[i, :, : t.shape[1], : t.shape[2]] = t
        mask[i, : t.shape[1], : t.shape[2]] = False
    return Batch(images, mask, [(t.shape[1], t.shape[2]) for t in tensors])


class PinnedStaging:
    """Reused page-locked host buffers through which a batch's pixels go to the GPU in one copy.

    A fresh page-locked allocation per image (`Tensor.pin_memory()`) costs more than the copy it
    speeds up; these buffers are allocated once, grown when a batch needs more, and used in turn:
    a buffer is written again only once the device has finished reading it (its CUDA event)."""

    def __init__(self, device: torch.device, count: int = 3):
        self.device = device
        self._buffers: list[torch.Tensor | None] = [None] * count
        self._copied: list[torch.cuda.Event | None] = [None] * count
        self._next = 0
        self.allocations = 0            # page-locked allocations made (tests: reuse, not one per batch)

    def to_device(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        """uint8 host tensors → the same tensors on the device, through one host-to-device copy
        queued on the current stream (the caller does not wait for it)."""
        total = sum(p.numel() for p in pixels)
        slot = self._next
        self._next = (slot + 1) % len(self._buffers)
        if self._copied[slot] is not None:
            self._copied[slot].synchronize()        # the copy from this buffer, batches ago
        buffer = self._buffers[slot]
        if buffer is None or buffer.numel() < total:
            # Some headroom, so that a slightly larger batch later does not allocate again.
            buffer = self._buffers[slot] = torch.empty(total + total // 4, dtype=torch.uint8, pin_memory=True)
            self.allocations += 1
        staged = pack_pixels(pixels, buffer[:total])
        on_device = staged.to(self.device, non_blocking=True)
        copied = self._copied[slot] = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(self.device))
        out, start = [], 0
        for p in pixels:
            out.append(on_device[start:start + p.numel()].view(p.shape))
            start += p.numel()
        return out


def pack_pixels(pixels: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """uint8 tensors, one after the other, into the flat uint8 `out` (their total size).

    numpy copies, not `torch.cat(..., out=)`: torch's CPU ops run on its intra-op thread pool,
    which in a worker with a few dozen busy Python threads took 80 ms per 15 MB batch on a
    16-core GPU machine (py-spy, 2026-12-04) and 100× a single thread's time on 2 cores; numpy
    copies on the calling thread, without the GIL."""
    flat = out.numpy()
    start = 0
    for p in pixels:
        source = p.numpy().reshape(-1)
        flat[start:start + source.size] = source
        start += source.size
    if start != flat.size:
        raise ValueError(f"{start} pixel bytes for a buffer of {flat.size}")
    return out


def prepare_batch(images: list[Image.Image | RGBImage], sizes: list[tuple[int, int]],
                  device: torch.device, staging: PinnedStaging | None = None) -> Batch:
    """Images → the padded, normalised batch at their processed `sizes`, on `device`.

    The pixels go to the device as uint8 (on CUDA through `staging`, one copy per batch); then
    the images that share a source size and a processed size (most of a COCO-like batch) are
    resized and normalised together, one batched op each, and written into the padded batch.
    Results equal `pad_batch([image_tensor(...) ...])`, bit for bit on the CPU."""
    pixels = [rgb_pixels(image) for image in images]
    if device.type == "cuda" and staging is not None:
        pixels = staging.to_device(pixels)
    else:
        pixels = [p.to(device) for p in pixels]
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    batch = torch.zeros((len(images), 3, height, width), device=device)
    mask = torch.ones((len(images), height, width), dtype=torch.bool, device=device)
    groups: dict[tuple, list[int]] = {}
    for i, (p, size) in enumerate(zip(pixels, sizes)):
        groups.setdefault((tuple(p.shape), tuple(size)), []).append(i)
    for (_, (h, w)), members in groups.items():
        resized = _resized(torch.stack([pixels[i] for i in members]), (h, w))
        if len(members) == len(images) and (h, w) == (height, width):
            batch = resized
        else:
            for j, i in enumerate(members):
                batch[i, :, :h, :w] = resized[j]
        for i in members:           # slices, not an index list (a blocking host-to-device copy)
            mask[i, :h, :w] = False
    return Batch(batch, mask, [tuple(size) for size in sizes])
