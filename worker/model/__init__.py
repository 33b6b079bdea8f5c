"""DETR panoptic models: `create_model(name, weights=None)`.

>>> model = create_model("detr-r101", weights="official")     # eval mode
>>> out = model(images, padding_mask)   # pred_logits [B,100,251], pred_boxes, pred_masks [B,100,H/4,W/4]

The class head's size and the number of queries come from the checkpoint (251 logits and 100
queries for the official ones): a model fine-tuned on other categories loads the same way, and
`model.num_classes` says how many class ids it predicts (ids 0..num_classes-1, then "no object").
"""

from __future__ import annotations

import torch

from ..config import DEFAULT_VARIANT, VARIANTS, VariantSpec
from ..labels import DETR_PANOPTIC_CLASSES
from .segmentation import DETRPanoptic, kept_queries
from .weights import RANDOM_SEED, LoadedWeights, WeightsError, load_weights, state_dict_sha256

__all__ = ["create_model", "DETRPanoptic", "VARIANTS", "DEFAULT_VARIANT", "VariantSpec", "WeightsError",
           "kept_queries", "load_weights"]


def build(name: str, num_classes: int = DETR_PANOPTIC_CLASSES, num_queries: int = 100) -> DETRPanoptic:
    """The architecture of a variant with PyTorch's default initialisation (not seeded)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(VARIANTS)}")
    spec = VARIANTS[name]
    return DETRPanoptic(depth=spec.depth, dilation=spec.dilation, num_classes=num_classes, num_queries=num_queries)


def create_model(name: str = DEFAULT_VARIANT, weights: str | None = None, seed: int = RANDOM_SEED,
                 num_classes: int = DETR_PANOPTIC_CLASSES) -> DETRPanoptic:
    """An eval-mode DETR panoptic model.

    weights: None or "random" → seeded initialisation (seed `seed`, global RNG untouched) with a
    head for `num_classes` class ids; "official", a path, s3://…, http(s)://…, file://… or a
    transformers checkpoint folder → that checkpoint, loaded strictly, its head as large as the
    checkpoint's. The SHA-256 of the weights is kept in `model.weights_sha256`; a label map that
    came with the weights (a transformers config's id2label) in `model.label_map`, else None.
    """
    if weights in (None, "random"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build(name, num_classes)
        model.weights_sha256 = state_dict_sha256(model.state_dict())
        model.weights_source = "random"
        model.label_map = None
    else:
        loaded = load_weights(weights, name)
        # Built without initialising (meta tensors), then given the checkpoint's tensors: a
        # random initialisation only to be overwritten costs ~1 s of start-up for R101.
        with torch.device("meta"):
            model = build(name, *_head_sizes(loaded.state_dict))
        load_strict(model, loaded, name)
        model.weights_sha256 = loaded.sha256
        model.weights_source = loaded.source
        model.label_map = loaded.label_map
    model.variant = name
    return model.eval()


def _head_sizes(state_dict: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(class ids, queries) of a checkpoint: class_embed has one row per id plus "no object"."""
    classes, queries = state_dict.get("detr.class_embed.weight"), state_dict.get("detr.query_embed.weight")
    return (classes.shape[0] - 1 if classes is not None and classes.dim() == 2 and classes.shape[0] > 1
            else DETR_PANOPTIC_CLASSES,
            queries.shape[0] if queries is not None and queries.dim() == 2 and queries.shape[0] > 0 else 100)


def load_strict(model: DETRPanoptic, loaded: LoadedWeights, name: str) -> None:
    """load_state_dict(strict=True), with an error that says what does not fit and why."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in loaded.state_dict]
    unexpected = [k for k in loaded.state_dict if k not in expected]
    misshapen = [k for k in expected if k in loaded.state_dict and loaded.state_dict[k].shape != expected[k].shape]
    if missing or unexpected or misshapen:
        hint = ""
        guess = _guess_variant(loaded.state_dict)
        if guess and guess != name:
            hint = f" It looks like a {guess} checkpoint: pass --model {guess}."
        detail = "; ".join(f"{label} {len(keys)} (e.g. {keys[0]})" for label, keys in
                           (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)) if keys)
        raise WeightsError(f"weights from {loaded.source} do not fit {name}: {detail}.{hint}")
    model.load_state_dict(loaded.state_dict, strict=True, assign=True)


def _guess_variant(state_dict: dict[str, torch.Tensor]) -> str | None:
    if "detr.class_embed.weight" not in state_dict:
        return None
    return "detr-r101" if "detr.backbone.0.body.layer3.22.conv1.weight" in state_dict else None
