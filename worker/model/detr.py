"""The DETR detector: backbone → input projection → transformer → class and box heads.

It is the `detr.` part of the panoptic checkpoints; `segmentation.py` adds the mask branch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import STAGE_CHANNELS, BackboneWithPositions
from .transformer import Transformer


class MLP(nn.Module):
    """Linear layers with ReLU between them (the box head: 3 layers, 256 → 256 → 256 → 4)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


@dataclass
class DetrFeatures:
    """What the mask branch needs from one detector pass over a batch of B images."""
    pred_logits: torch.Tensor      # [B, Q, num_classes + 1]
    pred_boxes: torch.Tensor       # [B, Q, 4] (cx, cy, w, h) in [0, 1] of the unpadded image
    queries: torch.Tensor          # [B, Q, d] decoded queries
    memory: torch.Tensor           # [B, d, h, w] encoder output at stride 32 (16 for DC5)
    projected: torch.Tensor        # [B, d, h, w] input projection of the last stage
    memory_mask: torch.Tensor      # [B, h, w] True on padding
    stages: list[torch.Tensor]     # backbone stages 1..4


class DETR(nn.Module):
    def __init__(self, depth: int, dilation: bool, num_classes: int = 250, num_queries: int = 100,
                 hidden_dim: int = 256, nheads: int = 8):
        super().__init__()
        self.backbone = BackboneWithPositions(depth, dilation)
        self.transformer = Transformer(d_model=hidden_dim, nhead=nheads)
        self.input_proj = nn.Conv2d(STAGE_CHANNELS[-1], hidden_dim, kernel_size=1)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor) -> DetrFeatures:
        stages, masks, pos = self.backbone(images, padding_mask)
        projected = self.input_proj(stages[-1])
        queries, memory = self.transformer(projected, masks[-1], self.query_embed.weight, pos)
        return DetrFeatures(
            pred_logits=self.class_embed(queries),
            pred_boxes=self.bbox_embed(queries).sigmoid(),
            queries=queries, memory=memory, projected=projected,
            memory_mask=masks[-1], stages=stages,
        )
