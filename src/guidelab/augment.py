"""Training-time augmentation of image batches (the classifiers' random shifts and rotations)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_affine(x: torch.Tensor, shift: int, degrees: float) -> torch.Tensor:
    """Each image shifted by up to `shift` pixels and rotated by up to `degrees` (uniform, independent per image), in
    one bilinear resampling; pixels from outside repeat the border (the background of digits and garments)."""
    if shift == 0 and degrees == 0:
        return x
    n, size = len(x), x.shape[-1]
    angle = (torch.rand(n, device=x.device) * 2 - 1) * degrees * torch.pi / 180
    offset = (torch.rand(n, 2, device=x.device) * 2 - 1) * shift * 2 / size  # affine_grid's units: half an image
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1), torch.stack([sin, cos, offset[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
