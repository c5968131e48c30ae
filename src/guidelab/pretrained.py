"""Diffusion models that guidelab did not train: how they are named, found and read (the network wrapper is
guidelab.models.diffusers_unet; the schedule's betas are guidelab.diffusion's).

A model is named by a reference: `diffusers:PATH` (a directory written by `save_pretrained`: a pipeline directory
with `unet/` and `scheduler/`, or a bare model directory with `scheduler_config.json` beside its `config.json` or in a
sibling `scheduler/`), or `hub:ORG/NAME` (fetched through huggingface_hub where the network allows). The schedule is
read from the scheduler config, never assumed: `num_train_timesteps`, `beta_schedule` (linear, scaled_linear,
squaredcos_cap_v2), `beta_start`, `beta_end`, `prediction_type` (epsilon, v_prediction, sample). The scheduler's
sampling settings (timestep_spacing, clip_sample, steps_offset, set_alpha_to_one, variance_type, thresholding,
use_karras_sigmas, ...) are not read: guidelab's own samplers and their keys decide how to sample. The keys of
diffusers' schedulers that change the noise process itself are refused when set (`UNREAD`: trained_betas,
rescale_betas_zero_snr, snr_shift_scale, use_flow_sigmas), and so is a scheduler class without a beta schedule (EDM
sigmas, flow matching: its config holds no `beta_schedule`), rather than read as the default linear betas.

The UNet is a pixel-space `UNet2DModel` with a square `sample_size`, unconditional or class-conditional through a
table of class embeddings (`num_class_embeds`); anything else is refused in one line before its weights are read
(`read_unet_config`): a pipeline whose model_index.json names an autoencoder (AutoencoderKL, VQModel: latent
diffusion), another model class (a text-conditional `UNet2DConditionModel`), class labels without a table
(`class_embed_type` without `num_class_embeds`), no `sample_size`. From the hub only the files read here are fetched
(`CONFIG_FILES`, then the UNet's weights as diffusers' `from_pretrained` picks them: safetensors, else .bin; neither
fp16 variants nor other components' folders).

A directory that guidelab exported (`export_diffusers.py`) also holds `guidelab.json`: the data set, class names and
the null class of a model trained with label dropout (the last class-embedding row), which diffusers' config cannot
say. Without it a class-conditional model (`num_class_embeds`) has no null class, and an unconditional one none at all.
"""

from __future__ import annotations

import json
from pathlib import Path

from guidelab.errors import GuidelabError, one_line

PREFIXES = ("diffusers:", "hub:")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SIDECAR = "guidelab.json"  # what guidelab adds to an exported model: dataset, class names, null class
WEIGHTS_NAME = "diffusion_pytorch_model"  # diffusers' weights file, without its suffix (diffusers.utils.constants)
CONFIG_FILES = [  # every JSON file read here, in a pipeline (unet/, scheduler/) or a bare model directory
    "model_index.json",
    SIDECAR,
    "config.json",
    "scheduler_config.json",
    "unet/config.json",
    f"unet/{SIDECAR}",
    "scheduler/scheduler_config.json",
]
# Keys of diffusers' schedulers (DDPMScheduler.__init__ and its relatives, diffusers 0.42) that change the betas or
# alpha-bar, and are not read: {key: (is it set?, what it is and what to do instead)}.
UNREAD = {
    "trained_betas": (
        lambda v: v is not None,
        "(an explicit beta list) is not supported; use a model whose scheduler names a beta_schedule",
    ),
    "rescale_betas_zero_snr": (
        bool,
        "(zero terminal SNR, Lin et al. 2023, 'Common Diffusion Noise Schedules and Sample Steps are Flawed') is not "
        "supported: it sets the final alpha-bar to 0, and guidelab's samplers form x0 = (x_t - sqrt(1 - abar) eps) / "
        "sqrt(abar) from the eps prediction, undefined there; use a model trained without it",
    ),
    "snr_shift_scale": (
        lambda v: v not in (None, 1, 1.0),
        "(CogVideoX's shift of alpha-bar, abar / (s + (1 - s) abar)) is not supported; guidelab reads plain beta "
        "schedules: use a model whose scheduler has no SNR shift",
    ),
    "use_flow_sigmas": (
        bool,
        "(a flow-matching model's noise levels) is not supported; guidelab guides DDPM-type models (a beta schedule)",
    ),
}


def is_reference(value) -> bool:
    """Whether a checkpoint value names a diffusers model (`diffusers:PATH` or `hub:ORG/NAME`)."""
    return isinstance(value, str) and value.startswith(PREFIXES)


def import_diffusers():
    try:
        import diffusers
    except ImportError:
        raise GuidelabError(
            "a diffusers model needs the diffusers library: pip install -e '.[diffusers]' (or pip install diffusers)"
        ) from None
    return diffusers


def locate(reference: str, weights: bool = False) -> tuple[Path, Path]:
    """(the UNet's directory, its scheduler config file) of a `diffusers:` or `hub:` reference, checked to be a model
    guidelab can use (`refuse_latent`, `read_unet_config`); `weights`: fetch a hub model's weights too (the checks
    read only its JSON files)."""
    repo_id = reference[len("hub:") :] if reference.startswith("hub:") else None
    root = _fetch(repo_id, CONFIG_FILES) if repo_id else Path(reference[len("diffusers:") :]).expanduser()
    if not root.is_dir():
        raise GuidelabError(
            f"{reference}: {root} is not a directory; pass a directory written by save_pretrained (a pipeline "
            "directory with unet/ and scheduler/, or a model directory with scheduler_config.json)"
        )
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    for index in dict.fromkeys((root / "model_index.json", unet_dir.parent / "model_index.json")):
        refuse_latent(index)
    if not (unet_dir / "config.json").is_file():
        raise GuidelabError(
            f"{reference}: no UNet config.json in {root} or {root / 'unet'}; pass the directory that "
            "UNet2DModel.save_pretrained or a pipeline's save_pretrained wrote"
        )
    read_unet_config(unet_dir)
    for candidate in (
        root / "scheduler" / "scheduler_config.json",
        unet_dir / "scheduler_config.json",
        unet_dir.parent / "scheduler" / "scheduler_config.json",
    ):
        if candidate.is_file():
            if weights and repo_id:
                _fetch_weights(repo_id, "unet/" if unet_dir != root else "", unet_dir)
            return unet_dir, candidate
    raise GuidelabError(
        f"{reference}: no scheduler config beside the model in {root} (scheduler/scheduler_config.json or "
        "scheduler_config.json); save the model's scheduler there (scheduler.save_pretrained(DIR)) so that its noise "
        "schedule is known"
    )


def refuse_latent(model_index: Path) -> None:
    """Refuse a pipeline whose model_index.json names an autoencoder (a VAE such as AutoencoderKL, a VQ-VAE such as
    VQModel): its UNet denoises latents, and guidelab samples pixels."""
    if not model_index.is_file():
        return
    index = read_json(model_index)
    for key, value in index.items():
        name = value[1] if isinstance(value, list) and len(value) == 2 and isinstance(value[1], str) else ""
        if key in ("vae", "vqvae") or "Autoencoder" in name or name == "VQModel" or name.endswith("VAE"):
            raise GuidelabError(
                f"{model_index}: latent diffusion is not supported: guidelab samples pixel-space models, and this "
                f"pipeline ({index.get('_class_name', '?')}) decodes latents with {key}: {name or '?'}; use a "
                "pixel-space pipeline (DDPMPipeline, DDIMPipeline: a UNet2DModel and its scheduler)"
            )


def read_unet_config(unet_dir: Path) -> dict:
    """The UNet's config.json, refused where guidelab cannot use the model: another class than UNet2DModel, class
    labels without a table of class embeddings, no sample size (diffusers allows sample_size null)."""
    path = unet_dir / "config.json"
    cfg = read_json(path)
    name = cfg.get("_class_name", "UNet2DModel")
    if name == "UNet2DConditionModel":
        raise GuidelabError(
            f"{path}: a UNet2DConditionModel (a text-conditional UNet, conditioned on a text encoder's hidden states) "
            "is not supported yet; guidelab guides UNet2DModels, unconditional or class-conditional"
        )
    if name != "UNet2DModel":
        raise GuidelabError(
            f"{path}: a {name} is not supported; guidelab guides diffusers UNet2DModels, unconditional or "
            "class-conditional"
        )
    if cfg.get("class_embed_type") is not None and cfg.get("num_class_embeds") is None:
        raise GuidelabError(
            f"{path}: class_embed_type={cfg['class_embed_type']!r} without num_class_embeds (class labels embedded "
            "without a table of classes) is not supported; guidelab conditions on class indices through "
            "num_class_embeds: use such a model, or an unconditional one"
        )
    if cfg.get("sample_size") is None:
        raise GuidelabError(
            f"{path}: sample_size is null, so the image size the model samples is unknown; write the size it was "
            'trained at into that config.json (e.g. "sample_size": 32)'
        )
    return cfg


def _fetch(repo_id: str, patterns: list[str]) -> Path:
    """The files of a hub model that match `patterns` (huggingface_hub's allow_patterns: fnmatch on the path in the
    repository), through huggingface_hub (the local cache first); offline, a one-line error."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise GuidelabError("hub: references need huggingface_hub: pip install -e '.[diffusers]'") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repository, gated: every failure of the fetch ends here
        raise GuidelabError(
            f"hub:{repo_id} could not be fetched ({type(e).__name__}; offline or HF_HUB_OFFLINE=1, or no such "
            f"repository); download it where there is a network (huggingface-cli download {repo_id} --local-dir DIR) "
            "and pass ckpt=diffusers:DIR"
        ) from None


def _fetch_weights(repo_id: str, prefix: str, unet_dir: Path) -> None:
    """The UNet's weights as diffusers' ModelMixin.from_pretrained looks for them without a variant: the safetensors
    file (or its shards and index), else the .bin one; fp16 and other variants are never fetched."""
    for suffix in ("safetensors", "bin"):
        names = (f"{WEIGHTS_NAME}.{suffix}", f"{WEIGHTS_NAME}.{suffix}.index.json", f"{WEIGHTS_NAME}-*-of-*.{suffix}")
        _fetch(repo_id, [prefix + name for name in names])
        if any((unet_dir / name).is_file() for name in names[:2]):
            return


def read_schedule(reference: str) -> dict:
    """The noise schedule of a referenced model, from its scheduler config: {beta_schedule, num_steps, beta_start,
    beta_end, prediction_type} (what is not read is listed in the module docstring)."""
    _, path = locate(reference)
    cfg = read_json(path)
    _refuse_unread(path, cfg)
    schedule = {
        "beta_schedule": cfg.get("beta_schedule", "linear"),
        "num_steps": int(cfg.get("num_train_timesteps", 1000)),
        "beta_start": float(cfg.get("beta_start", 0.0001)),
        "beta_end": float(cfg.get("beta_end", 0.02)),
        "prediction_type": cfg.get("prediction_type", "epsilon"),
    }
    if schedule["beta_schedule"] not in BETA_SCHEDULES:
        raise GuidelabError(
            f"{path}: beta_schedule {schedule['beta_schedule']!r} is not supported; supported: "
            f"{', '.join(BETA_SCHEDULES)}"
        )
    if schedule["prediction_type"] not in PREDICTIONS:
        raise GuidelabError(
            f"{path}: prediction_type {schedule['prediction_type']!r} is not supported; supported: "
            f"{', '.join(PREDICTIONS)} (each converted to eps)"
        )
    if schedule["num_steps"] < 2:
        raise GuidelabError(f"{path}: num_train_timesteps must be at least 2, got {schedule['num_steps']}")
    if schedule["beta_schedule"] == "squaredcos_cap_v2":  # no beta_start / beta_end: the cosine needs none
        schedule["beta_start"] = schedule["beta_end"] = None
    return schedule


def _refuse_unread(path: Path, cfg: dict) -> None:
    """Refuse a scheduler config whose noise process guidelab would misread: a key of `UNREAD` that is set, or a
    scheduler class without a beta schedule (save_pretrained writes every argument of the class, so a beta scheduler's
    config always holds `beta_schedule`)."""
    for key, (is_set, why) in UNREAD.items():
        value = cfg.get(key)
        if is_set(value):
            shown = f"[{len(value)} values]" if isinstance(value, list) else json.dumps(value)
            raise GuidelabError(f"{path}: {key}={shown} {why}")
    if "_class_name" in cfg and "beta_schedule" not in cfg:
        raise GuidelabError(
            f"{path}: {cfg['_class_name']} defines no beta schedule (noise levels as sigmas or flow matching); "
            "guidelab reads the beta schedules of DDPM-type schedulers (DDPMScheduler, DDIMScheduler, ...): use such a "
            "model"
        )


def read_sidecar(unet_dir: Path) -> dict:
    """guidelab.json of an exported model ({} for any other): dataset, image_size, class_names, null_class."""
    for path in (unet_dir / SIDECAR, unet_dir.parent / SIDECAR):
        if path.is_file():
            return read_json(path)
    return {}


def read_json(path: Path) -> dict:
    """A model directory's JSON file, refused naming it when it is damaged."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GuidelabError(
            f"{path} is damaged (not readable JSON: {one_line(e)}); copy the model directory again or write it again "
            "with save_pretrained"
        ) from None
    if not isinstance(value, dict):
        raise GuidelabError(f"{path} is damaged (not a JSON object); copy the model directory again")
    return value


def model_reference(cfg) -> str:
    """The model of `diffusion=pretrained` (its `model` key), checked to be a reference."""
    if not is_reference(cfg.get("model")):
        raise GuidelabError(
            "diffusion=pretrained needs diffusion.model=diffusers:PATH or hub:ORG/NAME (the model whose noise "
            f"schedule to use), got {cfg.get('model')!r}"
        )
    return cfg["model"]


def sample_size(reference: str) -> int:
    """The image size a referenced model samples (its config's sample_size; square)."""
    unet_dir, _ = locate(reference)
    size = read_unet_config(unet_dir)["sample_size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)
