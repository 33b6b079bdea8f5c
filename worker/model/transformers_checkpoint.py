"""Hugging Face transformers `DetrForSegmentation` checkpoints → this project's model.

A folder saved by `save_pretrained` holds `config.json` and `model.safetensors` (or
`pytorch_model.bin`). Its architecture is read from the config and checked against what
`worker.model` builds (worker.transformers_config, which says what is supported); its parameter
names are mapped onto ours (transformers splits each attention's packed input projection into
q/k/v and names layers differently; the mask branch keeps DETR's names). transformers itself is
not needed.
"""

from __future__ import annotations

import re

import torch

from ..transformers_config import (CONFIG_FILE, WEIGHT_FILES, Architecture, CheckpointError,  # noqa: F401
                                   architecture, label_map)

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
