"""Building blocks shared by the UNet and the noisy classifier.

Layout follows DDPM (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", App. B) with the
adaptive group norm of ADM (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis",
Sec. 3). Every block keeps 4-D (B, C, H, W) tensors and never calls `.view`, so channels_last inputs work.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from guidelab.errors import GuidelabError


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """Sinusoidal embedding of (possibly non-integer) timesteps t (B,) -> (B, dim), float32.

    The transformer position encoding (Vaswani et al. 2017, Sec. 3.5) as used for timesteps in DDPM:
    frequencies max_period^(-i/half) for i < half, features [cos(t f), sin(t f)], zero-padded if dim is odd.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


def group_norm(ch: int) -> nn.GroupNorm:
    """GroupNorm (Wu & He 2018) with up to 32 groups of at least 4 channels, the group count dividing ch."""
    groups = max(1, min(32, ch // 4))
    while ch % groups:
        groups -= 1
    return nn.GroupNorm(groups, ch)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters, so a residual branch starts as the identity (DDPM's init_scale=0)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class TimestepEmbedder(nn.Module):
    """t (B,) -> sinusoidal(dim) -> Linear -> SiLU -> Linear -> (B, emb_dim), as in DDPM / DiT."""

    def __init__(self, dim: int, emb_dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, t: torch.Tensor, perturb=None) -> torch.Tensor:
        """`perturb(features) -> features`, if given, acts on the sinusoidal features before the MLP (TSG's seam)."""
        features = timestep_embedding(t, self.dim).to(self.mlp[0].weight.dtype)
        return self.mlp(features if perturb is None else perturb(features))


class ResBlock(nn.Module):
    """Residual block conditioned on an embedding (time, + class): DDPM's block, optionally with AdaGN.

    use_scale_shift_norm=True is ADM's adaptive group norm (Dhariwal & Nichol 2021, Sec. 3):
    norm(h) * (1 + scale) + shift; False is DDPM's norm(h + proj(emb)).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int,
        dropout: float = 0.0,  # before the last conv, as in DDPM (0.1 on CIFAR-10)
        use_scale_shift_norm: bool = True,  # ADM AdaGN; False = DDPM additive embedding (half the proj params)
    ):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch if use_scale_shift_norm else out_ch))
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb_proj(emb)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual (DDPM's attention block)."""

    def __init__(self, ch: int, num_heads: int = 4):  # DDPM used 1 head; ADM 4 (same parameter count)
        super().__init__()
        if ch % num_heads:
            raise ValueError(f"AttentionBlock: {ch} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_module(nn.Conv2d(ch, ch, 1))
        # the hook of attention-perturbing guidance (PAG, SEG): (q, k, v, (height, width)) -> the attended values,
        # used instead of softmax attention while set; None (always, outside their guiding pass) costs nothing
        self.attention = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (n m d) h w -> n b m (h w) d", n=3, m=self.num_heads)
        if self.attention is None:
            h = F.scaled_dot_product_attention(q, k, v)
        else:
            h = self.attention(q, k, v, (height, width))
        h = rearrange(h, "b m (h w) d -> b (m d) h w", h=height, w=width)
        return x + self.proj(h)


class Downsample(nn.Module):
    """Stride-2 conv3x3: H -> ceil(H / 2), so odd sizes work (28 -> 14 -> 7 -> 4)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour resize then conv3x3; `size` (the skip's H, W) undoes an odd-size downsample."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode="nearest") if size is not None else F.interpolate(x, scale_factor=2.0)
        return self.conv(x)


class EmbedSequential(nn.Sequential):
    """nn.Sequential that also hands the embedding to the ResBlocks in it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


def select_blocks(root: nn.Module, kind: type, names, owner: str) -> dict:
    """The submodules of type `kind` by module path, all of them or those in `names` (the seam of the perturbation
    modes: `guidance.layers`); an unknown name is refused, listing the valid ones."""
    blocks = {name: m for name, m in root.named_modules() if isinstance(m, kind)}
    if names is None:
        return blocks
    unknown = [n for n in names if n not in blocks]
    if unknown:
        raise GuidelabError(
            f"guidance.layers {unknown} are not attention blocks of this {owner}; its attention blocks: "
            f"{', '.join(blocks) or 'none'}"
        )
    return {n: blocks[n] for n in names}
