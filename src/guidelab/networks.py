"""The networks a sampling run uses: found (`latest`), rebuilt from their checkpoints (EMA weights, the layout from the
embedded config) or loaded from a diffusers model (`diffusers:PATH`, `hub:ORG/NAME`), checked to fit together (data,
size, noise schedule, the predictions the guidance asks for), and wrapped to count their evaluations."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import torch
from omegaconf import OmegaConf

from guidelab import checkpoint
from guidelab.diffusion import Diffusion, scheduler_betas
from guidelab.errors import GuidelabError
from guidelab.guidance import GuidanceSpec, check_model
from guidelab.guided import Counted
from guidelab.models import build_classifier, build_unet
from guidelab.models.diffusers_unet import DiffusersUNet, load_model
from guidelab.pretrained import is_reference, locate, read_json, read_schedule, read_sidecar
from guidelab.schedules import process, same_schedule, schedule_signature

TRAIN_HINT = {
    "diffusion": "python train_diffusion.py",
    "classifier": "python train_classifier.py",
    "clean_classifier": "python train_classifier.py classifier=clean",
    "evaluator": "python train_classifier.py classifier=evaluator (and classifier=evaluator_vgg seed=1 for "
    "the second opinion)",
    "regressor": "python train_classifier.py dataset=mnist classifier=regressor classifier.attributes=[thickness]",
    "clean_regressor": "python train_classifier.py dataset=mnist classifier=regressor classifier.noisy=false "
    "classifier.attributes=[thickness]",
}
NEEDS = {  # what a use accepts, where that is more than one role: any clean classifier guides on x0_hat
    "clean_classifier": "a clean classifier (classifier=clean, or an off-the-shelf ResNet, VGG or MLP-Mixer)"
}
ROLE_NAMES = {
    "classifier": "a noisy guidance classifier",
    "clean_classifier": "a clean classifier of the guidance family (UNet encoder)",
    "evaluator": "an evaluator (a clean classifier of another family)",
    "regressor": "a noisy attribute regressor (classifier=regressor)",
    "clean_regressor": "a clean attribute regressor (classifier=regressor classifier.noisy=false)",
}
SAME_SCHEDULE = ("guide", "classifier", "regressor")  # the roles evaluated on the UNet's x_t: its schedule, too


def load(path: str | Path, kind: str, device: torch.device):
    """Rebuild a network from the config embedded in its checkpoint and load its EMA weights (eval mode); a diffusion
    model may be a diffusers reference instead (`load_pretrained`)."""
    if kind == "diffusion" and is_reference(path):
        return load_pretrained(str(path), device)
    ckpt = checkpoint.load(path, kind=kind)
    cfg, info = ckpt["config"], ckpt["config"]["data_info"]
    build = build_unet if kind == "diffusion" else build_classifier
    net = build(
        cfg["model"] if kind == "diffusion" else cfg["classifier"],
        info["channels"],
        cfg["dataset"]["image_size"],
        info["num_classes"],
    )
    try:
        net.load_state_dict(ckpt["ema"])
    except RuntimeError:
        raise GuidelabError(
            f"the weights in {path} do not fit the network its own config describes; the checkpoint "
            "was written by another version of guidelab or edited; retrain it"
        ) from None
    return net.to(device).eval().requires_grad_(False), ckpt  # inference only: guidance takes input gradients


def load_pretrained(reference: str, device: torch.device):
    """A diffusers UNet2DModel as guidelab's eps_theta(x_t, t, y), and the checkpoint-like record of what it is (the
    schedule from its scheduler config; data set, classes and null class where guidelab exported it, else unknown)."""
    model, schedule, facts = load_model(reference)
    net = DiffusersUNet(
        model, torch.cumprod(1 - scheduler_betas(schedule), 0), schedule["prediction_type"], facts.get("null_class")
    )
    num_classes = facts.get("num_classes", net.num_embeddings if net.conditional else None)
    config = {
        "dataset": {"name": facts.get("dataset"), "image_size": net.image_size},
        "data_info": {"num_classes": num_classes, "channels": net.in_channels, "class_names": facts.get("class_names")},
        "model": {"name": f"diffusers ({reference})", "p_uncond": facts.get("p_uncond")},
        "diffusion": {"schedule": "pretrained", "model": reference},
        "schedule": {k: v for k, v in schedule.items() if k != "prediction_type"},
        "prediction_type": schedule["prediction_type"],
    }
    return net.to(device).eval().requires_grad_(False), {"kind": "diffusion", "config": config, "metrics": {}}


def check_pretrained(spec: GuidanceSpec, reference: str) -> None:
    """What can be checked of a diffusers model before Hydra starts, without its weights: it exists, its schedule and
    prediction type are supported, and it makes the predictions the guidance asks for (`check_model`)."""
    unet_dir, _ = locate(reference)
    read_schedule(reference)
    config = read_json(unet_dir / "config.json")
    conditional = config.get("num_class_embeds") is not None or config.get("class_embed_type") is not None
    check_model(spec, SimpleNamespace(conditional=conditional, null_class=read_sidecar(unet_dir).get("null_class")))


def schedule_of(config: dict) -> dict:
    """A run's noise schedule in diffusers' terms: as recorded (runs since the record, diffusers models), else from its
    `diffusion` config."""
    return config.get("schedule") or schedule_signature(config["diffusion"])


def role_of(config: dict) -> str | None:
    """What a run trained: "diffusion", "classifier" (noisy), "clean_classifier" (clean, of the guidance family: the
    UNet encoder), "evaluator" (clean, of another family), "regressor" (the noisy attribute regressor) or
    "clean_regressor" (the attribute regressor of clean images, which guides on x0_hat)."""
    if "model" in config:
        return "diffusion"
    if "classifier" not in config:
        return None
    c = config["classifier"]
    if c.get("arch") == "regressor":
        return "regressor" if c["noisy"] else "clean_regressor"
    return (
        "classifier"
        if c["noisy"]
        else "clean_classifier"
        if c.get("arch", "unet_encoder") == "unet_encoder"
        else "evaluator"
    )


def find_latest(
    root: str | Path, role: str, like: dict | None = None, key: str = "ckpt", unlike: tuple[str, ...] = ()
) -> Path:
    """RUN/checkpoints/last.pt of the newest run (by last.pt's time) under `root` whose RUN/.hydra/config.yaml says it
    trained a `role` network (see role_of); with `like` (a diffusion checkpoint's config) only runs on the same dataset
    and image size (and, for a noisy classifier or regressor, schedule); with `unlike` only classifiers of none of
    those archs."""
    runs = []
    for last in Path(root).glob("**/checkpoints/last.pt"):
        cfg_file = last.parents[1] / ".hydra" / "config.yaml"
        run = OmegaConf.to_container(OmegaConf.load(cfg_file)) if cfg_file.is_file() else {}
        same = like is None or (
            all(like["dataset"][k] in (None, run["dataset"][k]) for k in ("name", "image_size"))
            and (role not in SAME_SCHEDULE or same_schedule(schedule_of(run), schedule_of(like)))
        )
        other = run.get("classifier", {}).get("arch") not in unlike
        if role_of(run) == role and same and other:
            runs.append((last.stat().st_mtime, str(last)))
    if not runs:
        on = "" if like is None or like["dataset"]["name"] is None else f" on {like['dataset']['name']}"
        match = "" if like is None else f"{on} at {like['dataset']['image_size']}px"
        match += f" of another arch than {' and '.join(unlike)}" if unlike else ""
        raise GuidelabError(
            f"{key}=latest found no {role} run{match} under {Path(root).resolve()} (RUN/checkpoints/"
            f"last.pt with RUN/.hydra/config.yaml); train one with `{TRAIN_HINT[role]}` or pass {key}=PATH"
        )
    return Path(max(runs)[1])


def data_signature(ckpt: dict) -> dict:
    """What a network was trained on: dataset, class count, channels and image size (for compatibility checks; None
    where a diffusers model does not say)."""
    cfg = ckpt["config"]
    info = cfg["data_info"]
    return {
        "dataset": cfg["dataset"]["name"],
        "num_classes": None if info["num_classes"] is None else int(info["num_classes"]),
        "channels": int(info["channels"]),
        "image_size": int(cfg["dataset"]["image_size"]),
        "class_names": None if info.get("class_names") is None else list(info["class_names"]),  # dataset=folder
    }


def check_compatible(a: dict, a_name: str, b: dict, b_name: str, schedule: bool = False) -> None:
    """Refuse to combine two checkpoints trained on different data (dataset, classes, channels or image size; what a
    diffusers model does not say is not compared) or, with `schedule`, on different noise schedules."""
    sig_a, sig_b = data_signature(a), data_signature(b)
    differ = [k for k in sig_a if None not in (sig_a[k], sig_b[k]) and sig_a[k] != sig_b[k]]
    if differ:
        diff = ", ".join(f"{k} {sig_a[k]} vs {sig_b[k]}" for k in differ)
        raise GuidelabError(
            f"{a_name} and {b_name} were trained on different data ({diff}); "
            f"train the {b_name} with the same dataset= and dataset.image_size= as the {a_name}"
        )
    if schedule and not same_schedule(schedule_of(a["config"]), schedule_of(b["config"])):
        pretrained = a["config"]["diffusion"].get("model")
        how = f"diffusion=pretrained diffusion.model={pretrained}" if pretrained else "the same diffusion= settings"
        raise GuidelabError(
            f"the {b_name} was trained on another noise schedule than the {a_name} "
            f"({b['config']['diffusion']} vs {a['config']['diffusion']}); train it with {how}"
        )


JUDGE_KEYS = {"evaluator_ckpt": "", "second_evaluator_ckpt": "_2"}  # config key: its columns' suffix in the row


class Judge(NamedTuple):
    """An evaluator that judges the samples: a clean classifier of another family than every guiding network."""

    net: torch.nn.Module  # the classifier, EMA weights, eval mode
    config: dict  # its checkpoint's training config (classifier, dataset, data_info)
    metrics: dict  # its checkpoint's held-out metrics on real data (test_acc)
    path: str  # its checkpoint (`latest` resolved)
    suffix: str  # its results-row columns' suffix: "" for the primary (evaluator_ckpt), "_2" for the second opinion

    @property
    def name(self) -> str:
        return self.config["classifier"]["name"]

    @property
    def arch(self) -> str:
        return self.config["classifier"]["arch"]

    @property
    def primary(self) -> bool:
        return self.suffix == ""


@dataclass
class Networks:
    unet: Counted
    diffusion: Diffusion  # the model's own T-step process
    train_config: dict  # the UNet's training config (dataset, data_info, model, diffusion)
    classifier: Counted | None = None  # the noisy classifier, or the clean one of cg_x0, cg_ots, cg_universal
    classifier_arch: str | None = None  # its family (classifier.arch): no judge may share it
    classifier_metrics: dict = field(default_factory=dict)  # its held-out accuracy (per quarter of t if noisy)
    guide: Counted | None = None
    regressor: Counted | None = None  # the attribute regressor of CG on attributes (regressor_ckpt): noisy for the
    # guides of x_t, clean for those of x0_hat (cg_x0)
    regressor_config: dict = field(default_factory=dict)  # its training config (data_info: the data's attributes)
    judges: list[Judge] = field(default_factory=list)  # the evaluators asked for: the primary first
    paths: dict = field(default_factory=dict)  # config key -> the checkpoint path used (`latest` resolved)
    data_info: dict = field(default_factory=dict)  # the classes sampled: the UNet's, or its partners' if it has none

    @property
    def num_classes(self) -> int:
        """The classes to sample: the UNet's; for an unconditional diffusers model the guiding classifier's, else the
        first judge's (`data_info`), else one (unguided samples have no class)."""
        return int(self.data_info.get("num_classes") or 1)

    def evaluations(self) -> dict:
        """Rows evaluated so far: UNet passes (the guide's included) and the guides' passes (forward + input grad: the
        classifier's and the regressor's), and the seconds spent in the guides' terms (None: no guide)."""
        guides = [g for g in (self.classifier, self.regressor) if g is not None]
        return {
            "nfe": self.unet.rows + (self.guide.rows if self.guide is not None else 0),
            "classifier_nfe": sum(g.rows for g in guides),
            "classifier_seconds": sum(g.seconds for g in guides) if guides else None,
        }


def for_sampling(cfg, spec: GuidanceSpec, device: torch.device) -> Networks:
    """The UNet and what the guidance `spec` needs (noisy or clean classifier, guide), the attribute regressor where
    `regressor_ckpt` is set, plus the evaluators asked for."""
    needs = spec.needs
    paths = {"ckpt": resolve("ckpt", cfg.ckpt, cfg.runs_root, "diffusion")}
    unet, unet_ckpt = load(paths["ckpt"], "diffusion", device)
    check_model(spec, unet)
    nets = Networks(
        Counted(unet),
        process(unet_ckpt["config"]["diffusion"]).to(device),
        unet_ckpt["config"],
        paths=paths,
    )
    if "guide" in needs:
        if not cfg.guide_ckpt:
            raise GuidelabError(
                f"guidance={spec.name} needs guide_ckpt=PATH: a smaller diffusion model or an "
                "earlier checkpoint of the same run (RUN_DIR/checkpoints/0000500.pt)"
            )
        paths["guide_ckpt"] = cfg.guide_ckpt
        nets.guide = Counted(_partner(cfg.guide_ckpt, "guide", unet_ckpt, device)[0])
    for role in ("classifier", "clean_classifier"):
        if role in needs:
            paths["classifier_ckpt"] = resolve(
                "classifier_ckpt", cfg.classifier_ckpt, cfg.runs_root, role, unet_ckpt["config"]
            )
            net, cls_ckpt = _partner(paths["classifier_ckpt"], role, unet_ckpt, device)
            nets.classifier, nets.classifier_metrics = Counted(net), cls_ckpt["metrics"]
            nets.classifier_arch = cls_ckpt["config"]["classifier"].get("arch", "unet_encoder")
    if cfg.get("regressor_ckpt"):
        role = "clean_regressor" if "clean_classifier" in needs else "regressor"  # the guide reads x0_hat or x_t
        paths["regressor_ckpt"] = resolve(
            "regressor_ckpt", cfg.regressor_ckpt, cfg.runs_root, role, unet_ckpt["config"]
        )
        nets.regressor, regressor_ckpt = load_regressor(paths["regressor_ckpt"], unet_ckpt, device, role)
        nets.regressor_config = regressor_ckpt["config"]
    nets.judges = _judges(cfg, nets, unet_ckpt, device)
    info = unet_ckpt["config"]["data_info"]
    nets.data_info = dict(unet_ckpt["config"].get("partner_data_info", info) if info["num_classes"] is None else info)
    return nets


def _judges(cfg, nets: Networks, unet_ckpt: dict, device: torch.device) -> list[Judge]:
    """The evaluators asked for (evaluator_ckpt, then second_evaluator_ckpt), each checked to be a network of its own,
    of another family than the classifier that guides and than the other judge; their paths go into `nets.paths`."""
    guide_arch = nets.classifier_arch if nets.classifier_arch != "unet_encoder" else None  # an off-the-shelf guide
    judges, paths = [], nets.paths
    for key, suffix in JUDGE_KEYS.items():
        if not cfg[key]:
            continue
        unlike = tuple(a for a in (guide_arch, *(j.arch for j in judges)) if a)
        paths[key] = resolve(key, cfg[key], cfg.runs_root, "evaluator", unet_ckpt["config"], unlike)
        used = [paths.get("classifier_ckpt")] + ([paths["evaluator_ckpt"]] if key == "second_evaluator_ckpt" else [])
        if paths[key] in used:
            raise GuidelabError(
                f"{key} {paths[key]} is already used as another network of this run; each judge must "
                "be a network of its own"
            )
        net, ev_ckpt = _partner(paths[key], "evaluator", unet_ckpt, device)
        judge = Judge(net, ev_ckpt["config"], ev_ckpt["metrics"], paths[key], suffix)
        if judge.arch == guide_arch:
            raise GuidelabError(
                f"{key} is a {judge.arch} like the classifier that guides (classifier_ckpt); a judge must be of "
                "another family than every guiding network, or it reads what the guide wrote (e.g. "
                "classifier=evaluator_vgg and classifier=evaluator_mixer judge a ResNet guide)"
            )
        if judges and judge.arch == judges[0].arch:
            raise GuidelabError(
                f"second_evaluator_ckpt is a {judge.arch} like the primary evaluator; the second opinion "
                "must be of another family (train one with classifier=evaluator_vgg seed=1)"
            )
        judges.append(judge)
    return judges


def _partner(path: str, role: str, unet_ckpt: dict, device: torch.device):
    """A network that works with the UNet (guide, noisy or clean classifier, evaluator, regressor), checked: the same
    data, the same noise schedule (guide, noisy classifier, regressor), and the right kind of classifier."""
    net, ckpt = load(path, "diffusion" if role == "guide" else "classifier", device)
    if unet_ckpt["config"]["data_info"]["num_classes"] is None and ckpt["config"]["data_info"]["num_classes"]:
        unet_ckpt["config"].setdefault("partner_data_info", ckpt["config"]["data_info"])  # the first partner that
        # knows the classes names them for an unconditional diffusers model
    check_compatible(unet_ckpt, "diffusion checkpoint", ckpt, role, schedule=role in SAME_SCHEDULE)
    found = role_of(ckpt["config"]) if role != "guide" else role
    if found != role and not (role == "clean_classifier" and found == "evaluator"):  # any clean classifier guides x0
        needs = NEEDS.get(role, ROLE_NAMES[role])
        raise GuidelabError(
            f"{path} is {ROLE_NAMES[found]}, but this use needs {needs}; train one with `{TRAIN_HINT[role]}`"
        )
    return net, ckpt


def load_regressor(
    path: str | Path, unet_ckpt: dict, device: torch.device, role: str = "regressor"
) -> tuple[Counted, dict]:
    """The attribute regressor at `path` (EMA weights with its attr_stats and held-out sigma_t), counted, and its
    checkpoint; refused in one line unless it is a regressor of the `role` asked (noisy "regressor", or
    "clean_regressor" for the guides of x0_hat) trained on the UNet's data set and image size, and a noisy one on its
    noise schedule (`_partner`: its x_t must be the UNet's)."""
    net, ckpt = _partner(str(path), role, unet_ckpt, device)
    return Counted(net), ckpt


def resolve(key: str, value: str, root: str, role: str, like: dict | None = None, unlike: tuple[str, ...] = ()) -> str:
    """A checkpoint path as given, or for `latest` the newest matching run's (printed)."""
    if value != "latest":
        return value
    path = str(find_latest(root, role, like, key, unlike).resolve())
    print(f"{key}=latest: {path}")
    return path
