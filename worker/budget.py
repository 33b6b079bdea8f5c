"""A budget for decoded pixels in flight: what bounds a worker's memory under big images.

Each image in flight costs memory in proportion to its pixels (the decoded RGB image, then the
full-size id map and PNG of its result) from the moment it is decoded until its result is
recorded. Eight 100-megapixel images decoded at once took a worker to ~10 GB; with a budget,
images wait (their compressed bytes only) until the pixels in flight leave room for them. An
image larger than the whole budget still runs, alone.

``PANOPTIC_MAX_DECODED_PIXELS`` sets the budget (pixels; 0: no budget).
"""

from __future__ import annotations

import io
import os
import threading

from PIL import Image

__all__ = ["BUDGET_ENV", "DEFAULT_MAX_DECODED_PIXELS", "PixelBudget", "max_decoded_pixels", "pixels_of"]

BUDGET_ENV = "PANOPTIC_MAX_DECODED_PIXELS"
# One image at the default --max-pixels (100 M) at a time, or eight twelve-megapixel photos.
DEFAULT_MAX_DECODED_PIXELS = 100_000_000


def max_decoded_pixels() -> int | None:
    """The budget from the environment; None for none (0)."""
    value = os.environ.get(BUDGET_ENV, "").strip()
    try:
        limit = int(value) if value else DEFAULT_MAX_DECODED_PIXELS
    except ValueError:
        raise ValueError(f"{BUDGET_ENV}={value!r} is not a whole number of pixels") from None
    if limit < 0:
        raise ValueError(f"{BUDGET_ENV}={value!r}: the budget cannot be negative")
    return limit or None


def pixels_of(data: bytes) -> int:
    """Width × height from the image's header, without decoding it; 0 when it has no readable
    header (decoding it will fail, with the reason)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception:
        return 0
    return width * height


class PixelBudget:
    """Pixels of the images decoded and not yet finished, at most ``limit`` (None: unbounded);
    thread-safe. ``peak`` is the most ever in flight at once."""

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self.in_use = 0
        self.peak = 0
        self._held: dict[int, int] = {}
        self._changed = threading.Condition()

    def try_acquire(self, image_id: int, pixels: int) -> bool:
        """Take room for the image's pixels if there is room, or if nothing else is in flight
        (an image larger than the budget runs alone)."""
        with self._changed:
            if self.limit is not None and self.in_use and self.in_use + pixels > self.limit:
                return False
            self._held[image_id] = self._held.get(image_id, 0) + pixels
            self.in_use += pixels
            self.peak = max(self.peak, self.in_use)
            return True

    def release(self, image_id: int) -> None:
        """The image is finished (recorded, failed, refused): its room is free. Idempotent."""
        with self._changed:
            self.in_use -= self._held.pop(image_id, 0)
            self._changed.notify_all()

    def wait_for_room(self, timeout: float) -> None:
        """Until some image is released (or ``timeout`` seconds)."""
        with self._changed:
            self._changed.wait(timeout)
