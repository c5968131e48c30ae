"""Sample metrics: FID and IS (torchmetrics), improved precision and recall (Kynkaanniemi et al. 2019), and class
accuracy, in one of two feature spaces:

  evaluator   the codebase's clean-image evaluator: penultimate features for FID / P-R, its softmax for IS. Works
              offline; numbers are NOT comparable with literature FIDs (tables say which features were used).
  inception   the standard TF-Inception v3 (2048-d pool features, logits for IS) via torch-fidelity, from a local
              weights file (metrics.inception_weights=FILE or the torch hub cache); never downloaded here.

Accuracy always comes from the evaluator, never from the guidance classifier (guidance optimises that one).
Real-data reference features are computed once and cached on disk, keyed by dataset, image size, split, feature
backend and the exact evaluator / Inception weights file.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from guidelab.errors import GuidelabError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's port of the TF-Inception FID net
BACKENDS = ("evaluator", "inception")


class Features(NamedTuple):
    features: torch.Tensor  # (N, D) float32: FID and precision/recall space
    logits: torch.Tensor  # (N, K) float32: IS (softmax over K)


# ---------------------------------------------------------------- feature backends
def _to_input(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 NHWC (samples.npz layout) -> float NCHW in [-1, 1] on `device`."""
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


class EvaluatorFeatures:
    """The clean-image evaluator: (penultimate features, logits) at t = 0."""

    name = "evaluator"

    def __init__(self, evaluator: nn.Module):
        self.net = evaluator.eval()

    @torch.no_grad()
    def __call__(self, images: np.ndarray, device: torch.device) -> Features:
        x = _to_input(images, device)
        t = torch.zeros(len(x), dtype=torch.long, device=device)
        feats = self.net.features(x, t)
        return Features(feats.float().cpu(), self.net.head.proj(feats).float().cpu())


def find_inception_weights(path: str | None) -> Path:
    """The local TF-Inception weights: `metrics.inception_weights`, else the torch hub cache; a clear error if absent."""
    candidates = [Path(path).expanduser()] if path else [Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE]
    for c in candidates:
        if c.is_file():
            return c
    raise GuidelabError(f"Inception weights not found (looked for {', '.join(map(str, candidates))}); download "
                        f"{INCEPTION_FILE} (torch-fidelity release v0.2.0) on a machine with internet and pass "
                        "metrics.inception_weights=FILE, or use metrics.features=evaluator")


class InceptionFeatures:
    """TF-Inception v3 as ported by torch-fidelity (the network behind torchmetrics' FID): 2048-d pool features and
    the 1008 unbiased logits, on uint8 images resized inside to 299x299; grey images are repeated to RGB."""

    name = "inception"

    def __init__(self, weights: str | None, device: torch.device):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.weights = find_inception_weights(weights)
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(self.weights)).to(device).eval()

    @torch.no_grad()
    def __call__(self, images: np.ndarray, device: torch.device) -> Features:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        feats, logits = self.net(x)
        return Features(feats.float().cpu(), logits.float().cpu())


def extract(backend, images: np.ndarray, device: torch.device, batch_size: int = 500) -> Features:
    parts = [backend(images[i:i + batch_size], device) for i in range(0, len(images), batch_size)]
    return Features(torch.cat([p.features for p in parts]), torch.cat([p.logits for p in parts]))


# ---------------------------------------------------------------- metrics on features
class _Given(nn.Module):
    """Lets torchmetrics' FID / IS consume features computed once outside it."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, Eq. 6), by torchmetrics."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_Given(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def inception_score(logits: torch.Tensor, splits: int = 10) -> float:
    """IS = exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016), mean over `splits` splits, by torchmetrics."""
    from torchmetrics.image.inception import InceptionScore

    metric = InceptionScore(feature=_Given(logits.shape[1]), splits=splits)
    metric.update(logits.double())
    return float(metric.compute()[0])


def _kth_neighbour_radius(x: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row."""
    out = [torch.cdist(x[i:i + chunk], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), chunk)]
    return torch.cat(out)


def _covered(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """For each query row: is it inside at least one support ball (centre support_j, radius radii_j)?"""
    out = [(torch.cdist(query[i:i + chunk], support) <= radii[None]).any(dim=1) for i in range(0, len(query), chunk)]
    return torch.cat(out)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, Eqs. 1-3): the data manifold is the union of balls
    around each real feature reaching its k-th nearest real neighbour; precision = share of fakes inside it, recall =
    share of reals inside the same construction around the fakes."""
    real, fake = real.float(), fake.float()
    precision = _covered(fake, real, _kth_neighbour_radius(real, k)).float().mean()
    recall = _covered(real, fake, _kth_neighbour_radius(fake, k)).float().mean()
    return float(precision), float(recall)


def class_accuracy(logits: torch.Tensor, labels: np.ndarray) -> dict:
    """How often the evaluator's label equals the requested one: overall and per class."""
    correct = logits.argmax(-1).numpy() == labels
    per_class = {str(c): float(correct[labels == c].mean()) for c in np.unique(labels)}
    return {"accuracy": float(correct.mean()), "accuracy_per_class": per_class}


# ---------------------------------------------------------------- reference statistics cache
def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def reference_key(dataset: dict, split: str, backend: str, weights_file: str | Path, num: int | None) -> dict:
    """What the cached real features depend on; any change means a new cache entry."""
    return {"dataset": dataset["name"], "image_size": int(dataset["image_size"]), "split": split, "backend": backend,
            "weights_sha256": file_digest(weights_file), "num": num}


def reference_features(key: dict, backend, dataset: dict, cache_dir: str | Path, device: torch.device,
                       seed: int = 0) -> tuple[Features, Path, bool]:
    """Real-data features for `key`, from the cache when present (returns features, cache file, whether reused)."""
    from guidelab import checkpoint
    from guidelab.data import load_dataset
    from guidelab.images import to_uint8

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir).expanduser() / f"{key['dataset']}-{key['image_size']}px-{key['split']}-{key['backend']}-{digest}.pt"
    if path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.get("key") == key:
            return Features(cached["features"], cached["logits"]), path, True
    data = load_dataset(dataset["name"], split=key["split"], root=dataset.get("root"),
                        image_size=dataset["image_size"], download=dataset.get("download", False))
    images = to_uint8(data.images)  # quantised exactly like the samples
    if key["num"] is not None and key["num"] < len(images):
        images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:key["num"]].numpy()]
    feats = extract(backend, images, device)
    checkpoint.save_atomic({"key": key, "features": feats.features, "logits": feats.logits}, path)
    return feats, path, False


def evaluate_samples(images: np.ndarray, labels: np.ndarray, metrics_cfg, dataset: dict, evaluator,
                     evaluator_path: str | None, device: torch.device) -> dict:
    """All metrics of one sample set: FID, IS, precision, recall in `metrics_cfg.features`, accuracy under the
    evaluator. Returns a flat dict for metrics.json."""
    ev = EvaluatorFeatures(evaluator)
    if metrics_cfg.features == "inception":
        backend = InceptionFeatures(metrics_cfg.inception_weights, device)
        weights_file = backend.weights
    else:
        backend, weights_file = ev, evaluator_path
    key = reference_key(dataset, metrics_cfg.reference_split, backend.name, weights_file, metrics_cfg.reference_num)
    real, cache_path, reused = reference_features(key, backend, dataset, metrics_cfg.cache_dir, device)
    fake = extract(backend, images, device)
    fake_ev = fake if backend is ev else extract(ev, images, device)
    precision, recall = precision_recall(real.features, fake.features, metrics_cfg.k)
    return {"features": backend.name, "fid": fid(real.features, fake.features),
            "is": inception_score(fake.logits, metrics_cfg.is_splits), "precision": precision, "recall": recall,
            **class_accuracy(fake_ev.logits, labels), "reference": str(cache_path), "reference_reused": reused,
            "reference_split": metrics_cfg.reference_split, "num_reference": len(real.features)}
