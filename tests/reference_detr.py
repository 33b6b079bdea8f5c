"""An independent, purely functional DETR panoptic forward pass, for the model tests.

Everything is computed straight from a state dict in the layout of the official panoptic
checkpoints (keys `detr.…`, `bbox_attention.…`, `mask_head.…`) with torch.nn.functional and
explicit tensor arithmetic: no nn.Module of worker.model (nor of torchvision) is used, attention is
written out with einsum, batch/group/layer norms with their formulas, and the ResNet is walked by
reading which blocks the state dict holds.

    out = panoptic_forward(state_dict, images, padding_mask, dilation=False)
    # {"pred_logits" [B,100,251], "pred_boxes" [B,100,4], "pred_masks" [B,100,h1,w1]}

DC5 (`dilation=True`) follows the torchvision ResNet the original was trained with
(`replace_stride_with_dilation=[False, False, True]`): in layer4 no block strides; the first
block's 3x3 conv keeps dilation 1 (the dilation *before* the layer) and the following blocks use
dilation 2 (padding = dilation). `dc5_first_block_dilation=2` gives the other reading, for
diagnostics only.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
StateDict = dict[str, Tensor]

BACKBONE = "detr.backbone.0.body"
NHEAD = 8
BN_EPS = 1e-5
LN_EPS = 1e-5
GN_EPS = 1e-5
GN_GROUPS = 8


# --------------------------------------------------------------------------- norms

def frozen_batch_norm(x: Tensor, sd: StateDict, prefix: str) -> Tensor:
    """y = x * scale + (b - running_mean * scale), scale = w / sqrt(running_var + eps)."""
    weight, bias = sd[prefix + ".weight"], sd[prefix + ".bias"]
    mean, var = sd[prefix + ".running_mean"], sd[prefix + ".running_var"]
    scale = weight * (var + BN_EPS).rsqrt()
    shift = bias - mean * scale
    return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


def layer_norm(x: Tensor, sd: StateDict, prefix: str) -> Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    centred = x - mean
    var = (centred * centred).mean(dim=-1, keepdim=True)
    return centred / torch.sqrt(var + LN_EPS) * sd[prefix + ".weight"] + sd[prefix + ".bias"]


def group_norm(x: Tensor, sd: StateDict, prefix: str, groups: int = GN_GROUPS) -> Tensor:
    n, c, h, w = x.shape
    g = x.reshape(n, groups, (c // groups) * h * w)
    mean = g.mean(dim=2, keepdim=True)
    centred = g - mean
    var = (centred * centred).mean(dim=2, keepdim=True)
    normed = (centred / torch.sqrt(var + GN_EPS)).reshape(n, c, h, w)
    return normed * sd[prefix + ".weight"].view(1, c, 1, 1) + sd[prefix + ".bias"].view(1, c, 1, 1)


def linear(x: Tensor, sd: StateDict, prefix: str) -> Tensor:
    return torch.matmul(x, sd[prefix + ".weight"].t()) + sd[prefix + ".bias"]


# --------------------------------------------------------------------------- backbone

def _blocks_of_layer(sd: StateDict, layer: int) -> int:
    pattern = re.compile(rf"^{re.escape(BACKBONE)}\.layer{layer}\.(\d+)\.conv1\.weight$")
    indices = [int(m.group(1)) for key in sd if (m := pattern.match(key))]
    assert indices, f"no blocks for layer{layer} in the state dict"
    return max(indices) + 1


def bottleneck(x: Tensor, sd: StateDict, prefix: str, stride: int, dilation: int, norm=frozen_batch_norm) -> Tensor:
    out = F.relu(norm(F.conv2d(x, sd[prefix + ".conv1.weight"]), sd, prefix + ".bn1"))
    out = F.conv2d(out, sd[prefix + ".conv2.weight"], stride=stride, padding=dilation, dilation=dilation)
    out = F.relu(norm(out, sd, prefix + ".bn2"))
    out = norm(F.conv2d(out, sd[prefix + ".conv3.weight"]), sd, prefix + ".bn3")
    if prefix + ".downsample.0.weight" in sd:
        shortcut = F.conv2d(x, sd[prefix + ".downsample.0.weight"], stride=stride)
        shortcut = norm(shortcut, sd, prefix + ".downsample.1")
    else:
        shortcut = x
    return F.relu(out + shortcut)


def resnet_stages(sd: StateDict, images: Tensor, dilation: bool, dc5_first_block_dilation: int = 1,
                  norm=frozen_batch_norm) -> list[Tensor]:
    """images → [stage1, ..., stage4]. `norm(x, sd, prefix)` is the frozen batch norm; the tests
    substitute a version that first sets the running statistics from `x` (calibration)."""
    x = F.conv2d(images, sd[BACKBONE + ".conv1.weight"], stride=2, padding=3)
    x = F.relu(norm(x, sd, BACKBONE + ".bn1"))
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    stages = []
    for layer in (1, 2, 3, 4):
        for index in range(_blocks_of_layer(sd, layer)):
            stride, rate = 1, 1
            if layer > 1 and index == 0:
                stride = 2
            if layer == 4 and dilation:
                stride = 1
                rate = dc5_first_block_dilation if index == 0 else 2
            x = bottleneck(x, sd, f"{BACKBONE}.layer{layer}.{index}", stride, rate, norm)
        stages.append(x)
    return stages


def downsample_mask(mask: Tensor, size) -> Tensor:
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]


def sine_positions(mask: Tensor, dtype: torch.dtype, num_pos_feats: int = 128,
                   temperature: float = 10000.0) -> Tensor:
    scale = 2 * math.pi
    not_mask = ~mask
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    y_embed = y_embed / (y_embed[:, -1:, :] + 1e-6) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + 1e-6) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos_x = x_embed[..., None] / dim_t
    pos_y = y_embed[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(dtype)


# --------------------------------------------------------------------------- transformer

def multi_head_attention(query: Tensor, key: Tensor, value: Tensor, sd: StateDict, prefix: str,
                         key_padding_mask: Tensor | None = None) -> Tensor:
    """query [L,B,E], key/value [S,B,E], key_padding_mask [B,S] (True = ignore) → [L,B,E]."""
    length, batch, dim = query.shape
    head_dim = dim // NHEAD
    w_q, w_k, w_v = sd[prefix + ".in_proj_weight"].split(dim, dim=0)
    b_q, b_k, b_v = sd[prefix + ".in_proj_bias"].split(dim, dim=0)
    q = torch.einsum("lbe,fe->lbf", query, w_q) + b_q
    k = torch.einsum("sbe,fe->sbf", key, w_k) + b_k
    v = torch.einsum("sbe,fe->sbf", value, w_v) + b_v
    q = q.reshape(length, batch, NHEAD, head_dim)
    k = k.reshape(key.shape[0], batch, NHEAD, head_dim)
    v = v.reshape(value.shape[0], batch, NHEAD, head_dim)
    scores = torch.einsum("lbnc,sbnc->bnls", q, k) / math.sqrt(head_dim)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    attended = torch.einsum("bnls,sbnc->lbnc", weights, v).reshape(length, batch, dim)
    return linear(attended, sd, prefix + ".out_proj")


def feed_forward(x: Tensor, sd: StateDict, prefix: str) -> Tensor:
    return linear(F.relu(linear(x, sd, prefix + ".linear1")), sd, prefix + ".linear2")


def _num_layers(sd: StateDict, prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.layers\.(\d+)\.")
    return 1 + max(int(m.group(1)) for key in sd if (m := pattern.match(key)))


def transformer(sd: StateDict, src: Tensor, mask: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
    """src/pos [B,d,h,w], mask [B,h,w] → (hs [B,Q,d], memory [B,d,h,w])."""
    batch, dim, height, width = src.shape
    seq = src.flatten(2).permute(2, 0, 1)
    pos_seq = pos.flatten(2).permute(2, 0, 1)
    key_mask = mask.flatten(1)

    prefix = "detr.transformer.encoder"
    for i in range(_num_layers(sd, prefix)):
        p = f"{prefix}.layers.{i}"
        qk = seq + pos_seq
        seq = layer_norm(seq + multi_head_attention(qk, qk, seq, sd, p + ".self_attn", key_mask), sd, p + ".norm1")
        seq = layer_norm(seq + feed_forward(seq, sd, p), sd, p + ".norm2")
    memory = seq

    query_pos = sd["detr.query_embed.weight"][:, None, :].repeat(1, batch, 1)
    tgt = torch.zeros_like(query_pos)
    prefix = "detr.transformer.decoder"
    for i in range(_num_layers(sd, prefix)):
        p = f"{prefix}.layers.{i}"
        qk = tgt + query_pos
        tgt = layer_norm(tgt + multi_head_attention(qk, qk, tgt, sd, p + ".self_attn"), sd, p + ".norm1")
        cross = multi_head_attention(tgt + query_pos, memory + pos_seq, memory, sd, p + ".multihead_attn", key_mask)
        tgt = layer_norm(tgt + cross, sd, p + ".norm2")
        tgt = layer_norm(tgt + feed_forward(tgt, sd, p), sd, p + ".norm3")
    hs = layer_norm(tgt, sd, prefix + ".norm").transpose(0, 1)
    return hs, memory.permute(1, 2, 0).reshape(batch, dim, height, width)


# --------------------------------------------------------------------------- panoptic head

def bbox_attention(sd: StateDict, hs: Tensor, memory: Tensor, mask: Tensor) -> Tensor:
    """hs [B,Q,d], memory [B,d,h,w], mask [B,h,w] → [B,Q,heads,h,w], softmax over heads×positions."""
    batch, queries, dim = hs.shape
    head_dim = dim // NHEAD
    q = linear(hs, sd, "bbox_attention.q_linear")
    k = F.conv2d(memory, sd["bbox_attention.k_linear.weight"][:, :, None, None], sd["bbox_attention.k_linear.bias"])
    qh = q.reshape(batch, queries, NHEAD, head_dim)
    kh = k.reshape(batch, NHEAD, head_dim, k.shape[-2], k.shape[-1])
    weights = torch.einsum("bqnc,bnchw->bqnhw", qh * head_dim ** -0.5, kh)
    weights = weights.masked_fill(mask[:, None, None], float("-inf"))
    return torch.softmax(weights.flatten(2), dim=-1).reshape(weights.shape)


def _per_query(x: Tensor, queries: int) -> Tensor:
    """[B,...] → [B*Q,...], each image repeated for its Q queries ((b, q) order)."""
    return x.unsqueeze(1).expand(x.shape[0], queries, *x.shape[1:]).flatten(0, 1)


def mask_head(sd: StateDict, src_proj: Tensor, attention: Tensor, fpns: list[Tensor]) -> Tensor:
    """src_proj [B,d,h,w], attention [B,Q,heads,h,w], fpns [stage3, stage2, stage1] → [B,Q,h1,w1]."""
    batch, queries = attention.shape[:2]
    x = torch.cat([_per_query(src_proj, queries), attention.flatten(0, 1)], dim=1)

    def conv_gn_relu(x, conv, norm):
        x = F.conv2d(x, sd[f"mask_head.{conv}.weight"], sd[f"mask_head.{conv}.bias"], padding=1)
        return F.relu(group_norm(x, sd, f"mask_head.{norm}"))

    x = conv_gn_relu(x, "lay1", "gn1")
    x = conv_gn_relu(x, "lay2", "gn2")
    for fpn, adapter, conv, norm in zip(fpns, ("adapter1", "adapter2", "adapter3"),
                                        ("lay3", "lay4", "lay5"), ("gn3", "gn4", "gn5")):
        cur = F.conv2d(fpn, sd[f"mask_head.{adapter}.weight"], sd[f"mask_head.{adapter}.bias"])
        cur = _per_query(cur, queries)
        x = cur + F.interpolate(x, size=cur.shape[-2:], mode="nearest")
        x = conv_gn_relu(x, conv, norm)
    x = F.conv2d(x, sd["mask_head.out_lay.weight"], sd["mask_head.out_lay.bias"], padding=1)
    return x.reshape(batch, queries, x.shape[-2], x.shape[-1])


# --------------------------------------------------------------------------- whole model

@torch.no_grad()
def panoptic_forward(sd: StateDict, images: Tensor, padding_mask: Tensor | None, dilation: bool = False,
                     dc5_first_block_dilation: int = 1) -> dict[str, Tensor]:
    """The original DETR panoptic forward: images [B,3,H,W], padding_mask [B,H,W] (True on padding)."""
    if padding_mask is None:
        padding_mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
    stages = resnet_stages(sd, images, dilation, dc5_first_block_dilation)
    masks = [downsample_mask(padding_mask, s.shape[-2:]) for s in stages]
    pos = sine_positions(masks[-1], stages[-1].dtype)
    src_proj = F.conv2d(stages[-1], sd["detr.input_proj.weight"], sd["detr.input_proj.bias"])
    hs, memory = transformer(sd, src_proj, masks[-1], pos)

    logits = linear(hs, sd, "detr.class_embed")
    boxes = F.relu(linear(hs, sd, "detr.bbox_embed.layers.0"))
    boxes = F.relu(linear(boxes, sd, "detr.bbox_embed.layers.1"))
    boxes = linear(boxes, sd, "detr.bbox_embed.layers.2").sigmoid()

    attention = bbox_attention(sd, hs, memory, masks[-1])
    pred_masks = mask_head(sd, src_proj, attention, [stages[2], stages[1], stages[0]])
    return {"pred_logits": logits, "pred_boxes": boxes, "pred_masks": pred_masks}
