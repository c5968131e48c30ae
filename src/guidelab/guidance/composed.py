"""Composed classifier-free guidance: one CFG term per condition field instead of one for the whole condition."""

from __future__ import annotations

import torch

from guidelab.conditions import asked, keep, rows
from guidelab.guidance.core import MODES, Context
from guidelab.guided import EpsFn, Guided


def composed_combine(eps_uncond: torch.Tensor, eps_fields: list[torch.Tensor], weights: list) -> torch.Tensor:
    """eps_u + sum_i w_i (eps(x_t, c_i) - eps_u): the conjunction of Liu et al. 2022 ("Compositional Visual Generation
    with Composable Diffusion Models", arXiv 2206.01714, Sec. 4: AND as a sum of per-concept CFG terms, NOT as a term
    of negative weight; their equation numbers could not be checked offline). One field of weight s is CFG's
    eps_u + s (eps_c - eps_u)."""
    out = eps_uncond
    for eps, w in zip(eps_fields, weights):
        out = out + w * (eps - eps_uncond)
    return out


@MODES.register(attributes=True)
def _cfg_composed(ctx: Context) -> EpsFn:
    """Composed CFG (Liu et al. 2022): eps_u + sum_i w_i (eps(x_t, c_i) - eps_u) over the request's fields (the class
    and each attribute asked, each alone with the others at their null), minus w_j (eps(x_t, n_j) - eps_u) for each
    field of the NOT; w_i = weights.<field>, else the run's scale. All predictions in one batched pass. With a single
    field it is joint CFG (`cfg`); with several it needs a network trained with each field dropped alone
    (model.p_field > 0), so that eps(x_t, c_i) is learned."""
    y = ctx.y if ctx.y.dim() == 2 else rows(ctx.y)
    null_class = ctx.unet.null_class
    fields = asked(y, null_class)
    away = asked(ctx.negative, null_class) if ctx.negative is not None else ()
    conds = [keep(y, [f], null_class) for f in fields] + [keep(ctx.negative, [f], null_class) for f in away]
    signs = [1] * len(fields) + [-1] * len(away)
    names = list(fields) + list(away)
    null = rows(torch.full((len(y),), null_class, dtype=torch.long, device=y.device))

    def eps_fn(x, t):
        n = len(conds) + 1
        out = ctx.unet(torch.cat([x] * n), torch.cat([t] * n), torch.cat([*conds, null]))
        *eps_fields, eps_uncond = out.chunk(n)
        scale = ctx.scale_at(t)
        weights = [sign * ctx.weight(name, scale) for sign, name in zip(signs, names)]
        return Guided(composed_combine(eps_uncond, eps_fields, weights))

    return eps_fn
