"""Batches of images with similar shapes: padding a batch to its largest image costs compute."""

from __future__ import annotations

import math

from .preprocess import processed_size


class AspectBatcher:
    """Forms batches of decoded images with similar aspect ratios, as they arrive.

    Images go into buckets by the log of their processed height/width (bins of 2^(1/4), about
    19%: 4:3 and 3:2 share one); a bucket that reaches `batch_size` is a batch. `flush` sorts
    what is left by aspect ratio and cuts it into as few batches as possible.
    """

    def __init__(self, batch_size: int, min_size: int, max_size: int):
        self.batch_size, self.min_size, self.max_size = batch_size, min_size, max_size
        self._buckets: dict[int, list] = {}

    def _aspect(self, item) -> float:
        h, w = processed_size(item.image.width, item.image.height, self.min_size, self.max_size)
        return math.log2(h / w)

    def add(self, item) -> list | None:
        bucket = self._buckets.setdefault(round(self._aspect(item) * 4), [])
        bucket.append(item)
        if len(bucket) < self.batch_size:
            return None
        batch, bucket[:] = list(bucket), []
        return batch

    @property
    def held(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def take_largest(self) -> list:
        """The fullest bucket as a (short) batch: when memory allows no more waiting."""
        key = max(self._buckets, key=lambda k: len(self._buckets[k]))
        return self._buckets.pop(key)

    def flush(self) -> list[list]:
        rest = sorted((i for b in self._buckets.values() for i in b), key=self._aspect)
        self._buckets.clear()
        return [rest[i:i + self.batch_size] for i in range(0, len(rest), self.batch_size)]
