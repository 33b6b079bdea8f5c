"""A transformers `DetrForSegmentation` checkpoint's config.json, read without torch: which of this
project's variants it describes and its label map. `submit` reads it (it never imports torch);
worker.model.transformers_checkpoint maps the checkpoint's parameters.

Supported: the configurations the DETR panoptic checkpoints use — a ResNet-50 or ResNet-101
backbone, either timm's (`use_timm_backbone`, as the checkpoints converted from the original DETR,
`facebook/detr-resnet-50-panoptic`…) or transformers' own `ResNetConfig` (bottleneck blocks, stride
in the 3×3 convolution, DETR's widths); dilation (DC5) with timm's ResNet-50 (transformers' own
ResNet has none); sine position embeddings; d_model 256, 8 heads, 6 + 6 layers of width 2048, ReLU;
any number of queries and classes. Anything else is refused with the setting that differs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .config import VARIANTS
from .labels import LabelMap, LabelMapError, coco_label_map

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

# DETR's transformer and heads as worker.model builds them.
FIXED = {"d_model": 256, "encoder_attention_heads": 8, "decoder_attention_heads": 8, "encoder_layers": 6,
         "decoder_layers": 6, "encoder_ffn_dim": 2048, "decoder_ffn_dim": 2048, "activation_function": "relu",
         "position_embedding_type": "sine", "num_channels": 3}
# transformers' ResNetConfig settings that give torchvision's (and timm's) ResNet-50/101.
RESNET_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101}
RESNET_FIXED = {"layer_type": "bottleneck", "embedding_size": 64, "hidden_sizes": [256, 512, 1024, 2048],
                "hidden_act": "relu", "downsample_in_first_stage": False, "downsample_in_bottleneck": False,
                "num_channels": 3}
# DETR's name for an id that is no category.
PLACEHOLDER = "N/A"


class CheckpointError(ValueError):
    """A transformers checkpoint this project cannot run; the message says which setting."""


@dataclass(frozen=True)
class Architecture:
    depth: int          # ResNet depth
    dilation: bool      # DC5
    timm: bool          # timm's ResNet (torchvision's parameter names) or transformers' own


def architecture(config: dict, source: str) -> Architecture:
    """What the config describes, or CheckpointError naming the first unsupported setting."""
    if config.get("model_type") != "detr":
        raise CheckpointError(f"{source}: model_type {config.get('model_type')!r}, not a DETR checkpoint")
    architectures = config.get("architectures") or ["DetrForSegmentation"]
    if "DetrForSegmentation" not in architectures:
        raise CheckpointError(f"{source}: a {', '.join(map(str, architectures))} checkpoint; panoptic segmentation "
                              f"needs DetrForSegmentation (its mask head)")
    for key, expected in FIXED.items():
        if key in config and config[key] != expected:
            raise CheckpointError(f"{source}: {key} = {config[key]!r} is not supported (only DETR's {expected!r})")
    backbone = config.get("backbone_config") or {}
    dilation = bool(config.get("dilation", False))
    timm = backbone.get("model_type") == "timm_backbone" if backbone else config.get("use_timm_backbone", True)
    if timm:
        name = str(backbone.get("backbone") or config.get("backbone") or "resnet50")
        base = name.split(".")[0]              # "resnet50.a1_in1k": the same network, other weights
        depth = {"resnet50": 50, "resnet101": 101}.get(base)
        if depth is None:
            raise CheckpointError(f"{source}: timm backbone {name!r} is not supported (resnet50 or resnet101)")
        if backbone.get("output_stride") == 16:
            dilation = True
    else:
        if backbone.get("model_type") != "resnet":
            given = repr(backbone["model_type"]) if backbone.get("model_type") else "(no backbone_config)"
            raise CheckpointError(f"{source}: backbone {given} is not supported (a ResNet-50 or ResNet-101)")
        depth = RESNET_DEPTHS.get(tuple(backbone.get("depths") or ()))
        if depth is None:
            raise CheckpointError(f"{source}: ResNet depths {backbone.get('depths')} are not supported "
                                  f"(ResNet-50 [3, 4, 6, 3] or ResNet-101 [3, 4, 23, 3])")
        for key, expected in RESNET_FIXED.items():
            if key in backbone and backbone[key] != expected:
                raise CheckpointError(f"{source}: backbone {key} = {backbone[key]!r} is not supported "
                                      f"(only {expected!r})")
        if dilation:
            raise CheckpointError(f"{source}: dilation (DC5) with transformers' own ResNet is not supported "
                                  f"(transformers supports it only with timm's)")
    if dilation and depth != 50:
        raise CheckpointError(f"{source}: a dilated (DC5) ResNet-{depth} is not supported (only ResNet-50 DC5)")
    return Architecture(depth, dilation, bool(timm))


def label_map(config: dict, source: str) -> LabelMap | None:
    """The config's id2label as a label map ("N/A" entries are no category), or None without one.

    transformers' configs carry no thing/stuff flags: an id2label naming COCO panoptic categories
    by their COCO ids (the converted official checkpoints) is the COCO label map; any other counts
    every class as a thing (its segments are never merged) — give --categories for stuff."""
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        named = sorted((int(k), v) for k, v in id2label.items() if v != PLACEHOLDER)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: id2label keys must be integers ({exc})") from exc
    if not named:
        return None
    coco = coco_label_map()
    if all(coco.is_known(i) and coco.name(i) == name for i, name in named):
        return coco
    try:
        return LabelMap.from_categories([{"id": i, "name": name, "isthing": 1} for i, name in named],
                                        f"{source} id2label")
    except LabelMapError as exc:
        raise CheckpointError(str(exc)) from exc


@dataclass(frozen=True)
class CheckpointFolder:
    """A transformers checkpoint's files as read from a folder or an S3 prefix."""
    architecture: Architecture
    label_map: LabelMap | None      # the config's id2label
    config: bytes                   # config.json
    weights_path: str               # where its weights file is (for messages)
    weights: bytes                  # model.safetensors or pytorch_model.bin


def read_checkpoint_folder(read, location: str, source: str, variant: str) -> CheckpointFolder:
    """The checkpoint in `location` (`read(name)` gives a file's bytes, None where it is missing),
    its config checked against `variant`; else CheckpointError saying what is missing or which
    setting does not fit."""
    config_bytes = read(CONFIG_FILE)
    if config_bytes is None:
        raise CheckpointError(f"weights folder {location} has no {CONFIG_FILE}: a folder must hold a transformers "
                              f"DetrForSegmentation checkpoint (config.json + model.safetensors or pytorch_model.bin)")
    where = f"{location.rstrip('/')}/{CONFIG_FILE}"
    try:
        config = json.loads(config_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {where}: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{where} is not a JSON object")
    arch = architecture(config, where)
    names = label_map(config, where)
    matching = [v.name for v in VARIANTS.values() if (v.depth, v.dilation) == (arch.depth, arch.dilation)]
    if matching != [variant]:
        raise CheckpointError(f"{source} is a {matching[0]} checkpoint (ResNet-{arch.depth}"
                              f"{', dilated' if arch.dilation else ''}): pass --model {matching[0]}")
    for name in WEIGHT_FILES:
        data = read(name)
        if data is not None:
            return CheckpointFolder(arch, names, config_bytes, f"{location.rstrip('/')}/{name}", data)
    sharded = any(read(f"{name}.index.json") is not None for name in WEIGHT_FILES)
    raise CheckpointError(f"weights folder {location} has no {' or '.join(WEIGHT_FILES)}"
                          + (" (sharded checkpoints are not supported)" if sharded else ""))
