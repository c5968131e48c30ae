"""The linspace, leading and trailing timestep grids are diffusers' DDIMScheduler's, value for value (float64, numpy's
rounding), for every step count at three lengths of the process."""

import diffusers
import numpy as np
import pytest
import torch

from guidelab.diffusion import Diffusion, linear_betas
from guidelab.sampling import timesteps


def diffusers_grid(T: int, steps: int, spacing: str) -> list[int]:
    """DDIMScheduler(timestep_spacing=spacing, steps_offset=0).set_timesteps(steps), increasing."""
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=0)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps.flip(0).tolist()


@pytest.mark.parametrize("T", [1000, 50, 37])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_grids_are_diffusers_ddim_grids_for_every_step_count(T, spacing):
    process = Diffusion(linear_betas(T))
    for steps in range(1, T + 1):
        ours, theirs = timesteps(process, steps, spacing).tolist(), diffusers_grid(T, steps, spacing)
        if spacing == "trailing" and len(theirs) == steps + 1:
            # diffusers' np.arange(T, 0, -T / steps) holds one value more than `steps` where T - steps * (T / steps)
            # rounds above 0 (T = 1000: steps 61, 103, ...); that value becomes a timestep -1, which is left out here
            assert theirs[0] == -1, (steps, theirs)
            theirs = theirs[1:]
        assert ours == theirs, (T, steps, spacing)
        assert len(ours) == steps and 0 <= ours[0] and ours[-1] <= T - 1 and all(a < b for a, b in zip(ours, ours[1:]))


def test_the_linspace_grid_rounds_as_numpy_in_float64():
    """linspace(0, 999, 27) holds 13 * 999 / 26 = 499.5: float64 and round-half-to-even give 499 (float32 gave 500)."""
    grid = timesteps(Diffusion(linear_betas(1000)), 27, "linspace")
    assert grid[13] == 499 and grid.dtype == torch.int64
    assert grid.tolist() == np.linspace(0, 999, 27).round().astype(np.int64).tolist()
