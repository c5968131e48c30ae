"""What guidelab cannot read of a diffusers model is refused in one line, never ignored: scheduler keys that change
the noise process (zero terminal SNR, an SNR shift, flow-matching sigmas, a scheduler without betas); a UNet whose
classes are no embedding table, or without a sample size; a latent pipeline; a text-conditional UNet; and what
`hub:` fetches."""

import json
import shutil

import diffusers
import pytest
import torch
from test_diffusers import CPU, save_pipeline, tiny_unet

from guidelab.errors import GuidelabError
from guidelab.guidance import resolve
from guidelab.networks import check_pretrained, load_pretrained
from guidelab.pretrained import read_schedule, sample_size

TINY = {  # test_diffusers.tiny_unet's layout as keyword arguments
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 1,
    "block_out_channels": (16, 32),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
    "attention_head_dim": 8,
}


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


# ---------------------------------------------------------------- what the UNet or the pipeline is
def _refused_everywhere(reference, *fragments) -> str:
    """The check before Hydra starts, the loader and the size reader all refuse it in one line holding `fragments`,
    never as a damaged directory."""
    messages = []
    for use in (
        lambda: check_pretrained(resolve("cg", 3.0, base="cond"), reference),
        lambda: load_pretrained(reference, CPU),
        lambda: sample_size(reference),
    ):
        with pytest.raises(GuidelabError) as err:
            use()
        messages.append(str(err.value))
    for message in messages:
        assert "\n" not in message and "damaged" not in message, message
        assert all(f in message for f in fragments), (fragments, message)
    return messages[0]


@pytest.mark.parametrize("kind", ["timestep", "identity"])
def test_a_class_embedding_without_num_class_embeds_is_refused(tmp_path, kind):
    """class_embed_type timestep / identity embed a label as a number or take the embedding itself: no class table."""
    unet = diffusers.UNet2DModel(**TINY, class_embed_type=kind)
    assert unet.class_embedding is not None and unet.config.num_class_embeds is None
    _refused_everywhere(save_pipeline(tmp_path, unet), f"class_embed_type={kind!r}", "num_class_embeds")


def test_a_model_without_sample_size_is_refused(tmp_path):
    reference = save_pipeline(tmp_path, diffusers.UNet2DModel(**TINY | {"sample_size": None}))
    _refused_everywhere(reference, "sample_size", "config.json")


@pytest.mark.parametrize("component", [("vae", "AutoencoderKL"), ("vqvae", "VQModel")], ids=["vae", "vq-vae"])
def test_a_latent_pipeline_is_refused_as_latent(tmp_path, component):
    reference = save_pipeline(tmp_path, tiny_unet())
    index = {
        "_class_name": "LDMPipeline",
        "_diffusers_version": diffusers.__version__,
        component[0]: ["diffusers", component[1]],
        "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    _refused_everywhere(
        reference, "latent diffusion is not supported: guidelab samples pixel-space models", component[1]
    )
    message = _refused_everywhere(f"diffusers:{tmp_path / 'unet'}", "latent diffusion is not supported")  # its unet/
    assert str(tmp_path / "model_index.json") in message


def test_a_text_conditional_unet_is_named_for_what_it_is(tmp_path):
    cross_attention = {"cross_attention_dim": 16, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D")}
    unet = diffusers.UNet2DConditionModel(
        **TINY | cross_attention | {"up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D")}
    )
    _refused_everywhere(save_pipeline(tmp_path, unet), "UNet2DConditionModel", "text-conditional", "not supported yet")


# ---------------------------------------------------------------- what hub: fetches
def _fake_hub(monkeypatch, repo, snapshot) -> list:
    """huggingface_hub.snapshot_download over the local folder `repo`: the files its allow_patterns select (by
    huggingface_hub's own filter_repo_objects) are copied into `snapshot`; returns the list of pattern lists asked."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    asked = []

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        asked.append(list(allow_patterns))
        files = [str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()]
        for rel in filter_repo_objects(files, allow_patterns=allow_patterns):
            (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(repo / rel, snapshot / rel)
        snapshot.mkdir(exist_ok=True)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return asked


def _files(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_hub_fetches_only_the_files_it_reads_safetensors_first(tmp_path, monkeypatch):
    repo, snapshot = tmp_path / "repo", tmp_path / "snapshot"
    unet = tiny_unet()
    save_pipeline(repo, unet)
    unet.save_pretrained(repo / "unet", variant="fp16")  # diffusion_pytorch_model.fp16.safetensors
    unet.save_pretrained(tmp_path / "bin", safe_serialization=False)
    shutil.copy(tmp_path / "bin" / "diffusion_pytorch_model.bin", repo / "unet")
    index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "X"]}
    (repo / "model_index.json").write_text(json.dumps(index))
    for extra in ("text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/vocab.json", "README.md"):
        (repo / extra).parent.mkdir(exist_ok=True)
        (repo / extra).write_text("{}")
    asked = _fake_hub(monkeypatch, repo, snapshot)
    check_pretrained(resolve("cg", 3.0), "hub:org/ddpm")
    assert _files(snapshot) == {"model_index.json", "unet/config.json", "scheduler/scheduler_config.json"}
    net, _ = load_pretrained("hub:org/ddpm", CPU)  # the weights now, the safetensors alone
    assert _files(snapshot) == {
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
    }
    assert not any(".bin" in p or "fp16" in p or p.startswith("text_encoder") for patterns in asked for p in patterns)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 40])
    with torch.no_grad():
        assert torch.equal(net(x, t, torch.zeros(2, dtype=torch.long)), unet(x, t).sample)


def test_hub_falls_back_to_the_bin_weights_of_a_bare_model_repository(tmp_path, monkeypatch):
    """google/ddpm-cifar10-32's layout: config.json, scheduler_config.json and the .bin weights at the top."""
    repo, snapshot = tmp_path / "repo", tmp_path / "snapshot"
    tiny_unet().save_pretrained(repo, safe_serialization=False)
    diffusers.DDPMScheduler(num_train_timesteps=50).save_pretrained(repo)
    (repo / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    (repo / "unet_fp16").mkdir()
    (repo / "unet_fp16" / "diffusion_pytorch_model.bin").write_text("")
    _fake_hub(monkeypatch, repo, snapshot)
    load_pretrained("hub:google/ddpm-like", CPU)
    assert _files(snapshot) == {
        "config.json",
        "scheduler_config.json",
        "model_index.json",
        "diffusion_pytorch_model.bin",
    }
