"""What guidelab cannot read of a diffusers model is refused in one line, never ignored: scheduler keys that change
the noise process (zero terminal SNR, an SNR shift, flow-matching sigmas, a scheduler without betas)."""

import json

import diffusers
import pytest
from test_diffusers import save_pipeline, tiny_unet

from guidelab.errors import GuidelabError
from guidelab.pretrained import read_schedule


def _edit_scheduler(root, **changes):
    path = root / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _refusal(reference) -> str:
    with pytest.raises(GuidelabError) as err:
        read_schedule(reference)
    assert "\n" not in str(err.value), str(err.value)
    return str(err.value)


def test_zero_terminal_snr_is_refused_naming_the_key_and_the_fix(tmp_path):
    """diffusers rescales the betas to abar_T = 0 (Lin et al. 2023); guidelab's x0 from eps divides by sqrt(abar)."""
    reference = save_pipeline(tmp_path, tiny_unet(), rescale_betas_zero_snr=True)
    assert diffusers.DDPMScheduler.from_pretrained(tmp_path / "scheduler").alphas_cumprod[-1] == 0  # what it means
    message = _refusal(reference)
    assert "rescale_betas_zero_snr" in message and "Lin et al. 2023" in message, message
    assert "trained without it" in message and "abar" in message, message


def test_zero_terminal_snr_false_is_read(tmp_path):
    reference = save_pipeline(tmp_path, tiny_unet(), rescale_betas_zero_snr=False)
    assert read_schedule(reference)["beta_schedule"] == "linear"


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"snr_shift_scale": 3.0}, "snr_shift_scale"),
        ({"use_flow_sigmas": True, "flow_shift": 3.0}, "use_flow_sigmas"),
        ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
        ({"beta_schedule": "laplace"}, "beta_schedule 'laplace' is not supported"),
    ],
)
def test_scheduler_keys_that_change_the_betas_are_refused(tmp_path, changes, fragment):
    root = tmp_path / "m"
    save_pipeline(root, tiny_unet())
    _edit_scheduler(root, **changes)
    assert fragment in _refusal(f"diffusers:{root}")


def test_a_scheduler_without_betas_is_refused_naming_its_class(tmp_path):
    """A sigma (EDM) or flow-matching scheduler's config holds no beta_schedule: read as the default linear betas it
    would be a wrong schedule."""
    tiny_unet().save_pretrained(tmp_path / "unet")
    diffusers.FlowMatchEulerDiscreteScheduler().save_pretrained(tmp_path / "scheduler")
    message = _refusal(f"diffusers:{tmp_path}")
    assert "FlowMatchEulerDiscreteScheduler" in message and "beta" in message, message


def test_sampling_settings_stay_unread(tmp_path):
    """timestep_spacing, steps_offset, clip_sample are sampling settings: guidelab's sampler keys decide those."""
    reference = save_pipeline(tmp_path, tiny_unet(), timestep_spacing="trailing", steps_offset=1, clip_sample=True)
    assert read_schedule(reference)["num_steps"] == 50
