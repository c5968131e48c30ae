"""Class-conditional eps-prediction UNet.

Layout of DDPM (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", App. B: the 35.7M-parameter
CIFAR-10 network); class conditioning and label dropout of classifier-free guidance (Ho & Salimans 2022,
"Classifier-Free Diffusion Guidance", Alg. 1); optionally the temperature input beta of guidance-free training (Chen
et al. 2025, "Visual Generation Without Guidance", arXiv 2501.15420). The `Encoder` trunk is shared with
`NoisyClassifier`.
"""

from collections.abc import Callable
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from guidelab.conditions import ATTRIBUTES, columns, drop_fields, labels_of
from guidelab.errors import GuidelabError
from guidelab.models.layers import (
    AttentionBlock,
    Downsample,
    EmbedSequential,
    ResBlock,
    TimestepEmbedder,
    Upsample,
    group_norm,
    select_blocks,
    zero_module,
)
from guidelab.registry import Range


def res_block(
    in_ch: int, out_ch: int, emb_dim: int, dropout: float, attn: bool, num_heads: int, use_scale_shift_norm: bool
) -> EmbedSequential:
    """ResBlock, followed by self-attention when `attn` (DDPM: at the attention resolutions)."""
    layers = [ResBlock(in_ch, out_ch, emb_dim, dropout, use_scale_shift_norm)]
    if attn:
        layers.append(AttentionBlock(out_ch, num_heads))
    return EmbedSequential(*layers)


class Encoder(nn.Module):
    """Downsampling half of the UNet plus its middle block (ResBlock, attention, ResBlock).

    forward(x, emb) -> (h, skips): h is the middle block's output, skips the activations the decoder
    concatenates (conv_in's output, every block's output, every downsample's output; DDPM's `hs`).
    Attributes for building a decoder or a head: `skip_channels` (per skip), `resolutions` (the spatial
    size at each level for an image_size input), `out_channels` (of h).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        channels: int,
        channel_mult: tuple,
        num_res_blocks: int,
        attn_resolutions: tuple,
        dropout: float,
        num_heads: int,
        emb_dim: int,
        use_scale_shift_norm: bool,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList()
        self.skip_channels = [channels]
        self.resolutions = []
        ch, res = channels, image_size
        for level, mult in enumerate(channel_mult):
            self.resolutions.append(res)
            for _ in range(num_res_blocks):
                attn = res in attn_resolutions
                self.blocks.append(
                    res_block(ch, channels * mult, emb_dim, dropout, attn, num_heads, use_scale_shift_norm)
                )
                ch = channels * mult
                self.skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                self.blocks.append(EmbedSequential(Downsample(ch)))
                self.skip_channels.append(ch)
                res = (res + 1) // 2  # stride-2 conv3x3 with padding 1 gives ceil(res / 2)
        self.mid = EmbedSequential(
            ResBlock(ch, ch, emb_dim, dropout, use_scale_shift_norm),
            AttentionBlock(ch, num_heads),
            ResBlock(ch, ch, emb_dim, dropout, use_scale_shift_norm),
        )
        self.out_channels = ch

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self.conv_in(x)
        skips = [h]
        for block in self.blocks:
            h = block(h, emb)
            skips.append(h)
        return self.mid(h, emb), skips


def check_attributes(attributes, where: str = "model.attributes") -> tuple[str, ...]:
    """`where` (model.attributes, classifier.attributes): names of guidelab.morpho's measurements, each once."""
    names = tuple(attributes)
    for name in names:
        if name not in ATTRIBUTES:
            raise GuidelabError(f"{where}: unknown attribute {name!r}; measured ones: {', '.join(ATTRIBUTES)}")
    if len(set(names)) < len(names):
        raise GuidelabError(f"{where} lists an attribute twice: {list(names)}; list each once")
    return names


class Perturbation(NamedTuple):
    """What `UNet.perturbed` changes besides attention: functions applied inside the forward pass (None = nothing)."""

    time_features: Callable | None = None  # sinusoidal time-step features -> features
    class_embedding: Callable | None = None  # (labels, class embeddings) -> class embeddings


class UNet(nn.Module):
    """eps_theta(x_t, t, y): predicts the noise in x_t given timestep t and class y (y = null_class: none).

    Defaults are the DDPM CIFAR-10 network (35.7M parameters at in_channels=3, image_size=32). With `beta_embed` it
    also takes GFT's temperature: eps_theta(x_t, t, y, beta), beta in (0, 1], one pass of which samples like CFG at
    scale 1 / beta once trained with train.guidance_free=gft (guidance=gft); without the keyword,
    beta = 1 (the conditional model).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        num_classes: int,
        channels: int = 128,  # base width; DDPM CIFAR-10: 128
        channel_mult: tuple = (1, 2, 2, 2),  # width multiplier per resolution level (32, 16, 8, 4 on CIFAR)
        num_res_blocks: int = 2,  # ResBlocks per encoder level (decoder: one more, as in DDPM)
        attn_resolutions: tuple = (16,),  # spatial sizes that get self-attention after each ResBlock
        dropout: float = 0.1,  # ResBlock dropout; DDPM CIFAR-10: 0.1
        num_heads: int = 4,  # attention heads (parameter count does not depend on it)
        p_uncond: float = 0.1,  # training-time probability of replacing a label by the null label (CFG)
        use_scale_shift_norm: bool = False,  # ADM AdaGN; False keeps DDPM's additive embedding and 35.7M params
        beta_embed: bool = False,  # GFT's beta input (train.guidance_free=gft); False: none, as every older checkpoint
        attributes: tuple = (),  # measured attributes it is conditioned on besides the class, e.g. [thickness,slant]
        p_field: float = 0.1,  # training-time probability of dropping each field alone (with attributes)
    ):
        super().__init__()
        Range(0, 1, "the label-dropout rate; 0.1 in Ho & Salimans 2022").check("model.p_uncond", p_uncond, {})
        self.in_channels, self.image_size = in_channels, image_size  # the shape samplers draw x_T in
        self.null_class = num_classes
        self.p_uncond = p_uncond
        emb_dim = 4 * channels
        self.time_embed = TimestepEmbedder(channels, emb_dim)
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim)  # last row: the null (unconditional) label
        levels = (channels, channel_mult, num_res_blocks, attn_resolutions, dropout, num_heads, emb_dim)
        self.encoder = Encoder(in_channels, image_size, *levels, use_scale_shift_norm)
        skip_channels = list(self.encoder.skip_channels)
        ch = self.encoder.out_channels
        self.up = nn.ModuleList()  # per level, from the lowest resolution up: num_res_blocks + 1 blocks
        self.upsample = nn.ModuleList()  # between levels
        for level in reversed(range(len(channel_mult))):
            attn = self.encoder.resolutions[level] in attn_resolutions
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                in_ch = ch + skip_channels.pop()
                ch = channels * channel_mult[level]
                blocks.append(res_block(in_ch, ch, emb_dim, dropout, attn, num_heads, use_scale_shift_norm))
            self.up.append(blocks)
            if level > 0:
                self.upsample.append(Upsample(ch))
        self.norm_out = group_norm(ch)
        self.conv_out = zero_module(nn.Conv2d(ch, in_channels, 3, padding=1))
        self._perturb = Perturbation()  # none outside `perturbed()`: costs nothing
        # GFT's temperature (Chen et al. 2025): sinusoidal features of 1000 beta -> MLP, added to the time embedding
        # (the beta_in=mlp form of their DiT code; their scripts use beta_in=linear, the same features projected into
        # the time-step features). Built last, so every other weight draws the same initial values as without it, and
        # its last layer zeroed, so an untrained beta path leaves the network's output exactly as it was.
        self.beta_embed = None
        if beta_embed:
            self.beta_embed = TimestepEmbedder(channels, emb_dim)
            zero_module(self.beta_embed.mlp[-1])
        self._attribute_inputs(attributes, p_field, channels, emb_dim)  # last: a class-only network draws as before

    def _attribute_inputs(self, attributes, p_field: float, channels: int, emb_dim: int) -> None:
        """One embedding per measured attribute (sinusoidal features -> MLP, as the time step's) and its learned
        null, and the training set's mean and SD of each (`attr_stats`: set by train_diffusion.py, saved with the
        weights); nothing for a class-only network."""
        self.attributes = check_attributes(attributes)
        Range(0, 1, "each field's own dropout rate").check("model.p_field", p_field, {})
        self.p_field = p_field
        if self.attributes:
            n = len(self.attributes)
            self.attr_embed = nn.ModuleList(TimestepEmbedder(channels, emb_dim) for _ in self.attributes)
            self.attr_null = nn.Parameter(torch.zeros(n, emb_dim))
            self.register_buffer("attr_stats", torch.stack([torch.zeros(n), torch.ones(n)]))

    def drop_labels(self, y: torch.Tensor) -> torch.Tensor:
        """In training mode, the condition dropped to its null (`conditions.drop_fields`): plain labels each with
        probability p_uncond; condition rows field by field with p_field, then whole rows with p_uncond."""
        return drop_fields(y, self.p_uncond, self.null_class, self.p_field) if self.training else y

    def attribute_embedding(self, y: torch.Tensor) -> torch.Tensor:
        """The sum of the attributes' embeddings: each value normalised by the training set's statistics, scaled into
        the sinusoidal features' range (100 v + 500: 0.01 SD resolves, requests far outside the data still embed),
        and its learned null where the row leaves it free (NaN; plain labels leave every attribute free)."""
        values = columns(y, self.attributes)
        mean, std = self.attr_stats
        features = 500 + 100 * torch.nan_to_num((values - mean) / std)
        embs = torch.stack([embed(features[:, i]) for i, embed in enumerate(self.attr_embed)], dim=1)
        free = torch.isnan(values).unsqueeze(-1)
        return torch.where(free, self.attr_null.to(embs.dtype), embs).sum(dim=1)

    def attention_blocks(self, names=None) -> dict[str, AttentionBlock]:
        """The self-attention blocks by module path (e.g. encoder.mid.1), what `perturbed(attention=...)` can reach:
        all of them, or those in `names` (an unknown name is refused, listing the valid ones)."""
        return select_blocks(self, AttentionBlock, names, "UNet")

    @contextmanager
    def perturbed(
        self,
        attention: dict[str, Callable] | None = None,
        time_features: Callable | None = None,
        class_embedding: Callable | None = None,
    ):
        """Within the block the network runs perturbed, the one seam of the perturbation-guidance modes:
        `attention` {block path: fn(q, k, v, (H, W)) -> values} replaces softmax attention in those blocks (PAG, SEG);
        `time_features` fn(features) -> features acts on the sinusoidal time-step features before their MLP (TSG);
        `class_embedding` fn(labels, emb) -> emb acts on the class embeddings (CADS). Restored on exit."""
        blocks = self.attention_blocks(list(attention or {}))
        for name, fn in (attention or {}).items():
            blocks[name].attention = fn
        self._perturb = Perturbation(time_features, class_embedding)
        try:
            yield
        finally:
            for name in attention or {}:
                blocks[name].attention = None
            self._perturb = Perturbation()

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, beta: torch.Tensor | float | None = None
    ) -> torch.Tensor:
        """x (B, C, H, W), t (B,) timesteps (int or float), y (B,) int64 in [0, num_classes] or condition rows
        (B, F) (`conditions.rows`: the class and the attributes it knows are read) -> eps (B, C, H, W).
        `beta` (B,) or a number in (0, 1]: GFT's temperature, for a network built with beta_embed (None = 1)."""
        conds = self.drop_labels(y)
        labels = labels_of(conds)
        class_emb = self.class_embed(labels)
        if self._perturb.class_embedding is not None:
            class_emb = self._perturb.class_embedding(labels, class_emb)
        emb = self.time_embed(t, self._perturb.time_features) + class_emb
        if self.attributes:
            emb = emb + self.attribute_embedding(conds)
        if self.beta_embed is not None:
            beta = torch.as_tensor(1.0 if beta is None else beta, dtype=torch.float32, device=x.device)
            emb = emb + self.beta_embed(1000 * beta.expand(x.shape[0]))
        elif beta is not None:
            raise GuidelabError(
                "this UNet has no beta input (model.beta_embed=false): only a network trained with "
                "train.guidance_free=gft model.beta_embed=true takes GFT's beta"
            )
        h, skips = self.encoder(x, emb)
        for level, blocks in enumerate(self.up):
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if level < len(self.upsample):
                h = self.upsample[level](h, size=skips[-1].shape[-2:])
        return self.conv_out(F.silu(self.norm_out(h)))
