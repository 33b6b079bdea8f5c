"""Encoder–decoder transformer of DETR: post-norm layers, positions added to queries and keys.

Sequences are [S, B, d] (sequence first), as torch.nn.MultiheadAttention expects by default and
as the checkpoints' `in_proj_weight`/`out_proj` parameters are laid out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, padding_mask, pos):
        q = k = src + pos
        src = self.norm1(src + self.self_attn(q, k, value=src, key_padding_mask=padding_mask, need_weights=False)[0])
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, memory, memory_padding_mask, pos, query_pos):
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, k, value=tgt, need_weights=False)[0])
        attended = self.multihead_attn(query=tgt + query_pos, key=memory + pos, value=memory,
                                       key_padding_mask=memory_padding_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + attended)
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class Encoder(nn.Module):
    def __init__(self, num_layers: int, d_model: int, nhead: int, dim_feedforward: int):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(d_model, nhead, dim_feedforward) for _ in range(num_layers))

    def forward(self, src, padding_mask, pos):
        for layer in self.layers:
            src = layer(src, padding_mask, pos)
        return src


class Decoder(nn.Module):
    """The decoder's final LayerNorm is applied to the last layer's output only: inference needs
    no intermediate (auxiliary-loss) outputs."""

    def __init__(self, num_layers: int, d_model: int, nhead: int, dim_feedforward: int):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(d_model, nhead, dim_feedforward) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt, memory, memory_padding_mask, pos, query_pos):
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_padding_mask, pos, query_pos)
        return self.norm(tgt)


class Transformer(nn.Module):
    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.encoder = Encoder(num_encoder_layers, d_model, nhead, dim_feedforward)
        self.decoder = Decoder(num_decoder_layers, d_model, nhead, dim_feedforward)

    def forward(self, src: torch.Tensor, padding_mask: torch.Tensor, query_embed: torch.Tensor,
                pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src [B,d,h,w], padding_mask [B,h,w], query_embed [Q,d], pos [B,d,h,w] →
        (decoded queries [B,Q,d], encoder memory [B,d,h,w])."""
        b, d, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)
        pos = pos.flatten(2).permute(2, 0, 1)
        query_pos = query_embed.unsqueeze(1).repeat(1, b, 1)
        padding_mask = padding_mask.flatten(1)
        memory = self.encoder(src, padding_mask, pos)
        decoded = self.decoder(torch.zeros_like(query_pos), memory, padding_mask, pos, query_pos)
        return decoded.transpose(0, 1), memory.permute(1, 2, 0).view(b, d, h, w)
