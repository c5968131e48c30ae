"""Evaluators: clean-image classifiers of other families than the guidance networks, to judge samples.

Classifier guidance follows the gradient of the noisy classifier, a UNet encoder with AdaGN ResBlocks, GroupNorm, SiLU
and attention pooling; an evaluator of that family reads what CG wrote (adversarial directions transfer best between
networks of one family). These two share none of it: no time input, BatchNorm and ReLU, no attention, average or max
pooling. `ResNet` is the primary evaluator, `VGG` the second opinion. `MLPMixer` is a third family for when a ResNet
or VGG guides (an off-the-shelf guide, guidance=cg_ots): no convolution, no BatchNorm, no attention; LayerNorm, GELU
and per-patch / per-channel MLPs. All take `t` only for the classifiers' common call `net(x, t)` and ignore it.
Their activations are modules (nn.ReLU), so that a guide built from one can have them replaced (guidance=cg_ots
smooths them to softplus) without touching any other network.
"""

import torch
from einops import rearrange
from torch import nn

from guidelab.errors import GuidelabError


class PreActBlock(nn.Module):
    """He et al. 2016 ("Identity Mappings in Deep Residual Networks"), Fig. 1(b): BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus
    the identity (a strided 1x1 conv where the shape changes)."""

    def __init__(self, ch_in: int, ch_out: int, stride: int, dropout: float):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(ch_in), nn.BatchNorm2d(ch_out)
        self.conv1 = nn.Conv2d(ch_in, ch_out, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(ch_out, ch_out, 3, 1, 1, bias=False)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(ch_in, ch_out, 1, stride, bias=False) if stride != 1 or ch_in != ch_out else None
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()  # modules, not torch.relu: a guide's activations can be swapped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.bn1(x))
        skip = x if self.skip is None else self.skip(h)
        h = self.conv2(self.drop(self.act2(self.bn2(self.conv1(h)))))
        return h + skip


class ResNet(nn.Module):
    """Pre-activation ResNet (He et al. 2016) for small images: a 3x3 stem, one stage per width multiplier (the first
    at full resolution, each next one halving it), global average pooling, a linear head."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        channels: int = 32,  # width of the first stage
        channel_mult: tuple = (1, 2, 4),  # width multiplier per stage; every stage after the first halves the size
        num_blocks: int = 2,  # pre-activation blocks per stage
        dropout: float = 0.0,  # between the two convolutions of each block
    ):
        super().__init__()
        widths = [channels * m for m in channel_mult]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, ch = [], widths[0]
        for i, width in enumerate(widths):
            for j in range(num_blocks):
                blocks.append(PreActBlock(ch, width, 2 if i > 0 and j == 0 else 1, dropout))
                ch = width
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Sequential(nn.BatchNorm2d(ch), nn.ReLU())
        self.head = nn.Linear(ch, num_classes)

    def features(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """The (B, ch) globally pooled features (FID and precision/recall space)."""
        return self.out(self.blocks(self.stem(x))).mean(dim=(2, 3))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return self.classify(self.features(x))


class VGG(nn.Module):
    """VGG-style network (Simonyan & Zisserman 2015) with BatchNorm (Ioffe & Szegedy 2015): per stage two
    conv3x3-BN-ReLU and a 2x2 max-pool, then global max pooling, dropout and a linear head. No residual path."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        channels: int = 32,  # width of the first stage
        channel_mult: tuple = (1, 2, 4),  # width multiplier per stage; a 2x2 max-pool after each but the last
        dropout: float = 0.3,  # before the linear head
    ):
        super().__init__()
        layers, ch = [], in_channels
        for i, m in enumerate(channel_mult):
            for _ in range(2):
                layers += [nn.Conv2d(ch, channels * m, 3, 1, 1, bias=False), nn.BatchNorm2d(channels * m), nn.ReLU()]
                ch = channels * m
            if i < len(channel_mult) - 1:
                layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(ch, num_classes))

    def features(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """The (B, ch) globally max-pooled features (FID and precision/recall space)."""
        return self.body(x).amax(dim=(2, 3))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return self.classify(self.features(x))


class MixerBlock(nn.Module):
    """Tolstikhin et al. 2021 ("MLP-Mixer"), Eq. 1: a token-mixing MLP across patches (per channel), then a
    channel-mixing MLP per patch, each after a LayerNorm and with a skip connection."""

    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.tokens = nn.Sequential(nn.Linear(tokens, token_hidden), nn.GELU(), nn.Linear(token_hidden, tokens))
        self.channels = nn.Sequential(
            nn.Linear(dim, channel_hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(channel_hidden, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, tokens, dim)
        x = x + self.tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channels(self.norm2(x))


class MLPMixer(nn.Module):
    """MLP-Mixer (Tolstikhin et al. 2021) for small images: non-overlapping patch x patch patches projected linearly
    to `dim`, `depth` Mixer blocks, a LayerNorm, global average pooling over patches, a linear head."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        patch: int = 4,  # patch side in pixels; image_size must be a multiple (16 -> 4x4 patches, 28 -> 7x7)
        dim: int = 128,  # channels per patch
        depth: int = 4,  # Mixer blocks
        token_hidden: int = 64,  # hidden width of the token-mixing MLP
        channel_hidden: int = 256,  # hidden width of the channel-mixing MLP
        dropout: float = 0.1,  # in the channel MLP and before the head
    ):
        super().__init__()
        if image_size % patch:
            raise GuidelabError(
                f"classifier.patch={patch} does not divide the image size {image_size}; set classifier.patch to a "
                "divisor of it (4 for 16 and 28 pixels, 8 for 32)"
            )
        self.patch, tokens = patch, (image_size // patch) ** 2
        self.embed = nn.Linear(in_channels * patch * patch, dim)
        self.blocks = nn.Sequential(
            *[MixerBlock(tokens, dim, token_hidden, channel_hidden, dropout) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes))

    def features(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """The (B, dim) average-pooled patch features (FID and precision/recall space)."""
        p = self.patch
        h = self.embed(rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p))
        return self.norm(self.blocks(h)).mean(dim=1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return self.classify(self.features(x))
