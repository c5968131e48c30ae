"""Time-conditioned classifier p_phi(y | x_t, t) for classifier guidance.

Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs on Image Synthesis", Sec. 4 and App. C): the UNet's
downsampling trunk (`Encoder`, shared with `UNet`) followed by an attention-pooling head (as in CLIP,
Radford et al. 2021). With t = 0 throughout it doubles as a clean-image evaluator classifier.
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from guidelab.models.layers import TimestepEmbedder, group_norm
from guidelab.models.unet import Encoder


class AttentionPool2d(nn.Module):
    """GroupNorm + SiLU, then one query (mean token + its position embedding) attends over all tokens.

    (B, ch, size, size) -> (B, out_dim). Tokens are the mean token followed by the size*size positions,
    each with a learned position embedding (CLIP's AttentionPool2d, ADM's classifier head).
    """

    def __init__(self, ch: int, size: int, num_heads: int, out_dim: int):
        super().__init__()
        if ch % num_heads:
            raise ValueError(f"AttentionPool2d: {ch} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = group_norm(ch)
        self.pos_embed = nn.Parameter(torch.randn(size * size + 1, ch) / ch**0.5)
        self.q = nn.Linear(ch, ch)
        self.kv = nn.Linear(ch, 2 * ch)
        self.proj = nn.Linear(ch, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(x))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled (B, ch) vector before the output projection."""
        tokens = rearrange(F.silu(self.norm(x)), "b c h w -> b (h w) c")
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + self.pos_embed
        q = rearrange(self.q(tokens[:, :1]), "b n (m d) -> b m n d", m=self.num_heads)
        k, v = rearrange(self.kv(tokens), "b n (two m d) -> two b m n d", two=2, m=self.num_heads)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, 1, d)
        return rearrange(h, "b m 1 d -> b (m d)")


class NoisyClassifier(nn.Module):
    """logits(x_t, t) (B, num_classes). No class input; gradients w.r.t. x give classifier guidance."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        channels: int = 128,  # base width of the trunk
        channel_mult: tuple = (1, 2, 2, 2),  # width multiplier per resolution level
        num_res_blocks: int = 2,  # ResBlocks per level
        attn_resolutions: tuple = (16,),  # spatial sizes that get self-attention after each ResBlock
        dropout: float = 0.0,  # ResBlock dropout (ADM classifiers: none)
        num_heads: int = 4,  # heads of the trunk's attention and of the pooling head
        use_scale_shift_norm: bool = True,  # ADM AdaGN for the time embedding, as in ADM's classifier
    ):
        super().__init__()
        emb_dim = 4 * channels
        self.time_embed = TimestepEmbedder(channels, emb_dim)
        self.encoder = Encoder(
            in_channels,
            image_size,
            channels,
            channel_mult,
            num_res_blocks,
            attn_resolutions,
            dropout,
            num_heads,
            emb_dim,
            use_scale_shift_norm,
        )
        self.head = AttentionPool2d(self.encoder.out_channels, self.encoder.resolutions[-1], num_heads, num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) noised images, t (B,) timesteps (0 for clean images) -> logits (B, num_classes)."""
        return self.classify(self.features(x, t))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.head.proj(features)

    def features(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The penultimate (B, ch) features: the attention-pooled trunk output (the evaluator's FID features)."""
        h, _ = self.encoder(x, self.time_embed(t))
        return self.head.pool(h)
