"""Synthetic DETR panoptic outputs for testing and benchmarking the postprocessor.

A random-weights DETR collapses (all queries alike), so tests use outputs built here instead: a few
chosen confident queries with distinct smooth mask logits (a bowl around a centre plus smooth
ripples, so that partitions have curved boundaries and some small regions), the other queries
"no object" or unconfident. Everything is float32 and deterministic in the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from worker import categories

NUM_QUERIES = 100
NUM_CLASSES = 251          # 250 class indices (= COCO panoptic ids) + "no object"
NO_OBJECT = NUM_CLASSES - 1
STRIDE = 4


def thing_ids() -> list[int]:
    return [c["id"] for c in categories.categories() if c["isthing"]]


def stuff_ids() -> list[int]:
    return [c["id"] for c in categories.categories() if not c["isthing"]]


@dataclass
class SyntheticImage:
    processed_size: tuple[int, int]
    pred_logits: np.ndarray            # [Q, C+1]
    pred_masks: np.ndarray             # [Q, ceil(h/4), ceil(w/4)]
    pred_boxes: np.ndarray             # [Q, 4]
    kept: list[int] = field(default_factory=list)      # query indices meant to pass 0.85
    labels: dict[int, int] = field(default_factory=dict)  # kept query → category id


def smooth_field(rng: np.random.Generator, h: int, w: int, waves: int = 4, amplitude: float = 1.0) -> np.ndarray:
    """A smooth random field on an h × w grid: a sum of a few low-frequency plane waves."""
    y = np.linspace(0.0, 1.0, h, dtype=np.float64)[:, None]
    x = np.linspace(0.0, 1.0, w, dtype=np.float64)[None, :]
    out = np.zeros((h, w))
    for _ in range(waves):
        fy, fx = rng.uniform(-3.0, 3.0, 2)
        out += rng.uniform(0.3, 1.0) * np.sin(2 * math.pi * (fy * y + fx * x) + rng.uniform(0, 2 * math.pi))
    return amplitude * out / waves


def synthetic_image(rng: np.random.Generator, processed_size: tuple[int, int], n_kept: int, *,
                    num_queries: int = NUM_QUERIES, stuff_share: float = 0.4, duplicate_stuff: int = 0,
                    unknown_ids: int = 0, scale: float = 1.0) -> SyntheticImage:
    """One image's outputs with `n_kept` confident queries at random query slots.

    duplicate_stuff: how many extra kept queries reuse an already chosen stuff class (merging);
        none when no stuff class was chosen.
    unknown_ids: how many kept queries predict a class index that is no COCO category.
    scale: multiplies the mask logits.
    """
    h, w = processed_size
    h4, w4 = math.ceil(h / STRIDE), math.ceil(w / STRIDE)
    q = num_queries
    if n_kept + duplicate_stuff > q:
        raise ValueError("more kept queries than queries")

    logits = rng.normal(0.0, 0.5, (q, NUM_CLASSES)).astype(np.float32)
    kept = sorted(rng.choice(q, n_kept + duplicate_stuff, replace=False).tolist())
    things, stuff = thing_ids(), stuff_ids()
    known = set(things) | set(stuff)
    unknown = [i for i in range(NUM_CLASSES - 1) if i not in known]
    labels: dict[int, int] = {}
    order = list(kept)
    rng.shuffle(order)
    base, extra = order[:n_kept], order[n_kept:]
    for i, qi in enumerate(base):
        if i < unknown_ids:
            cat = int(rng.choice(unknown))
        elif rng.random() < stuff_share:
            cat = int(rng.choice(stuff))
        else:
            cat = int(rng.choice(things))
        labels[qi] = cat
    chosen_stuff = [c for c in labels.values() if not categories.isthing(c)]
    if chosen_stuff:
        for qi in extra:
            labels[qi] = int(rng.choice(chosen_stuff))
        kept = sorted(labels)
    else:                                       # nothing to duplicate
        kept = sorted(base)
    for qi in range(q):
        if qi in labels:
            logits[qi, labels[qi]] = rng.uniform(9.5, 13.0)
        elif rng.random() < 0.7:
            logits[qi, NO_OBJECT] = rng.uniform(6.0, 12.0)
        else:                                   # a real class, but far from confident
            logits[qi, int(rng.integers(0, NUM_CLASSES - 1))] = rng.uniform(1.0, 4.0)

    masks = np.empty((q, h4, w4), np.float32)
    yy = (np.arange(h4)[:, None] + 0.5) / h4
    xx = (np.arange(w4)[None, :] + 0.5) / w4
    for qi in range(q):
        # A bowl around a random centre: the kept queries split the image roughly like a Voronoi
        # diagram, with curved boundaries from the ripples; a few queries are weak (small or no
        # region, so that the small-segment loop has work to do).
        cy, cx = rng.uniform(0.0, 1.0, 2)
        sy, sx = rng.uniform(0.25, 0.5, 2)
        bowl = -((yy - cy) ** 2 / sy ** 2 + (xx - cx) ** 2 / sx ** 2)
        if qi in labels:
            bias = rng.uniform(-0.4, 0.4) if rng.random() < 0.85 else rng.uniform(-2.5, -1.0)
        else:
            bias = rng.uniform(-6.0, 0.0)
        masks[qi] = scale * (4.0 * (bowl + bias) + smooth_field(rng, h4, w4, amplitude=1.5))
    boxes = rng.uniform(0.05, 0.95, (q, 4)).astype(np.float32)
    return SyntheticImage((h, w), logits, masks, boxes, kept, labels)


def batch_outputs(images: list[SyntheticImage], pad_value: float | None = None,
                  rng: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
    """Stack images into one padded batch: each image's masks in the top-left corner of
    [B, Q, max h4, max w4]; the rest is `pad_value`, or large random garbage when None."""
    b = len(images)
    q = images[0].pred_masks.shape[0]
    h4 = max(im.pred_masks.shape[1] for im in images)
    w4 = max(im.pred_masks.shape[2] for im in images)
    if pad_value is None:
        rng = rng or np.random.default_rng(0)
        masks = rng.normal(0.0, 50.0, (b, q, h4, w4)).astype(np.float32)
    else:
        masks = np.full((b, q, h4, w4), pad_value, np.float32)
    for i, im in enumerate(images):
        masks[i, :, :im.pred_masks.shape[1], :im.pred_masks.shape[2]] = im.pred_masks
    return {
        "pred_logits": torch.from_numpy(np.stack([im.pred_logits for im in images])),
        "pred_boxes": torch.from_numpy(np.stack([im.pred_boxes for im in images])),
        "pred_masks": torch.from_numpy(masks),
    }


def synthetic_batch(seed: int, processed_sizes: list[tuple[int, int]], n_kept: int | list[int],
                    pad_value: float | None = None, **kwargs) -> tuple[dict[str, torch.Tensor], list[SyntheticImage]]:
    """A padded batch of synthetic outputs (see `synthetic_image` for kwargs)."""
    rng = np.random.default_rng(seed)
    counts = n_kept if isinstance(n_kept, list) else [n_kept] * len(processed_sizes)
    images = [synthetic_image(rng, size, n, **kwargs) for size, n in zip(processed_sizes, counts)]
    return batch_outputs(images, pad_value, rng), images


def single_outputs(image: SyntheticImage) -> dict[str, torch.Tensor]:
    """One image as a batch of one, unpadded."""
    return batch_outputs([image], pad_value=0.0)
