"""The networks a sampling run uses: found (`latest`), rebuilt from their checkpoints (EMA weights, the layout from the
embedded config), checked to fit together, and wrapped to count their evaluations."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from guidelab import checkpoint
from guidelab.diffusion import Diffusion
from guidelab.errors import GuidelabError
from guidelab.guidance import MODES
from guidelab.models import build_classifier, build_unet

TRAIN_HINT = {"diffusion": "python train_diffusion.py", "classifier": "python train_classifier.py",
              "evaluator": "python train_classifier.py classifier=evaluator"}


class Counted:
    """A network that counts the rows (samples) it is evaluated on; attributes pass through to the network."""

    def __init__(self, net):
        self.net, self.rows = net, 0

    def __call__(self, x: torch.Tensor, *args):
        self.rows += len(x)
        return self.net(x, *args)

    def __getattr__(self, name):
        return getattr(self.net, name)


def load(path: str | Path, kind: str, device: torch.device):
    """Rebuild a network from the config embedded in its checkpoint and load its EMA weights (eval mode)."""
    ckpt = checkpoint.load(path, kind=kind)
    cfg, info = ckpt["config"], ckpt["config"]["data_info"]
    build = build_unet if kind == "diffusion" else build_classifier
    net = build(cfg["model"] if kind == "diffusion" else cfg["classifier"], info["channels"],
                cfg["dataset"]["image_size"], info["num_classes"])
    try:
        net.load_state_dict(ckpt["ema"])
    except RuntimeError:
        raise GuidelabError(f"the weights in {path} do not fit the network its own config describes; the checkpoint "
                            "was written by another version of guidelab or edited; retrain it") from None
    return net.to(device).eval(), ckpt


def _role(run: dict) -> str | None:
    if "model" in run:
        return "diffusion"
    return None if "classifier" not in run else "classifier" if run["classifier"]["noisy"] else "evaluator"


def find_latest(root: str | Path, role: str, like: dict | None = None, key: str = "ckpt") -> Path:
    """RUN/checkpoints/last.pt of the newest run (by last.pt's time) under `root` whose RUN/.hydra/config.yaml says it
    trained a `role` network ("diffusion", "classifier": noisy, "evaluator": clean); with `like` (a diffusion
    checkpoint's config) only runs on the same dataset and image size (and, for a noisy classifier, schedule)."""
    runs = []
    for last in Path(root).glob("**/checkpoints/last.pt"):
        cfg_file = last.parents[1] / ".hydra" / "config.yaml"
        run = OmegaConf.to_container(OmegaConf.load(cfg_file)) if cfg_file.is_file() else {}
        same = like is None or (all(run["dataset"][k] == like["dataset"][k] for k in ("name", "image_size"))
                                and (role != "classifier" or run["diffusion"] == like["diffusion"]))
        if _role(run) == role and same:
            runs.append((last.stat().st_mtime, str(last)))
    if not runs:
        match = "" if like is None else f" on {like['dataset']['name']} at {like['dataset']['image_size']}px"
        raise GuidelabError(f"{key}=latest found no {role} run{match} under {Path(root).resolve()} (RUN/checkpoints/"
                            f"last.pt with RUN/.hydra/config.yaml); train one with `{TRAIN_HINT[role]}` or pass {key}=PATH")
    return Path(max(runs)[1])


def data_signature(ckpt: dict) -> dict:
    """What a network was trained on: dataset, class count, channels and image size (for compatibility checks)."""
    cfg = ckpt["config"]
    return {"dataset": cfg["dataset"]["name"], "num_classes": int(cfg["data_info"]["num_classes"]),
            "channels": int(cfg["data_info"]["channels"]), "image_size": int(cfg["dataset"]["image_size"])}


def check_compatible(a: dict, a_name: str, b: dict, b_name: str, schedule: bool = False) -> None:
    """Refuse to combine two checkpoints trained on different data (dataset, classes, channels or image size) or,
    with `schedule`, on different noise schedules."""
    sig_a, sig_b = data_signature(a), data_signature(b)
    if sig_a != sig_b:
        diff = ", ".join(f"{k} {sig_a[k]} vs {sig_b[k]}" for k in sig_a if sig_a[k] != sig_b[k])
        raise GuidelabError(f"{a_name} and {b_name} were trained on different data ({diff}); "
                            f"train the {b_name} with the same dataset= and dataset.image_size= as the {a_name}")
    if schedule and a["config"]["diffusion"] != b["config"]["diffusion"]:
        raise GuidelabError(f"the {b_name} was trained on another noise schedule than the {a_name} "
                            f"({b['config']['diffusion']} vs {a['config']['diffusion']}); train it with the same "
                            "diffusion= settings")


@dataclass
class Networks:
    unet: Counted
    diffusion: Diffusion  # the model's own T-step process
    train_config: dict  # the UNet's training config (dataset, data_info, model, diffusion)
    classifier: Counted | None = None
    guide: Counted | None = None
    evaluator: torch.nn.Module | None = None
    evaluator_test_acc: float | None = None  # the judge's own held-out accuracy
    paths: dict = field(default_factory=dict)  # config key -> the checkpoint path used (`latest` resolved)

    def evaluations(self) -> dict:
        """Rows evaluated so far: UNet passes (the guide's included) and classifier passes (forward + input grad)."""
        return {"nfe": self.unet.rows + (self.guide.rows if self.guide is not None else 0),
                "classifier_nfe": self.classifier.rows if self.classifier is not None else 0}


def for_sampling(cfg, device: torch.device) -> Networks:
    """The UNet and what the guidance mode needs (noisy classifier, guide), plus the evaluator if asked for."""
    needs = MODES.get_entry(cfg.guidance.name).traits["needs"]
    paths = {"ckpt": resolve("ckpt", cfg.ckpt, cfg.runs_root, "diffusion")}
    unet, unet_ckpt = load(paths["ckpt"], "diffusion", device)
    nets = Networks(Counted(unet), Diffusion.from_config(unet_ckpt["config"]["diffusion"]).to(device),
                    unet_ckpt["config"], paths=paths)
    if "guide" in needs:
        if not cfg.guide_ckpt:
            raise GuidelabError(f"guidance={cfg.guidance.name} needs guide_ckpt=PATH: a smaller diffusion model or an "
                                "earlier checkpoint of the same run (RUN_DIR/checkpoints/0000500.pt)")
        paths["guide_ckpt"] = cfg.guide_ckpt
        nets.guide = Counted(_partner(cfg.guide_ckpt, "guide", unet_ckpt, device)[0])
    if "classifier" in needs:
        paths["classifier_ckpt"] = resolve("classifier_ckpt", cfg.classifier_ckpt, cfg.runs_root, "classifier",
                                           unet_ckpt["config"])
        nets.classifier = Counted(_partner(paths["classifier_ckpt"], "classifier", unet_ckpt, device)[0])
    if cfg.evaluator_ckpt:
        paths["evaluator_ckpt"] = resolve("evaluator_ckpt", cfg.evaluator_ckpt, cfg.runs_root, "evaluator",
                                          unet_ckpt["config"])
        nets.evaluator, ev_ckpt = _partner(paths["evaluator_ckpt"], "evaluator", unet_ckpt, device)
        nets.evaluator_test_acc = ev_ckpt["metrics"].get("test_acc")
    return nets


WRONG_ROLE = {"classifier": "{} is a clean-image evaluator, not a noisy classifier; train one with "
                            "`python train_classifier.py classifier=noisy` for guidance",
              "evaluator": "{} is a noisy guidance classifier; judge samples with a clean-image evaluator "
                           "(`python train_classifier.py classifier=evaluator`) instead"}


def _partner(path: str, role: str, unet_ckpt: dict, device: torch.device):
    """A network that works with the UNet (guide, noisy classifier, evaluator), checked: the same data, the same noise
    schedule (guide, classifier), and the right kind of classifier."""
    net, ckpt = load(path, "diffusion" if role == "guide" else "classifier", device)
    check_compatible(unet_ckpt, "diffusion checkpoint", ckpt, role, schedule=role != "evaluator")
    if role != "guide" and ckpt["config"]["classifier"]["noisy"] != (role == "classifier"):
        raise GuidelabError(WRONG_ROLE[role].format(path))
    return net, ckpt


def resolve(key: str, value: str, root: str, role: str, like: dict | None = None) -> str:
    """A checkpoint path as given, or for `latest` the newest matching run's (printed)."""
    if value != "latest":
        return value
    path = str(find_latest(root, role, like, key).resolve())
    print(f"{key}=latest: {path}")
    return path
