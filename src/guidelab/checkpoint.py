"""Checkpoints: plain dicts of state_dicts, step, RNG states and the resolved config; atomic writes; safe loads.

Layout of a checkpoint (all entries load under `torch.load(weights_only=True)`):
  kind       "diffusion" or "classifier"
  model, ema state_dicts (sampling uses ema); optimizer, scheduler state_dicts
  step       optimizer steps taken
  data       {"perm": the epoch's data order, "cursor": where the next batch starts}
  rng        {"torch": [ByteTensor per DDP rank], "cuda": [[ByteTensor per device] per rank], "data": ByteTensor}
  config     the resolved run config as plain containers (networks are rebuilt from it)
  metrics    final figures of the run (e.g. the evaluator's test accuracy)
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from guidelab import dist
from guidelab.errors import GuidelabError
from guidelab.files import atomic_torch

NUMBERED = "[0-9]" * 7 + ".pt"  # checkpoints/{step:07d}.pt; checkpoints/last.pt is a second name of the newest


class DamagedCheckpoint(GuidelabError):
    """A checkpoint file that is truncated or not a torch.save archive (as opposed to one refused for its content)."""


def load(path: str | os.PathLike, kind: str | None = None) -> dict:
    """Load a checkpoint with `torch.load(weights_only=True)` (no pickled code runs); every failure is a one-line
    GuidelabError naming the file and what to do."""
    path = Path(path)
    if not path.is_file():
        raise GuidelabError(
            f"checkpoint {path} does not exist; pass the path of a .pt file written by a training run "
            "(RUN_DIR/checkpoints/last.pt)"
        )
    corrupt = (
        f"checkpoint {path} is corrupt or truncated (not a complete torch.save archive); re-copy it or use "
        "another checkpoint of the run (RUN_DIR/checkpoints/)"
    )
    if not zipfile.is_zipfile(path):
        raise DamagedCheckpoint(corrupt)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), "")
        raise GuidelabError(
            f"checkpoint {path} was refused: it holds pickled objects other than tensors and plain "
            f"containers ({reason or 'weights_only load failed'}); load only checkpoints written by "
            "guidelab"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise DamagedCheckpoint(f"{corrupt[:-1]} ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "kind" not in ckpt:
        raise GuidelabError(
            f"{path} is not a guidelab checkpoint (no kind/config entries); pass a file written by "
            "train_diffusion.py or train_classifier.py"
        )
    if kind is not None and ckpt["kind"] != kind:
        script = "train_diffusion.py" if kind == "diffusion" else "train_classifier.py"
        raise GuidelabError(
            f"{path} is a {ckpt['kind']} checkpoint but a {kind} checkpoint is needed here; "
            f"pass one written by {script}"
        )
    return ckpt


# ---------------------------------------------------------------- a training run's checkpoints
def refuse_overwrite(run_dir: Path) -> None:
    """A fresh run never writes into a run dir that holds another run's checkpoints."""
    if any((Path(run_dir) / "checkpoints").glob("*.pt")):
        raise GuidelabError(
            f"{run_dir} already holds checkpoints of a run; pass resume=true to continue it, "
            "or choose another hydra.run.dir"
        )


def state(
    kind: str,
    modules: dict,
    step: int,
    data: dict,
    rngs: list[dict],
    data_gen: torch.Generator,
    config: dict,
    metrics: dict | None = None,
) -> dict:
    """The checkpoint of a training run: the state_dict of each of `modules` (model, ema, optimizer, scheduler) under
    its name, every DDP rank's RNG states (`rngs`, gathered in rank order), the data order and the config."""
    return {
        "kind": kind,
        **{name: m.state_dict() for name, m in modules.items()},
        "step": step,
        "data": data,
        "rng": {"torch": [r["torch"] for r in rngs], "cuda": [r["cuda"] for r in rngs], "data": data_gen.get_state()},
        "config": config,
        "metrics": metrics or {},
    }


def rng_state(device: torch.device) -> dict:
    """This process's RNG states (a DDP rank gathers every rank's into the checkpoint)."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}


def save(ckpt: dict, ckpt_dir: Path, keep: int) -> Path:
    """Write checkpoints/{step:07d}.pt atomically, make last.pt a second name of it (a hard link swapped in by rename),
    and delete all but the newest `keep` numbered checkpoints."""
    path = ckpt_dir / f"{ckpt['step']:07d}.pt"
    atomic_torch(ckpt, path)
    tmp = ckpt_dir / ".last.pt.link"
    tmp.unlink(missing_ok=True)
    os.link(path, tmp)
    os.replace(tmp, ckpt_dir / "last.pt")
    for old in sorted(ckpt_dir.glob(NUMBERED))[:-keep]:
        old.unlink()
    return path


def newest_intact(ckpt_dir: Path, kind: str) -> tuple[dict, Path] | None:
    """The checkpoint to resume from: last.pt, or, if it is missing or damaged, the newest numbered checkpoint that
    loads (saying which); None if the run dir holds none. A file refused for its content is never skipped."""
    damaged = []
    for path in [ckpt_dir / "last.pt"] + sorted(ckpt_dir.glob(NUMBERED), reverse=True):
        try:
            ckpt = load(path, kind=kind) if path.is_file() else None
        except DamagedCheckpoint as e:
            damaged.append(f"{path.name} ({str(e).split(';')[0].split(' is ')[-1]})")
            continue
        if ckpt is not None:
            if damaged:
                print(f"resume: skipped damaged {', '.join(damaged)}; continuing from {path} (step {ckpt['step']})")
            return ckpt, path
    if damaged:
        raise GuidelabError(
            f"every checkpoint in {ckpt_dir} is damaged ({', '.join(damaged)}); nothing to resume "
            "from: start a new run in another hydra.run.dir"
        )
    return None


# Config keys added after runs were saved without them, with the value that means what those runs did: a run saved
# before a key existed resumes under a config that holds the key at this value.
ADDED_KEYS = {"model": {"beta_embed": False}, "classifier": {"pgd_norm": "linf", "entropy_weight": 0.0}}


def _same_section(sec: str, before: dict | None, now: dict) -> bool:
    """A saved config section equals the current one, keys the saved run predates counted at their ADDED_KEYS value."""
    if before is None:
        return False
    added = {k: v for k, v in ADDED_KEYS.get(sec, {}).items() if k not in before and k in now}
    return {**before, **added} == now


def restore(
    ckpt: dict, path: Path, config: dict, modules: dict, data_gen: torch.Generator, device: torch.device, seed: int
) -> tuple[int, dict]:
    """Continue a run: refuse another model, classifier, diffusion or dataset config (or class names) than the
    checkpoint's (the data root may move), load every module's state, and give each DDP rank its own saved RNG state
    back (a rank the checkpoint has none for, when the run now has more ranks, is seeded from seed, rank and step).
    Returns (step, data)."""
    before, rank = ckpt["config"], dist.rank()
    sections = [s for s in ("model", "classifier", "diffusion") if s in config]
    mismatch = [s for s in sections if not _same_section(s, before.get(s), config[s])]
    names = [c.get("data_info", {}).get("class_names") for c in (before, config)]  # an image folder's may change
    if any(before["dataset"][k] != config["dataset"][k] for k in ("name", "image_size")) or names[0] != names[1]:
        mismatch.append("dataset")
    if mismatch:
        raise GuidelabError(
            f"resume=true but the {', '.join(mismatch)} config differs from the checkpoint in {path}; "
            "resume with the same settings or use a new hydra.run.dir"
        )
    for name, module in modules.items():
        module.load_state_dict(ckpt[name])
    rng = ckpt["rng"]
    if not isinstance(rng["torch"], list):  # written before per-rank states: one state, every rank gets it
        rng = {**rng, "torch": [rng["torch"]] * dist.world_size(), "cuda": [rng["cuda"]] * dist.world_size()}
    if rank < len(rng["torch"]):
        torch.set_rng_state(rng["torch"][rank])
        if device.type == "cuda" and rng["cuda"][rank]:
            torch.cuda.set_rng_state_all(rng["cuda"][rank])
    else:
        torch.manual_seed(seed + rank + 7919 * ckpt["step"])
    data_gen.set_state(rng["data"])
    if dist.is_main() and len(rng["torch"]) != dist.world_size():
        print(
            f"note: the checkpoint holds RNG states of {len(rng['torch'])} rank(s), this run has {dist.world_size()}: "
            "weights, optimizer and data order continue exactly, the noise draws do not"
        )
    print(f"resumed from {path} at step {ckpt['step']}")
    return ckpt["step"], ckpt["data"]
