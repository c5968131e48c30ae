"""Sampling that survives a kill: every finished batch is written at once to RUN/shards/batch_NNNNNN.npz (by the rank
that drew it, atomically), and a rerun with resume=true loads the finished batches and draws only the missing ones.
Batch b's noise comes from seed * 1000003 + b alone, so a resumed run's samples.npz is byte for byte an uninterrupted
run's (on the same device and software). RUN/shards/job.json records what decides the images (`job_key`): a resume
under another config is refused. The shards are removed once samples.npz is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from guidelab.errors import GuidelabError, one_line

SHARDS = "shards"
# keys that do not change the images drawn: how they are judged, shown and found
NOT_IMAGES = ("progress", "evaluator_ckpt", "second_evaluator_ckpt", "runs_root", "metrics", "resume", "logger")
COUNTS = ("nfe", "classifier_nfe", "classifier_seconds", "seconds")  # what each shard adds to the results row


def job_key(cfg, paths: dict) -> dict:
    """What decides the images of a sampling run: its config but NOT_IMAGES and eval.knn_k, with every checkpoint
    as the path actually used (`latest` resolved)."""
    job = OmegaConf.to_container(cfg, resolve=True)
    for key in NOT_IMAGES:
        job.pop(key, None)
    job.get("eval", {}).pop("knn_k", None)
    return job | {k: str(v) for k, v in paths.items() if k in job}


def finished(run_dir: Path) -> list[Path]:
    return sorted((Path(run_dir) / SHARDS).glob("batch_*.npz"))


def refuse_unresumed(run_dir: Path, resume: bool) -> list[Path]:
    """The finished batches in run_dir; refused unless resume=true (a rerun would otherwise draw them again)."""
    done = finished(run_dir)
    if done and not resume:
        raise GuidelabError(
            f"{run_dir} holds {len(done)} finished batches of an interrupted sampling run; pass resume=true to draw "
            "only the missing ones, or choose another hydra.run.dir"
        )
    return done


def start(run_dir: Path, key: dict, resume: bool) -> dict[int, Path]:
    """The finished batches to reuse ({batch: shard}); refuses shards without resume=true, or of another config."""
    shard_dir, done = Path(run_dir) / SHARDS, refuse_unresumed(run_dir, resume)
    meta = shard_dir / "job.json"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    if done:
        saved = json.loads(meta.read_text()) if meta.is_file() else {}
        if saved.get("digest") != digest:
            changed = sorted(
                k for k in set(key) | set(saved.get("key", {})) if key.get(k) != saved.get("key", {}).get(k)
            )
            raise GuidelabError(
                f"resume=true but the shards in {shard_dir} were drawn under another config ({', '.join(changed)} "
                "differ); resume with the same settings or choose another hydra.run.dir"
            )
        return {int(p.stem.split("_")[1]): p for p in done}
    shard_dir.mkdir(parents=True, exist_ok=True)
    _atomic(meta, lambda f: f.write(json.dumps({"digest": digest, "key": key}, default=str, indent=1).encode()))
    return {}


def save(run_dir: Path, b: int, images: np.ndarray, labels: np.ndarray, counts: dict) -> None:
    """Batch b's uint8 images, its labels and what drawing it cost (COUNTS)."""
    path = Path(run_dir) / SHARDS / f"batch_{b:06d}.npz"
    numbers = {k: np.float64(np.nan if counts[k] is None else counts[k]) for k in COUNTS}
    _atomic(path, lambda f: np.savez(f, images=images, labels=labels, **numbers))


def load(path: Path, labels: np.ndarray) -> tuple[np.ndarray, dict]:
    """A finished batch (its images and COUNTS), checked against the labels this run asks of it."""
    try:
        with np.load(path) as data:
            images, saved = data["images"], data["labels"]
            counts = {k: None if np.isnan(data[k]) else float(data[k]) for k in COUNTS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise GuidelabError(
            f"shard {path} is damaged ({one_line(e)}); delete it and resume again: its batch is drawn anew"
        ) from None
    if not np.array_equal(saved, labels):
        raise GuidelabError(f"shard {path} holds other labels than this run asks for; choose another hydra.run.dir")
    return images, counts


def remove(run_dir: Path) -> None:
    """Once samples.npz is written the shards are no longer needed."""
    shard_dir = Path(run_dir) / SHARDS
    for p in [*finished(run_dir), shard_dir / "job.json"]:
        p.unlink(missing_ok=True)
    if shard_dir.is_dir() and not any(shard_dir.iterdir()):
        shard_dir.rmdir()


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)
