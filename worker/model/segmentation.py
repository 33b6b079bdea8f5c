"""The panoptic mask branch of DETR and the whole panoptic model.

Per query, an attention map over the encoder memory (`bbox_attention`) is stacked onto the
projected features and refined by a small FPN-style convolutional head fed by backbone stages
3, 2, 1, giving mask logits at stride 4. Every query goes through the head independently (group
norm is per sample), which is what lets `forward_kept` run the head only for the queries that
pass the confidence threshold and get the masks the full pass gives them (up to float rounding:
it also computes each image's share of the head's first convolution once, not once per query).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import STAGE_CHANNELS
from .detr import DETR, DetrFeatures

# (image, query) pairs per mask-head call; results do not depend on it.
MASK_HEAD_CHUNK = 32


class AttentionMap(nn.Module):
    """Multi-head attention weights of queries over a feature map (no values).

    queries [B,Q,d], memory [B,d,h,w], mask [B,h,w] → weights [B,Q,heads,h,w]. As trained, the
    softmax runs jointly over heads and positions.
    """

    def __init__(self, query_dim: int, hidden_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.q_linear = nn.Linear(query_dim, hidden_dim)
        self.k_linear = nn.Linear(query_dim, hidden_dim)
        self.normalize_fact = float(hidden_dim / num_heads) ** -0.5

    def forward(self, queries, memory, mask):
        q = self.q_linear(queries)
        k = F.conv2d(memory, self.k_linear.weight[:, :, None, None], self.k_linear.bias)
        head_dim = self.hidden_dim // self.num_heads
        qh = q.view(q.shape[0], q.shape[1], self.num_heads, head_dim)
        kh = k.view(k.shape[0], self.num_heads, head_dim, k.shape[-2], k.shape[-1])
        weights = torch.einsum("bqnc,bnchw->bqnhw", qh * self.normalize_fact, kh)
        weights = weights.masked_fill(mask[:, None, None], float("-inf"))
        return F.softmax(weights.flatten(2), dim=-1).view(weights.shape)


class MaskHead(nn.Module):
    """Per-query mask logits from features, the query's attention maps and three FPN stages.

    forward(features [B,d,h,w], attention [N,heads,h,w], laterals of [stage3, stage2, stage1],
    image_index [N]) → [N,1,H/4,W/4], where N counts (image, query) pairs.
    """

    def __init__(self, dim: int, fpn_dims: tuple[int, int, int], context_dim: int):
        super().__init__()
        inter = [dim, context_dim // 2, context_dim // 4, context_dim // 8, context_dim // 16]
        self.lay1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.gn1 = nn.GroupNorm(8, dim)
        self.lay2 = nn.Conv2d(dim, inter[1], 3, padding=1)
        self.gn2 = nn.GroupNorm(8, inter[1])
        self.lay3 = nn.Conv2d(inter[1], inter[2], 3, padding=1)
        self.gn3 = nn.GroupNorm(8, inter[2])
        self.lay4 = nn.Conv2d(inter[2], inter[3], 3, padding=1)
        self.gn4 = nn.GroupNorm(8, inter[3])
        self.lay5 = nn.Conv2d(inter[3], inter[4], 3, padding=1)
        self.gn5 = nn.GroupNorm(8, inter[4])
        self.out_lay = nn.Conv2d(inter[4], 1, 3, padding=1)
        self.adapter1 = nn.Conv2d(fpn_dims[0], inter[1], 1)
        self.adapter2 = nn.Conv2d(fpn_dims[1], inter[2], 1)
        self.adapter3 = nn.Conv2d(fpn_dims[2], inter[3], 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.constant_(m.bias, 0)

    def laterals(self, fpns: list[torch.Tensor]) -> list[torch.Tensor]:
        """Adapted FPN stages, computed once per image and shared by all its queries."""
        return [adapter(fpn) for adapter, fpn in zip((self.adapter1, self.adapter2, self.adapter3), fpns)]

    def forward(self, features, attention, laterals, image_index):
        """features [B,d,h,w] and `laterals(fpns)` (per image) are shared by the N (image, query)
        pairs whose image is `image_index` [N]. The definition: every pair from the concatenation."""
        x = self.lay1(torch.cat([features[image_index], attention], 1))
        return self._refine(x, laterals, lambda per_image: per_image[image_index])

    def shared_context(self, features: torch.Tensor) -> torch.Tensor:
        """lay1's share of the features, with its bias: [B,d,h,w] → [B,dim,h,w], once per image.

        lay1 is linear, so lay1(cat(features, attention)) = shared_context(features) + lay1 of the
        attention alone; the per-pair part then convolves `heads` channels instead of d + heads."""
        heads = self.lay1.in_channels - features.shape[1]
        return F.conv2d(features, self.lay1.weight[:, :-heads], self.lay1.bias, padding=1)

    def forward_shared(self, context, attention, laterals, image_index, image: int | None = None):
        """`forward`'s masks (up to float rounding) from `shared_context(features)`. `image`: the
        one image all N pairs come from, if so; its context and laterals are then broadcast over
        the pairs instead of copied for each."""
        def pick(per_image: torch.Tensor) -> torch.Tensor:
            return per_image[image:image + 1] if image is not None else per_image[image_index]

        heads = attention.shape[1]
        x = pick(context) + F.conv2d(attention, self.lay1.weight[:, -heads:], padding=1)
        return self._refine(x, laterals, pick)

    def _refine(self, x, laterals, pick):
        """lay1's output [N,dim,h,w] → mask logits [N,1,H/4,W/4]; `pick` turns a per-image lateral
        into the pairs' own, one stage at a time (so that only one is held at once)."""
        x = F.relu(self.gn1(x))
        x = F.relu(self.gn2(self.lay2(x)))
        for lateral, conv, norm in zip(laterals, (self.lay3, self.lay4, self.lay5), (self.gn3, self.gn4, self.gn5)):
            x = pick(lateral) + F.interpolate(x, size=lateral.shape[-2:], mode="nearest")
            x = F.relu(norm(conv(x)))
        return self.out_lay(x)


@dataclass
class DetectorPass:
    """`DETRPanoptic.detect`'s tensors for a batch of B images (Q queries, h×w at stride 32)."""
    pred_logits: torch.Tensor          # [B, Q, C+1]
    pred_boxes: torch.Tensor           # [B, Q, 4]
    keep: torch.Tensor                 # [B, Q] bool: the query passes the threshold
    attention: torch.Tensor            # [B, Q, heads, h, w] every query's attention map
    laterals: list[torch.Tensor]       # the mask head's adapted FPN stages (strides 16, 8, 4)
    context: torch.Tensor              # [B, dim, h, w] lay1's share of the projected features


class DETRPanoptic(nn.Module):
    """DETR plus its mask branch; parameter names are those of the official panoptic checkpoints."""

    def __init__(self, depth: int, dilation: bool, num_classes: int = 250, num_queries: int = 100,
                 hidden_dim: int = 256, nheads: int = 8):
        super().__init__()
        self.num_queries = num_queries
        self.num_classes = num_classes      # class ids 0..num_classes-1; logit num_classes is "no object"
        self.detr = DETR(depth, dilation, num_classes, num_queries, hidden_dim, nheads)
        self.bbox_attention = AttentionMap(hidden_dim, hidden_dim, nheads)
        self.mask_head = MaskHead(hidden_dim + nheads, tuple(reversed(STAGE_CHANNELS[:3])), hidden_dim)

    def _masks(self, f: DetrFeatures, image_index: torch.Tensor, query_index: torch.Tensor) -> torch.Tensor:
        """Mask logits [N, H/4, W/4] for the (image, query) pairs given by the two index vectors,
        by the head's definition (`MaskHead.forward`).

        Pairs go through the head in chunks to bound memory: at stride 4 every pair costs
        tens of megabytes of activations."""
        attention = self.bbox_attention(f.queries, f.memory, f.memory_mask)
        laterals = self.mask_head.laterals([f.stages[2], f.stages[1], f.stages[0]])
        chunks = []
        for start in range(0, image_index.numel(), MASK_HEAD_CHUNK):
            images = image_index[start:start + MASK_HEAD_CHUNK]
            queries = query_index[start:start + MASK_HEAD_CHUNK]
            chunks.append(self.mask_head(f.projected, attention[images, queries], laterals, images)[:, 0])
        return torch.cat(chunks)

    def _kept_masks(self, d: DetectorPass, image_index: torch.Tensor, query_index: torch.Tensor,
                    counts: list[int]) -> torch.Tensor:
        """`_masks` for pairs in (image, query) order, `counts[b]` of image b, computed the fast
        way (`MaskHead.forward_shared`): lay1's share of the features once per image, and a chunk
        whose pairs share one image broadcasts that image's tensors instead of copying them."""
        owner = [b for b, n in enumerate(counts) for _ in range(n)]
        chunks = []
        for start in range(0, len(owner), MASK_HEAD_CHUNK):
            end = min(start + MASK_HEAD_CHUNK, len(owner))
            images, queries = image_index[start:end], query_index[start:end]
            one = owner[start] if owner[start] == owner[end - 1] else None
            chunks.append(self.mask_head.forward_shared(d.context, d.attention[images, queries], d.laterals, images,
                                                        one)[:, 0])
        return torch.cat(chunks)

    @staticmethod
    def _padding_mask(images: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        if padding_mask is None:
            b, _, h, w = images.shape
            return torch.zeros((b, h, w), dtype=torch.bool, device=images.device)
        return padding_mask

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """images [B,3,H,W] (normalised), padding_mask [B,H,W] bool (True on padding) or None →
        {"pred_logits" [B,Q,C+1], "pred_boxes" [B,Q,4], "pred_masks" [B,Q,H/4,W/4]}, every query
        (C = num_classes: 250 for the official checkpoints)."""
        f = self.detr(images, self._padding_mask(images, padding_mask))
        b, q = f.pred_logits.shape[:2]
        image_index = torch.arange(b, device=images.device).repeat_interleave(q)
        query_index = torch.arange(q, device=images.device).repeat(b)
        masks = self._masks(f, image_index, query_index)
        return {"pred_logits": f.pred_logits, "pred_boxes": f.pred_boxes,
                "pred_masks": masks.view(b, q, *masks.shape[-2:])}

    def detect(self, images: torch.Tensor, padding_mask: torch.Tensor | None, threshold: float) -> DetectorPass:
        """The part of `forward_kept` whose shapes depend only on the input's: the detector, the
        kept flags and everything the mask head shares across a batch's queries. No host round
        trip, so that it can be captured as one CUDA graph (worker.cuda_graphs)."""
        f = self.detr(images, self._padding_mask(images, padding_mask))
        return DetectorPass(
            pred_logits=f.pred_logits, pred_boxes=f.pred_boxes, keep=kept_queries(f.pred_logits, threshold),
            attention=self.bbox_attention(f.queries, f.memory, f.memory_mask),
            laterals=self.mask_head.laterals([f.stages[2], f.stages[1], f.stages[0]]),
            context=self.mask_head.shared_context(f.projected))

    def kept_masks(self, d: DetectorPass) -> dict[str, torch.Tensor]:
        """`forward_kept`'s result from its `detect` part: the mask head for the kept queries."""
        image_index, query_index = d.keep.nonzero(as_tuple=True)
        counts = d.keep.sum(1).tolist()     # the batch's one host round trip: the head's size
        if image_index.numel():
            masks = self._kept_masks(d, image_index, query_index, counts)
        else:
            masks = d.pred_logits.new_zeros((0, *d.laterals[-1].shape[-2:]))
        return {"pred_logits": d.pred_logits, "pred_boxes": d.pred_boxes, "keep": d.keep, "kept_masks": masks,
                "kept_counts": torch.tensor(counts, dtype=torch.long)}

    def forward_kept(self, images: torch.Tensor, padding_mask: torch.Tensor | None,
                     threshold: float) -> dict[str, torch.Tensor]:
        """The pruned pass: the mask head runs only for queries that survive the threshold.

        Returns pred_logits and pred_boxes for every query, `keep` [B,Q] bool (best class is not
        "no object" and its probability > threshold), `kept_counts` [B] (on the host: the kept
        queries per image) and `kept_masks` [K,H/4,W/4] for the K kept
        queries in (image, query) order — the masks `forward` gives those queries, up to float
        rounding (the head's first convolution is split in two, see `MaskHead.shared_context`).
        """
        return self.kept_masks(self.detect(images, padding_mask, threshold))


def kept_queries(pred_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """[B,Q,C+1] logits → [B,Q] bool: the best class is a real class with probability > threshold."""
    scores, labels = pred_logits.softmax(-1).max(-1)
    return (labels != pred_logits.shape[-1] - 1) & (scores > threshold)
