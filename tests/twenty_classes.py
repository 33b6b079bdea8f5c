"""A checkpoint with its own classes, for the tests of custom label maps (tests/conftest.py's
``twenty_classes`` builds it once per session).

Twenty categories with ids 1..20, as a dataset annotated from 1 would have them: DETR then builds
num_classes = 21 (ids 0..20) and a class head of 22 rows (with "no object"). The head is confident
in id 15 for every query, so that the (collapsed) random model's output is known: one segment of
"water", which this map makes stuff (COCO's id 15, "bench", is a thing).
"""

from __future__ import annotations

import json
from pathlib import Path

VARIANT = "detr-r50"
CATEGORIES = [{"id": i, "name": f"part-{i}", "isthing": int(i <= 12), "color": [10 * i, 255 - 10 * i, 7],
               "supercategory": "parts"} for i in range(1, 21)]
CATEGORIES[15 - 1].update(name="water", isthing=0)          # id 15: stuff
NUM_CLASSES = 21
WATER = 15


def write_checkpoint(folder: Path):
    """(checkpoint path, its state dict, label map path) in `folder`."""
    import torch

    from worker.model import create_model

    state = create_model(VARIANT, seed=2, num_classes=NUM_CLASSES).state_dict()
    assert state["detr.class_embed.weight"].shape == (NUM_CLASSES + 1, 256)
    state["detr.class_embed.weight"].mul_(0.01)
    state["detr.class_embed.bias"].zero_()
    state["detr.class_embed.bias"][WATER] = 12.0
    path = folder / "detr-r50-parts.pth"
    torch.save({"model": state}, path)
    categories = folder / "parts.json"
    categories.write_text(json.dumps({"info": {}, "images": [], "annotations": [], "categories": CATEGORIES}))
    return path, state, categories
