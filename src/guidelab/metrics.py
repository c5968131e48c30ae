"""Sample metrics: FID, IS and improved precision and recall, by torch-fidelity's feature-level functions (on
features extracted here once), and class accuracy, in one of two feature spaces:

  evaluator   an evaluator (models/evaluator.py: a ResNet, a VGG or an MLP-Mixer, never of a guiding network's
              family): its pooled features for FID / P-R, its softmax for IS. Works offline; numbers are NOT
              comparable with literature FIDs (tables say which features and which evaluator were used).
  inception   the standard TF-Inception v3 (2048-d pool features, logits for IS) via torch-fidelity, from a local
              weights file (metrics.inception_weights=FILE or the torch hub cache); never downloaded here.

Accuracy always comes from the evaluator, never from the guidance classifier (guidance optimises that one).
Real-data reference features are computed once and cached on disk, keyed by dataset, image size, split, feature
backend and the exact evaluator / Inception weights file. The third judge, a k-nearest-neighbour vote among the real
training images in pixel space, is guidelab.knn's.
"""

from __future__ import annotations

import fcntl
import pickle
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from guidelab.errors import GuidelabError, one_line
from guidelab.files import atomic_torch, file_digest, key_digest

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's port of the TF-Inception FID net
BACKENDS = ("evaluator", "inception")
IS_SEED = 2020  # torch-fidelity's default: the split shuffle of the Inception Score, fixed


class Features(NamedTuple):
    features: torch.Tensor  # (N, D) float32: FID and precision/recall space
    logits: torch.Tensor  # (N, K) float32: IS (softmax over K)


# ---------------------------------------------------------------- feature backends
def _to_input(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 NHWC (samples.npz layout) -> float NCHW in [-1, 1] on `device`."""
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


class EvaluatorFeatures:
    """An evaluator: (pooled penultimate features, logits) of clean images."""

    name = "evaluator"

    def __init__(self, evaluator: nn.Module):
        self.net = evaluator.eval()

    @torch.no_grad()
    def __call__(self, images: np.ndarray, device: torch.device) -> Features:
        x = _to_input(images, device)
        t = torch.zeros(len(x), dtype=torch.long, device=device)
        feats = self.net.features(x, t)
        return Features(feats.float().cpu(), self.net.classify(feats).float().cpu())


def find_inception_weights(path: str | None) -> Path:
    """The local TF-Inception weights: `metrics.inception_weights`, else the torch hub cache; a clear error if
    absent."""
    candidates = [Path(path).expanduser()] if path else [Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE]
    for c in candidates:
        if c.is_file():
            return c
    raise GuidelabError(
        f"Inception weights not found (looked for {', '.join(map(str, candidates))}); download "
        f"{INCEPTION_FILE} (torch-fidelity release v0.2.0) on a machine with internet and pass "
        "metrics.inception_weights=FILE, or use metrics.features=evaluator"
    )


class InceptionFeatures:
    """TF-Inception v3 as ported by torch-fidelity (the FID network of the literature): 2048-d pool features and
    the 1008 unbiased logits, on uint8 images resized inside to 299x299 by TF1's bilinear resize as the original FID
    code does (torch-fidelity's interpolate_bilinear_2d_like_tensorflow1x: no antialias); grey images are repeated to
    RGB."""

    name = "inception"

    def __init__(self, weights: str | None, device: torch.device):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.weights = find_inception_weights(weights)
        self.net = (
            FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(self.weights)
            )
            .to(device)
            .eval()
        )

    @torch.no_grad()
    def __call__(self, images: np.ndarray, device: torch.device) -> Features:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        feats, logits = self.net(x)
        return Features(feats.float().cpu(), logits.float().cpu())


def extract(backend, images: np.ndarray, device: torch.device, batch_size: int = 500) -> Features:
    parts = [backend(images[i : i + batch_size], device) for i in range(0, len(images), batch_size)]
    return Features(torch.cat([p.features for p in parts]), torch.cat([p.logits for p in parts]))


# ---------------------------------------------------------------- metrics on features
def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, Eq. 6), by torch-fidelity
    (mean and covariance in float64)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    stats_real = fid_features_to_statistics(real.detach().double().cpu())
    stats_fake = fid_features_to_statistics(fake.detach().double().cpu())
    return float(fid_statistics_to_metric(stats_real, stats_fake, verbose=False)[KEY_METRIC_FID])


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = IS_SEED) -> float:
    """IS = exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016), mean over `splits` splits, by torch-fidelity. The
    samples are shuffled into splits by their own RNG seeded with `seed`, never the global one, so the same logits
    give the same score in any job of a sweep."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric

    out = isc_features_to_metric(logits.detach().cpu(), splits=splits, shuffle=True, rng_seed=seed)
    return float(out[KEY_METRIC_ISC_MEAN])


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, batch_size: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, Eqs. 1-3), by torch-fidelity: the data manifold is the
    union of balls around each real feature reaching its k-th nearest real neighbour; precision = share of fakes
    inside it, recall = share of reals inside the same construction around the fakes. Distances are computed
    `batch_size` rows at a time (torch-fidelity's save_cpu_ram path), never as one full N x N matrix."""
    from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

    # torch-fidelity's convention: features_1 = generated, features_2 = real
    out = prc_features_to_metric(
        features_1=fake.detach().float().cpu(),
        features_2=real.detach().float().cpu(),
        prc_neighborhood=k,
        prc_batch_size=batch_size,
        save_cpu_ram=True,
        verbose=False,
    )
    return float(out[KEY_METRIC_PRECISION]), float(out[KEY_METRIC_RECALL])


def class_accuracy(logits: torch.Tensor, labels: np.ndarray, name: str = "accuracy") -> dict:
    """How often the judge's label (the argmax of `logits`, or `logits` itself if it holds labels) equals the
    requested one: overall and per class."""
    correct = (logits.argmax(-1) if logits.ndim == 2 else logits).cpu().numpy() == labels
    per_class = {str(c): float(correct[labels == c].mean()) for c in np.unique(labels)}
    return {name: float(correct.mean()), f"{name}_per_class": per_class}


# ---------------------------------------------------------------- reference statistics cache
def reference_key(dataset: dict, split: str, backend: str, weights_file: str | Path, num: int | None) -> dict:
    """What the cached real features depend on; any change means a new cache entry (a user's image folder adds its
    root, options and a digest of its files: guidelab.data.data_key)."""
    from guidelab.data import data_key

    return {
        "dataset": dataset["name"],
        "image_size": int(dataset["image_size"]),
        "split": split,
        "backend": backend,
        "weights_sha256": file_digest(weights_file),
        "num": num,
        **data_key(dataset),
    }


def cached(path: Path, key: dict, read, compute, write) -> tuple[dict, bool]:
    """The cache entry at `path` if it holds `key` (returned with True), else `compute()`d and written atomically (a
    damaged entry too: it is derived data, computed again and replaced).
    One job computes an entry while the others of a sweep that need it at the same time wait on an flock on
    PATH.lock (dropped by the kernel however the job ends) and then read what it wrote: computed once, one intact
    file."""

    def hit() -> dict | None:
        if not path.is_file():
            return None
        try:
            entry = read(path)
        except (OSError, EOFError, ValueError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
            print(f"note: the cache entry {path} is damaged ({one_line(e)}); computing it again")
            return None
        return entry if isinstance(entry, dict) and entry.get("key") == key else None

    if (entry := hit()) is not None:
        return entry, True
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (entry := hit()) is not None:  # another job wrote it while this one waited
            return entry, True
        entry = {"key": key, **compute()}
        write(entry, path)
        return entry, False


def reference_features(
    key: dict, backend, dataset: dict, cache_dir: str | Path, device: torch.device, seed: int = 0
) -> tuple[Features, Path, bool]:
    """Real-data features for `key`, from the cache when present (returns features, cache file, whether reused)."""
    from guidelab.data import load_from_config
    from guidelab.images import to_uint8

    digest = key_digest(key, 16)
    path = (
        Path(cache_dir).expanduser()
        / f"{key['dataset']}-{key['image_size']}px-{key['split']}-{key['backend']}-{digest}.pt"
    )

    def compute() -> dict:
        data = load_from_config(dataset, key["split"])  # a folder's own keys (channels, holdout, ...) included
        images = to_uint8(data.images)  # quantised exactly like the samples
        if key["num"] is not None and key["num"] < len(images):
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
            images = images[order[: key["num"]].numpy()]
        feats = extract(backend, images, device)
        return {"features": feats.features, "logits": feats.logits}

    read = lambda p: torch.load(p, map_location="cpu", weights_only=True)
    entry, reused = cached(path, key, read, compute, lambda entry, path: atomic_torch(entry, path))
    return Features(entry["features"], entry["logits"]), path, reused


def evaluator_settings(cache_dir: str | Path) -> dict:
    """The `metrics` settings of sample.yaml's defaults, in the evaluator's features, with the reference cache in
    `cache_dir`: what a script that judges samples outside sample.py passes to `evaluate_samples`."""
    from omegaconf import OmegaConf

    return OmegaConf.create(
        {"features": "evaluator", "inception_weights": None, "reference_split": "test", "reference_num": None}
        | {"k": 3, "is_splits": 10, "cache_dir": str(cache_dir)}
    )


def evaluate_samples(
    images: np.ndarray,
    labels: np.ndarray,
    metrics_cfg,
    dataset: dict,
    evaluator,
    evaluator_path: str | None,
    device: torch.device,
    features: str | None = None,
) -> dict:
    """All metrics of one sample set: FID, IS, precision, recall in `features` (default `metrics_cfg.features`),
    accuracy under the evaluator. Returns a flat dict for metrics.json."""
    ev = EvaluatorFeatures(evaluator)
    if (features or metrics_cfg.features) == "inception":
        backend = InceptionFeatures(metrics_cfg.inception_weights, device)
        weights_file = backend.weights
    else:
        backend, weights_file = ev, evaluator_path
    key = reference_key(dataset, metrics_cfg.reference_split, backend.name, weights_file, metrics_cfg.reference_num)
    real, cache_path, reused = reference_features(key, backend, dataset, metrics_cfg.cache_dir, device)
    fake = extract(backend, images, device)
    fake_ev = fake if backend is ev else extract(ev, images, device)
    precision, recall = precision_recall(real.features, fake.features, metrics_cfg.k)
    return {
        "features": backend.name,
        "fid": fid(real.features, fake.features),
        "is": inception_score(fake.logits, metrics_cfg.is_splits),
        "precision": precision,
        "recall": recall,
        **class_accuracy(fake_ev.logits, labels),
        "reference": str(cache_path),
        "reference_reused": reused,
        "reference_split": metrics_cfg.reference_split,
        "num_reference": len(real.features),
    }
