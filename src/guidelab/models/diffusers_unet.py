"""`DiffusersUNet`: a diffusers UNet2DModel presented as guidelab's eps_theta(x_t, t, y) (guidelab.pretrained says how
a model is named and how its schedule is read), with the perturbation seam of guidelab's UNet."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from guidelab.conditions import drop_labels, labels_of
from guidelab.diffusion import gather
from guidelab.errors import GuidelabError, one_line
from guidelab.models.layers import select_blocks
from guidelab.pretrained import import_diffusers, locate, read_schedule, read_sidecar


def load_model(reference: str):
    """The UNet2DModel of a reference (eval mode, frozen), its scheduler's schedule and guidelab.json's facts."""
    diffusers = import_diffusers()
    unet_dir, _ = locate(reference, weights=True)  # checks its config first (a damaged one is named as such)
    schedule = read_schedule(reference)
    try:
        model = diffusers.UNet2DModel.from_pretrained(unet_dir, low_cpu_mem_usage=False)
    except (OSError, ValueError) as e:
        raise GuidelabError(
            f"{reference}: {unet_dir} does not hold a loadable UNet2DModel (damaged or incomplete: {type(e).__name__}: "
            f"{one_line(e)[:200]}); copy it again or pass a directory written by UNet2DModel.save_pretrained"
        ) from None
    return model, schedule, read_sidecar(unet_dir)


class DiffusersUNet(nn.Module):
    """eps_theta(x_t, t, y) of a diffusers UNet2DModel: its output converted to eps (`v_prediction`: eps = sigma_t x_t +
    alpha_t v, Salimans & Ho 2022, "Progressive Distillation", Sec. 4 with v = alpha_t eps - sigma_t x_0; `sample`:
    eps = (x_t - alpha_t x_0) / sigma_t, Ho et al. 2020 Eq. 4; alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)); a
    learned-variance output (2C channels, Nichol & Dhariwal 2021) gives its first C channels, the eps half.

    `null_class` is the index of the unconditional label (a model trained with label dropout: guidelab's exports), or
    None; an unconditional model (no class embedding) ignores y. `p_uncond` drops labels to the null class in training
    mode, as guidelab's UNet does (Ho & Salimans 2022, Alg. 1)."""

    def __init__(
        self,
        model,
        abar: torch.Tensor | None = None,  # the schedule's alpha-bar; needed only to convert v or x0 predictions
        prediction_type: str = "epsilon",
        null_class: int | None = None,
        p_uncond: float = 0.0,
    ):
        super().__init__()
        cfg = model.config
        size = cfg.sample_size
        if isinstance(size, (list, tuple)):
            if size[0] != size[1]:
                raise GuidelabError(
                    f"the diffusers model samples {size[0]}x{size[1]} images; guidelab needs square ones"
                )
            size = size[0]
        if getattr(cfg, "time_embedding_type", "positional") != "positional":
            raise GuidelabError(
                f"time_embedding_type={cfg.time_embedding_type!r} (a score-SDE / NCSN++ model of continuous noise "
                "levels) is not supported; guidelab guides discrete-time DDPM models (positional time embedding)"
            )
        if cfg.out_channels not in (cfg.in_channels, 2 * cfg.in_channels):
            raise GuidelabError(
                f"the diffusers model has {cfg.out_channels} output channels for {cfg.in_channels} input channels; "
                "guidelab reads C (eps, v or x0) or 2C (learned variance: the first C)"
            )
        self.model = model
        self.in_channels, self.image_size = int(cfg.in_channels), int(size)
        self.prediction_type = prediction_type
        self.conditional = model.class_embedding is not None
        self.num_embeddings = int(cfg.num_class_embeds) if self.conditional else 0
        self.null_class = null_class
        self.p_uncond = p_uncond
        if abar is None and prediction_type != "epsilon":
            raise GuidelabError(f"a {prediction_type} model needs its schedule's alpha-bar to give eps")
        self.register_buffer("abar", None if abar is None else abar.to(torch.float64), persistent=False)
        self._hooks: dict[str, Callable] = {}
        self.attributes = ()  # a class input at most: no measured attributes

    def drop_labels(self, y: torch.Tensor) -> torch.Tensor:
        """In training mode, each label replaced by null_class with probability p_uncond (`conditions.drop_labels`)."""
        return drop_labels(y, self.p_uncond, self.null_class) if self.training else y

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        labels = self.drop_labels(labels_of(y)) if self.conditional else None  # condition rows: their class alone
        out = self.model(x, t, class_labels=labels, return_dict=False)[0]
        out = out[:, : self.in_channels] if out.shape[1] != self.in_channels else out
        if self.prediction_type == "epsilon":
            return out
        alpha, sigma = gather(self.abar.sqrt(), t, x), gather((1 - self.abar).sqrt(), t, x)
        if self.prediction_type == "v_prediction":
            return sigma * x + alpha * out
        return (x - alpha * out) / sigma

    # ------------------------------------------------ the perturbation seam (PAG, SEG, TSG, CADS), as guidelab's UNet
    def attention_blocks(self, names=None) -> dict:
        """The self-attention modules by module path (e.g. mid_block.attentions.0), or those in `names` (an unknown
        name is refused, listing the valid ones)."""
        from diffusers.models.attention_processor import Attention

        return select_blocks(self.model, Attention, names, "diffusers model")

    @contextmanager
    def perturbed(
        self,
        attention: dict[str, Callable] | None = None,
        time_features: Callable | None = None,
        class_embedding: Callable | None = None,
    ):
        """Within the block the model runs perturbed, with the same meaning as guidelab's `UNet.perturbed`: `attention`
        {block path: fn(q, k, v, (H, W)) -> values} replaces softmax attention there (through an attention processor),
        `time_features` acts on the sinusoidal features before the time MLP (a pre-hook on `time_embedding`),
        `class_embedding` fn(labels, emb) -> emb on the class embeddings (a hook on `class_embedding`). Restored on
        exit."""
        blocks = self.attention_blocks(list(attention or {}))
        saved = {name: blocks[name].processor for name in blocks}
        handles = []
        try:
            for name, fn in (attention or {}).items():
                blocks[name].set_processor(_PerturbedAttention(fn))
            if time_features is not None:
                handles.append(
                    self.model.time_embedding.register_forward_pre_hook(lambda m, args: (time_features(args[0]),))
                )
            if class_embedding is not None:
                if not self.conditional:
                    raise GuidelabError("this diffusers model has no class embedding to perturb; use a conditional one")
                handles.append(
                    self.model.class_embedding.register_forward_hook(lambda m, args, out: class_embedding(args[0], out))
                )
            yield
        finally:
            for handle in handles:
                handle.remove()
            for name, processor in saved.items():
                blocks[name].set_processor(processor)


class _PerturbedAttention:
    """A diffusers attention processor for the self-attention of UNet2DModel's blocks ((B, C, H, W) input) that
    calls fn(q, k, v, (H, W)) (q, k, v: (B, heads, H*W, d)) where softmax attention would run; otherwise the steps of
    diffusers' AttnProcessor2_0: group norm, projections, output projection, residual, rescale."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 4:
            raise GuidelabError("attention perturbation covers the self-attention of UNet2DModel's blocks only")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        d = k.shape[-1] // attn.heads
        q, k, v = (z.view(b, -1, attn.heads, d).transpose(1, 2) for z in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = self.fn(q, k, v, (h, w)).transpose(1, 2).reshape(b, -1, attn.heads * d).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def diffusers_layout(
    in_channels: int,
    image_size: int,
    num_classes: int,
    p_uncond: float = 0.1,  # label dropout to the null class (Ho & Salimans 2022); 0 with conditional=false
    conditional: bool = True,  # a class input with num_classes + 1 embeddings (the last: null); false = unconditional
    block_out_channels: tuple = (64, 128),  # UNet2DModel's keyword arguments from here on, per resolution level
    layers_per_block: int = 1,
    down_block_types: tuple = ("DownBlock2D", "AttnDownBlock2D"),
    up_block_types: tuple = ("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim: int = 8,
    norm_num_groups: int = 32,
    dropout: float = 0.0,
) -> DiffusersUNet:
    """A diffusers UNet2DModel of this layout that guidelab trains (`model=` an option with `arch: diffusers`): eps
    prediction, class-conditional with a null class (the last class-embedding row) for CFG, or unconditional."""
    from guidelab.registry import Range

    Range(0, 1, "the label-dropout rate; 0.1 in Ho & Salimans 2022").check("model.p_uncond", p_uncond, {})
    if not conditional and p_uncond:
        raise GuidelabError("model.conditional=false has no labels to drop: set model.p_uncond=0")
    if len({len(block_out_channels), len(down_block_types), len(up_block_types)}) != 1:
        raise GuidelabError(
            "model.block_out_channels, model.down_block_types and model.up_block_types need one entry per level"
        )
    model = import_diffusers().UNet2DModel(
        sample_size=image_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=tuple(down_block_types),
        up_block_types=tuple(up_block_types),
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
        dropout=dropout,
        num_class_embeds=num_classes + 1 if conditional else None,
    )
    return DiffusersUNet(model, null_class=num_classes if conditional else None, p_uncond=p_uncond)
