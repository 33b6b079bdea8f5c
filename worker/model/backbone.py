"""ResNet backbone with frozen batch norm, returning stages 1–4 and their padding masks.

torchvision supplies the ResNet; this module keeps only its convolutional body (no pooling
head) under the attribute names the official checkpoints use (`backbone.0.body.layerN...`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from .position_encoding import SinePositionEncoding

# Channels of stages 1..4 of a bottleneck ResNet (50 and 101 alike).
STAGE_CHANNELS = (256, 512, 1024, 2048)


class ResNetBody(nn.Module):
    """The convolutional part of a torchvision ResNet: image [B,3,H,W] → stages 1..4.

    Stage k has stride 4·2^(k-1) (stage 4 keeps stride 16 when `dilation` is set: DC5).
    """

    def __init__(self, depth: int, dilation: bool):
        super().__init__()
        builder = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}[depth]
        resnet = builder(weights=None, replace_stride_with_dilation=[False, False, dilation],
                         norm_layer=FrozenBatchNorm2d)
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4

    def fold_batchnorm(self) -> None:
        """Fold every frozen batch norm into the convolution before it (inference only).

        A frozen BN is an affine map per channel, so conv∘BN is one conv with scaled weights and
        a bias: the same function up to float rounding (~1e-6 relative), without a pass over
        every activation map. The state dict no longer matches the checkpoints afterwards."""
        pairs = [(self, "conv1", "bn1")]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
                if block.downsample is not None:
                    pairs.append((block.downsample, "0", "1"))
        for parent, conv_name, bn_name in pairs:
            conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
            if not isinstance(bn, FrozenBatchNorm2d):
                continue                                  # folded already
            scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
            # Built on the meta device and given its two tensors: no random initialisation or
            # extra copy to waste at start-up.
            with torch.device("meta"):
                folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                   conv.dilation, conv.groups, bias=True)
            with torch.no_grad():
                folded.weight = nn.Parameter(conv.weight * scale[:, None, None, None])
                folded.bias = nn.Parameter(bn.bias - bn.running_mean * scale)
            setattr(parent, conv_name, folded)
            setattr(parent, bn_name, nn.Identity())

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        stages = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            stages.append(x)
        return stages


class Backbone(nn.Module):
    """Holds the ResNet body as `body` (checkpoint key prefix `backbone.0.body`)."""

    def __init__(self, depth: int, dilation: bool):
        super().__init__()
        self.body = ResNetBody(depth, dilation)


class BackboneWithPositions(nn.Sequential):
    """Index 0: the backbone; index 1: the positional encoding (no parameters).

    forward(images [B,3,H,W], padding_mask [B,H,W]) →
      (features: 4 × [B,C_k,h_k,w_k], masks: 4 × [B,h_k,w_k], pos of the last stage [B,256,h,w]).
    """

    def __init__(self, depth: int, dilation: bool):
        super().__init__(Backbone(depth, dilation), SinePositionEncoding(128))

    def forward(self, images: torch.Tensor, padding_mask: torch.Tensor):
        features = self[0].body(images)
        # Nearest-neighbour downsampling of the padding mask to each stage, as in training.
        masks = [F.interpolate(padding_mask[None].float(), size=f.shape[-2:]).to(torch.bool)[0]
                 for f in features]
        pos = self[1](masks[-1], features[-1].dtype)
        return features, masks, pos
