"""Sampling that survives a kill: every finished batch is written at once to RUN/shards/batch_NNNNNN.npz (by the rank
that drew it, atomically), and a rerun with resume=true loads the finished batches and draws only the missing ones.
Batch b's noise comes from seed * 1000003 + b alone, so a resumed run's samples.npz is byte for byte an uninterrupted
run's (on the same device and software). RUN/shards/job.json records what decides the images (`job_key`): a resume
under another config is refused. The batches are removed once samples.npz is written; job.json stays, with what they
cost, so that a resumed sweep (resume=auto or true) reuses a finished job's samples.npz instead of drawing it again.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from guidelab.errors import GuidelabError, one_line
from guidelab.files import atomic_write, key_digest

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


def _same_job(meta: Path, key: dict, what: str) -> dict:
    """job.json's record, refused (naming the keys that differ) unless it was written under `key`."""
    try:
        saved = json.loads(meta.read_text()) if meta.is_file() else {}
    except (OSError, ValueError) as e:
        raise GuidelabError(
            f"{meta} is damaged ({one_line(e)}); delete {meta.parent} to draw the run again, or choose another "
            "hydra.run.dir"
        ) from None
    if saved.get("digest") != key_digest(key):
        changed = sorted(k for k in set(key) | set(saved.get("key", {})) if key.get(k) != saved.get("key", {}).get(k))
        raise GuidelabError(
            f"{what} in {meta.parent.parent} were drawn under another config ({', '.join(changed) or 'not recorded'} "
            "differ); resume with the same settings or choose another hydra.run.dir (a sweep: hydra.sweep.dir)"
        )
    return saved


def start(run_dir: Path, key: dict, resume: bool) -> dict[int, Path]:
    """The finished batches to reuse ({batch: shard}); refuses shards without resume=true, or of another config."""
    shard_dir, done = Path(run_dir) / SHARDS, refuse_unresumed(run_dir, resume)
    meta = shard_dir / "job.json"
    if done:
        _same_job(meta, key, "the finished batches")
        return {int(p.stem.split("_")[1]): p for p in done}
    shard_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(
        meta, lambda f: f.write(json.dumps({"digest": key_digest(key), "key": key}, default=str, indent=1).encode())
    )
    return {}


def written(run_dir: Path, key: dict, resume, labels: np.ndarray) -> tuple[np.ndarray, list[dict], float] | None:
    """A finished run's (images, each rank's counts, seconds) when run_dir holds its samples.npz: reused under
    resume=true|auto, so that a resumed sweep does not draw its finished jobs again, if job.json says they were drawn
    under this config; without resume, refused (no samples.npz is overwritten). None when there is none."""
    path = Path(run_dir) / "samples.npz"
    if not path.is_file():
        return None
    if resume is False:
        raise GuidelabError(
            f"{run_dir} already holds samples.npz; pass resume=auto to keep it (e.g. rerunning a sweep into its "
            "hydra.sweep.dir) or choose another hydra.run.dir"
        )
    saved = _same_job(Path(run_dir) / SHARDS / "job.json", key, "the samples")
    with np.load(path) as data:
        images, saved_labels = data["images"], data["labels"]
    if "finished" not in saved or not np.array_equal(saved_labels, labels):
        raise GuidelabError(f"{path} is not this run's finished samples; choose another hydra.run.dir")
    return images, saved["finished"]["counts"], saved["finished"]["seconds"]


def save(run_dir: Path, b: int, images: np.ndarray, labels: np.ndarray, counts: dict) -> None:
    """Batch b's uint8 images, its labels and what drawing it cost (COUNTS)."""
    path = Path(run_dir) / SHARDS / f"batch_{b:06d}.npz"
    numbers = {k: np.float64(np.nan if counts[k] is None else counts[k]) for k in COUNTS}
    atomic_write(path, lambda f: np.savez(f, images=images, labels=labels, **numbers))


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


def close(run_dir: Path, counts: list[dict], seconds: float) -> None:
    """Once samples.npz is written the batches are no longer needed; job.json keeps what drawing them cost."""
    for p in finished(run_dir):
        p.unlink()
    meta = Path(run_dir) / SHARDS / "job.json"
    record = json.loads(meta.read_text()) | {"finished": {"counts": counts, "seconds": seconds}}
    atomic_write(meta, lambda f: f.write(json.dumps(record, default=str, indent=1).encode()))
