"""Checkpoints: plain dicts of state_dicts, step, RNG states and the resolved config; atomic writes; safe loads.

Layout of a checkpoint (all entries load under `torch.load(weights_only=True)`):
  kind       "diffusion" or "classifier"
  model, ema state_dicts (sampling uses ema); optimizer, scheduler state_dicts
  step       optimizer steps taken
  rng        {"torch": ByteTensor, "cuda": [ByteTensor], "data": ByteTensor}
  config     the resolved run config as plain containers (networks are rebuilt from it)
  metrics    final figures of the run (e.g. the evaluator's test accuracy)
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from guidelab.errors import GuidelabError


def save_atomic(obj: dict, path: str | os.PathLike) -> None:
    """Write to a temporary file in the same directory, flush and fsync it, then rename over `path`: a crash during
    the write leaves any previous file at `path` intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | os.PathLike, kind: str | None = None) -> dict:
    """Load a checkpoint with `torch.load(weights_only=True)` (no pickled code runs); every failure is a one-line
    GuidelabError naming the file and what to do."""
    path = Path(path)
    if not path.is_file():
        raise GuidelabError(f"checkpoint {path} does not exist; pass the path of a .pt file written by a training run "
                            "(RUN_DIR/checkpoints/last.pt)")
    corrupt = (f"checkpoint {path} is corrupt or truncated (not a complete torch.save archive); re-copy it or use "
               "another checkpoint of the run (RUN_DIR/checkpoints/)")
    if not zipfile.is_zipfile(path):
        raise GuidelabError(corrupt)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), "")
        raise GuidelabError(f"checkpoint {path} was refused: it holds pickled objects other than tensors and plain "
                            f"containers ({reason or 'weights_only load failed'}); load only checkpoints written by "
                            "guidelab") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise GuidelabError(f"{corrupt[:-1]} ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "kind" not in ckpt:
        raise GuidelabError(f"{path} is not a guidelab checkpoint (no kind/config entries); pass a file written by "
                            "train_diffusion.py or train_classifier.py")
    if kind is not None and ckpt["kind"] != kind:
        script = "train_diffusion.py" if kind == "diffusion" else "train_classifier.py"
        raise GuidelabError(f"{path} is a {ckpt['kind']} checkpoint but a {kind} checkpoint is needed here; "
                            f"pass one written by {script}")
    return ckpt


def data_signature(ckpt: dict) -> dict:
    """What a network was trained on: dataset, class count, channels and image size (for compatibility checks)."""
    cfg = ckpt["config"]
    return {"dataset": cfg["dataset"]["name"], "num_classes": int(cfg["data_info"]["num_classes"]),
            "channels": int(cfg["data_info"]["channels"]), "image_size": int(cfg["dataset"]["image_size"])}


def check_compatible(a: dict, a_name: str, b: dict, b_name: str) -> None:
    """Refuse to combine two checkpoints trained on different data (dataset, classes, channels or image size)."""
    sig_a, sig_b = data_signature(a), data_signature(b)
    if sig_a != sig_b:
        diff = ", ".join(f"{k} {sig_a[k]} vs {sig_b[k]}" for k in sig_a if sig_a[k] != sig_b[k])
        raise GuidelabError(f"{a_name} and {b_name} were trained on different data ({diff}); "
                            f"train the {b_name} with the same dataset= and dataset.image_size= as the {a_name}")
