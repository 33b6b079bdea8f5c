"""Sine positional encoding of a feature map, as DETR was trained with.

For a feature map of shape [B, C, h, w] and its padding mask [B, h, w] (True on padding) it
returns [B, 2*num_pos_feats, h, w]: the first half encodes the row, the second the column, each
as interleaved sin/cos of the normalised cumulative position over the *valid* pixels, so that a
padded image sees the same encoding over its own region as it would alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SinePositionEncoding(nn.Module):
    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale

    def forward(self, padding_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """padding_mask [B, h, w] bool → encoding [B, 2*num_pos_feats, h, w] of `dtype`.

        Computed in float32 and cast, as the original does, so a float64 model matches it too.
        """
        valid = ~padding_mask
        rows = valid.cumsum(1, dtype=torch.float32)
        cols = valid.cumsum(2, dtype=torch.float32)
        eps = 1e-6
        rows = rows / (rows[:, -1:, :] + eps) * self.scale
        cols = cols / (cols[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=padding_mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = cols[:, :, :, None] / dim_t
        pos_y = rows[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(dtype)
