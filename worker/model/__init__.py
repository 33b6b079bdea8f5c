"""DETR panoptic models: `create_model(name, weights=None)`.

>>> model = create_model("detr-r101", weights="official")     # eval mode
>>> out = model(images, padding_mask)   # pred_logits [B,100,251], pred_boxes, pred_masks [B,100,H/4,W/4]
"""

from __future__ import annotations

import torch

from ..config import DEFAULT_VARIANT, VARIANTS, VariantSpec
from .segmentation import DETRPanoptic, kept_queries
from .weights import RANDOM_SEED, LoadedWeights, WeightsError, load_weights, state_dict_sha256

__all__ = ["create_model", "DETRPanoptic", "VARIANTS", "DEFAULT_VARIANT", "VariantSpec", "WeightsError",
           "kept_queries", "load_weights"]


def build(name: str) -> DETRPanoptic:
    """The architecture of a variant with PyTorch's default initialisation (not seeded)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(VARIANTS)}")
    spec = VARIANTS[name]
    return DETRPanoptic(depth=spec.depth, dilation=spec.dilation)


def create_model(name: str = DEFAULT_VARIANT, weights: str | None = None, seed: int = RANDOM_SEED) -> DETRPanoptic:
    """An eval-mode DETR panoptic model.

    weights: None or "random" → seeded initialisation (seed `seed`, global RNG untouched);
    "official", a path, s3://…, http(s)://… or file://… → that checkpoint, loaded strictly.
    The SHA-256 of the weights is kept in `model.weights_sha256`.
    """
    if weights in (None, "random"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build(name)
        model.weights_sha256 = state_dict_sha256(model.state_dict())
        model.weights_source = "random"
    else:
        loaded = load_weights(weights, name)
        # Built without initialising (meta tensors), then given the checkpoint's tensors: a
        # random initialisation only to be overwritten costs ~1 s of start-up for R101.
        with torch.device("meta"):
            model = build(name)
        load_strict(model, loaded, name)
        model.weights_sha256 = loaded.sha256
        model.weights_source = loaded.source
    model.variant = name
    return model.eval()


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
