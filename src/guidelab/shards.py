"""Sampling that survives a kill: every finished batch is written at once to RUN/shards/batch_NNNNNN.npz (by the rank
that drew it, atomically), and a rerun with resume=true loads the finished batches and draws only the missing ones.
Batch b's noise comes from seed * 1000003 + b alone, so a resumed run's samples.npz is byte for byte an uninterrupted
run's (on the same device and software).

RUN/shards/job.json (written by rank 0 alone, atomically) records what decides the images (`job_key`: the config keys
of IMAGES and the files the networks were read from): a resume under another config, or after a network it reads was
replaced at the same path, is refused naming what changed; nothing drawn before is reused for other images. Refused,
not redrawn: the dir holds another job's work (a finished samples.npz, scored rows), which a silent redraw would
overwrite; the user chooses (another hydra.run.dir, or delete shards/ and samples.npz). At the end
samples.npz is written, then job.json's "finished" record (what the batches cost, samples.npz's digest), then the
batches are removed: a kill at any point leaves a run dir that a resume completes (before the record the batches are
still there and are reused; after it samples.npz is kept). A resumed sweep (resume=auto or true) so keeps a finished
job's samples.npz instead of drawing it again.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from guidelab import dist
from guidelab.errors import GuidelabError, one_line
from guidelab.files import atomic_npz, atomic_text, atomic_write, file_digest, file_stamp, key_digest, tree_stamp
from guidelab.pretrained import is_reference, locate

SHARDS = "shards"
# The config keys that decide the images drawn, and why (an allow-list: a key not named here, such as the judges,
# metrics.*, eval.knn_k, progress, logger, runs_root or resume, may change between a run and its resume).
IMAGES = {
    "guidance": "the mode and its keys",
    "scale": "the guidance strength",
    "schedule": "the CFG weight over t",
    "sampler": "the sampler, its steps, grid, clip_x0 and its own keys",
    "labels": "the class asked of each sample",
    "batch_size": "which samples batch b holds, and its noise seed seed * 1000003 + b",
    "seed": "every batch's noise",
    "compile": "a compiled UNet may round otherwise than the eager one",
    "compile_backend": "likewise",
}
# The networks whose weights decide the images, keyed by what they were read from (the judges' are not).
READS = ("ckpt", "classifier_ckpt", "guide_ckpt", "regressor_ckpt")
# Every other key of sample.py's config, and why it does not decide the images: a new key must be put in IMAGES or
# here (tests/test_rundir.py checks that each key is in exactly one place), so that none is left out by oversight.
NOT_IMAGES = {
    "logger": "where the numbers are logged",
    "evaluator_ckpt": "a judge reads the images, draws none",
    "second_evaluator_ckpt": "likewise",
    "runs_root": "where `latest` looks (the networks found are keyed by READS)",
    "num_samples": "keyed as the number drawn (eval.num_samples under eval=true)",
    "eval": "judging; its num_samples is keyed as the number drawn",
    "metrics": "judging",
    "resume": "whether finished work is reused",
    "device": "keyed as the device type drawn on (cpu, cuda)",
    "progress": "the progress bar",
}
COUNTS = ("nfe", "classifier_nfe", "classifier_seconds", "seconds")  # what each shard adds to the results row


def read_stamp(value: str) -> dict:
    """What names the version of a network a run reads: a checkpoint's path and `file_stamp` (size, modification
    time), or a diffusers model's reference and the stamps of its UNet directory's files and its scheduler config. A
    file replaced or rewritten at the same path gets a new stamp."""
    if is_reference(value):
        unet_dir, scheduler = locate(value)
        files = tree_stamp(unet_dir)
        if unet_dir not in scheduler.parents:  # a pipeline's scheduler/ beside its unet/
            files.append(file_stamp(scheduler))
        return {"path": str(value), "files": files}
    return {"path": str(value), "files": [file_stamp(value)]}


def job_key(cfg, paths: dict, device_type: str) -> dict:
    """What decides the images of a sampling run: the IMAGES keys of its config, the number of samples drawn
    (eval.num_samples with eval=true, else num_samples), the device type it draws on (cpu and cuda kernels round
    differently) and `read_stamp` of every network of READS that the run uses (`paths`: `latest` resolved)."""
    job = OmegaConf.to_container(cfg, resolve=True)
    key = {k: job[k] for k in IMAGES}
    key["num_samples"] = job["eval"]["num_samples"] if job["eval"]["enabled"] else job["num_samples"]
    key["device"] = device_type
    return key | {k: read_stamp(v) for k, v in paths.items() if k in READS}


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


def _differences(key: dict, saved: dict) -> list[str]:
    """The keys whose values differ, a network named as replaced where its path is the same but its files are not."""
    out = []
    for k in sorted(set(key) | set(saved)):
        a, b = key.get(k), saved.get(k)
        if a != b:
            same_path = isinstance(a, dict) and isinstance(b, dict) and "files" in a and a.get("path") == b.get("path")
            out.append(f"{k} (its file was replaced at {a['path']})" if same_path else k)
    return out


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
        changed = _differences(key, saved.get("key", {}))
        raise GuidelabError(
            f"{what} in {meta.parent.parent} were drawn under another config ({', '.join(changed) or 'not recorded'} "
            "differ); resume with the same settings and networks or choose another hydra.run.dir (a sweep: "
            "hydra.sweep.dir)"
        )
    return saved


def start(run_dir: Path, key: dict, resume) -> dict[int, Path]:
    """The finished batches to reuse ({batch: shard}); refuses shards without resume, or of another config. A fresh
    run's job.json is written by rank 0 alone (the ranks of a job share the run dir; they read it, never write it)."""
    shard_dir, done = Path(run_dir) / SHARDS, refuse_unresumed(run_dir, resume)
    meta = shard_dir / "job.json"
    if done:
        _same_job(meta, key, "the finished batches")
        return {int(p.stem.split("_")[1]): p for p in done}
    if dist.is_main():
        atomic_text(meta, json.dumps({"digest": key_digest(key), "key": key}, default=str, indent=1))
    return {}


def written(run_dir: Path, key: dict, resume, labels: np.ndarray) -> tuple[np.ndarray, list[dict], float] | None:
    """A finished run's (images, each rank's counts, seconds) when run_dir holds its samples.npz: reused under
    resume=true|auto, so that a resumed sweep does not draw its finished jobs again, if job.json says they were drawn
    under this config and records this very samples.npz as finished; without resume, refused (no samples.npz is
    overwritten). None when there is none, or when the run was killed before recording it finished (its batches are
    then still in RUN/shards: the resume reuses them and writes the same samples.npz again)."""
    path = Path(run_dir) / "samples.npz"
    if not path.is_file():
        return None
    if resume is False:
        raise GuidelabError(
            f"{run_dir} already holds samples.npz; pass resume=auto to keep it (e.g. rerunning a sweep into its "
            "hydra.sweep.dir) or choose another hydra.run.dir"
        )
    meta = Path(run_dir) / SHARDS / "job.json"
    done = _same_job(meta, key, "the samples").get("finished")
    if done is None:
        return None
    with np.load(path) as data:
        images, saved_labels = data["images"], data["labels"]
    if done.get("samples") != file_digest(path) or not np.array_equal(saved_labels, labels):
        raise GuidelabError(
            f"{path} is not this run's finished samples (not the file {meta} records); delete it to draw the run "
            "again, or choose another hydra.run.dir"
        )
    if dist.is_main():  # a kill after the record, before the batches went: they are not needed
        for p in finished(run_dir):
            p.unlink(missing_ok=True)
    return images, done["counts"], done["seconds"]


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


def finish(run_dir: Path, images: np.ndarray, labels: np.ndarray, counts: list[dict], seconds: float) -> None:
    """Rank 0, at the end: samples.npz, then job.json's "finished" record (what drawing the batches cost, and
    samples.npz's SHA-256), then the batches are removed. Each step is atomic and the order makes every kill
    recoverable: see the module docstring."""
    path = atomic_npz(Path(run_dir) / "samples.npz", images=images, labels=labels)
    meta = Path(run_dir) / SHARDS / "job.json"
    finished_run = {"counts": counts, "seconds": seconds, "samples": file_digest(path)}
    atomic_text(meta, json.dumps(json.loads(meta.read_text()) | {"finished": finished_run}, default=str, indent=1))
    for p in finished(run_dir):
        p.unlink()
