"""Hugging Face transformers `DetrForSegmentation` checkpoints → this project's model.

A folder saved by `save_pretrained` holds `config.json` and `model.safetensors` (or
`pytorch_model.bin`). Its architecture is read from the config and checked against what
`worker.model` builds; its parameter names are mapped onto ours (transformers splits each
attention's packed input projection into q/k/v and names layers differently; the mask branch
keeps DETR's names). transformers itself is not needed.

Supported: the configurations the DETR panoptic checkpoints use — a ResNet-50 or ResNet-101
backbone, either timm's (`use_timm_backbone`, as the checkpoints converted from the original DETR,
`facebook/detr-resnet-50-panoptic`…) or transformers' own `ResNetConfig` (bottleneck blocks, stride
in the 3×3 convolution, DETR's widths); dilation (DC5) with timm's ResNet-50 (transformers' own
ResNet has none); sine position embeddings; d_model 256, 8 heads, 6 + 6 layers of width 2048, ReLU;
any number of queries and classes. Anything else is refused with the setting that differs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..labels import LabelMap, LabelMapError, coco_label_map

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


_V5_TO_V4 = [  # transformers 5 renames some parameters when loading; its files keep the v4 names
    (r"^detr\.model\.backbone\.model\.", "detr.model.backbone.conv_encoder.model."),
    (r"\.o_proj\.", ".out_proj."),
    (r"\.layers\.(\d+)\.mlp\.fc([12])\.", r".layers.\1.fc\2."),
    (r"^bbox_attention\.q_proj\.", "bbox_attention.q_linear."),
    (r"^bbox_attention\.k_proj\.", "bbox_attention.k_linear."),
    (r"^mask_head\.conv1\.conv\.", "mask_head.lay1."),
    (r"^mask_head\.conv1\.norm\.", "mask_head.gn1."),
    (r"^mask_head\.conv2\.conv\.", "mask_head.lay2."),
    (r"^mask_head\.conv2\.norm\.", "mask_head.gn2."),
    (r"^mask_head\.fpn_stages\.(\d)\.fpn_adapter\.", lambda m: f"mask_head.adapter{int(m[1]) + 1}."),
    (r"^mask_head\.fpn_stages\.(\d)\.refine\.conv\.", lambda m: f"mask_head.lay{int(m[1]) + 3}."),
    (r"^mask_head\.fpn_stages\.(\d)\.refine\.norm\.", lambda m: f"mask_head.gn{int(m[1]) + 3}."),
    (r"^mask_head\.output_conv\.", "mask_head.out_lay."),
]

_HF_RESNET = [  # transformers' ResNet → torchvision's names
    (r"^embedder\.embedder\.convolution\.", "conv1."),
    (r"^embedder\.embedder\.normalization\.", "bn1."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d)\.convolution\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d)\.normalization\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.", lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.", lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1."),
]

_ENCODER_LAYER = {"self_attn.out_proj": "self_attn.out_proj", "self_attn_layer_norm": "norm1",
                  "fc1": "linear1", "fc2": "linear2", "final_layer_norm": "norm2"}
_DECODER_LAYER = {"self_attn.out_proj": "self_attn.out_proj", "self_attn_layer_norm": "norm1",
                  "encoder_attn.out_proj": "multihead_attn.out_proj", "encoder_attn_layer_norm": "norm2",
                  "fc1": "linear1", "fc2": "linear2", "final_layer_norm": "norm3"}
_PREFIXES = [("detr.model.input_projection.", "detr.input_proj."),
             ("detr.model.query_position_embeddings.", "detr.query_embed."),
             ("detr.model.decoder.layernorm.", "detr.transformer.decoder.norm."),
             ("detr.class_labels_classifier.", "detr.class_embed."),
             ("detr.bbox_predictor.", "detr.bbox_embed.")]
_BACKBONE = "detr.model.backbone.conv_encoder.model."
_LAYER = re.compile(r"^detr\.model\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_PROJECTION = re.compile(r"^(self_attn|encoder_attn)\.([qkv])_proj$")


def _rename(key: str, rules) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def convert_state_dict(state_dict: dict[str, torch.Tensor], arch: Architecture) -> dict[str, torch.Tensor]:
    """transformers' parameter names → worker.model's. Keys it does not know are kept as they are
    (the strict load then names them)."""
    out: dict[str, torch.Tensor] = {}
    packed: dict[tuple[str, str], dict[str, torch.Tensor]] = {}   # (attention, weight|bias) → q, k, v
    for key, tensor in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        key = _rename(key, _V5_TO_V4)
        if key.startswith(_BACKBONE):
            inner = key[len(_BACKBONE):]
            out["detr.backbone.0.body." + (inner if arch.timm else _rename(inner, _HF_RESNET))] = tensor
            continue
        layer = _LAYER.match(key)
        if layer:
            stack, index, module, kind = layer.groups()
            ours = "multihead_attn" if module.startswith("encoder_attn") else "self_attn"
            prefix = f"detr.transformer.{stack}.layers.{index}."
            projection = _PROJECTION.match(module)
            if projection:
                packed.setdefault((prefix + ours, kind), {})[projection[2]] = tensor
                continue
            names = _ENCODER_LAYER if stack == "encoder" else _DECODER_LAYER
            if module in names:
                out[f"{prefix}{names[module]}.{kind}"] = tensor
                continue
        for theirs, ours_prefix in _PREFIXES:
            if key.startswith(theirs):
                key = ours_prefix + key[len(theirs):]
                break
        out[key] = tensor
    for (attention, kind), parts in packed.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{attention}: the checkpoint has only the {'/'.join(sorted(parts))} "
                                  f"projection(s) of an attention")
        # torch's MultiheadAttention packs the projections as rows q, k, v
        out[f"{attention}.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out
