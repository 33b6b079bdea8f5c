"""Image bytes → the normalised, resized tensors DETR expects, and padded batches of them.

Decoding: EXIF orientation applied (results are in the displayed orientation), first frame of
animations, any mode converted to RGB. Resizing: shortest side `min_size` with the longest side
at most `max_size` (DETR's evaluation rule), bilinear with antialiasing, then ImageNet mean/std.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MIN_SIZE = 800
DEFAULT_MAX_SIZE = 1333
# Refuse images above this many pixels before decoding them (decompression bombs).
DEFAULT_MAX_PIXELS = 100_000_000
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageDecodeError(ValueError):
    """The bytes are not an image we can use; the message says why."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes → RGB PIL image in its displayed orientation, or ImageDecodeError."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(f"image is {width}×{height} = {width * height:,} pixels, above the "
                                       f"limit of {max_pixels:,} (raise --max-pixels to accept it)")
            image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"refused as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("cannot decode image: not a recognised image format") from exc
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError…) for bad files
        raise ImageDecodeError(f"cannot decode image: {exc}") from exc
    return to_rgb(image)


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
    if short == size:
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def image_tensor(image: Image.Image, size: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """RGB image → normalised float32 [3, h, w] at `size` (h, w), resized on `device`."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).to(device)
    x = pixels.permute(2, 0, 1)[None].float()
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255.0
    return ((x - mean) / std)[0]


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
