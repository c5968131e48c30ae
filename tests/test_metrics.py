"""FID, IS, precision/recall against closed forms and limiting cases; the reference cache; Inception's clear error."""
import math

import numpy as np
import pytest
import torch

from guidelab import metrics
from guidelab.errors import GuidelabError


def test_fid_of_a_set_against_itself_is_zero():
    x = torch.randn(3000, 8, generator=torch.Generator().manual_seed(0))
    assert abs(metrics.fid(x, x)) < 1e-6


def test_fid_between_two_gaussians_matches_the_closed_form():
    """For diagonal covariances: ||mu1 - mu2||^2 + sum(s1 + s2 - 2 sqrt(s1 s2)) (Heusel et al. 2017, Eq. 6)."""
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.tensor([0.0, 1.0, -1.0, 0.5]), torch.tensor([1.0, 1.0, 0.0, -0.5])
    var1, var2 = torch.tensor([1.0, 2.0, 0.5, 1.0]), torch.tensor([1.0, 0.5, 2.0, 3.0])
    a = mu1 + var1.sqrt() * torch.randn(200_000, 4, generator=g)
    b = mu2 + var2.sqrt() * torch.randn(200_000, 4, generator=g)
    closed = ((mu1 - mu2) ** 2).sum() + (var1 + var2 - 2 * (var1 * var2).sqrt()).sum()
    assert metrics.fid(a, b) == pytest.approx(closed.item(), abs=0.03)


def test_precision_recall_identical_and_disjoint_sets():
    x = torch.randn(500, 5, generator=torch.Generator().manual_seed(1))
    assert metrics.precision_recall(x, x, k=3) == (1.0, 1.0)
    assert metrics.precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)


def test_precision_recall_sees_mode_dropping():
    """Fakes covering half of a two-mode real set: precision stays high, recall falls to about a half."""
    g = torch.Generator().manual_seed(2)
    real = torch.cat([torch.randn(500, 2, generator=g), torch.randn(500, 2, generator=g) + 20])
    fake = torch.randn(1000, 2, generator=g)
    precision, recall = metrics.precision_recall(real, fake, k=3)
    assert precision > 0.9 and 0.4 < recall < 0.55


def test_inception_score_limits():
    k = 10
    assert metrics.inception_score(torch.zeros(1000, k), splits=1) == pytest.approx(1.0, abs=1e-6)
    confident = torch.nn.functional.one_hot(torch.arange(1000) % k, k).float() * 100
    assert metrics.inception_score(confident, splits=1) == pytest.approx(k, rel=1e-4)
    assert metrics.inception_score(confident, splits=10) == pytest.approx(k, rel=0.05)


def test_class_accuracy_overall_and_per_class():
    logits = torch.eye(3)[[0, 1, 2, 0]]
    out = metrics.class_accuracy(logits, np.array([0, 1, 1, 0]))
    assert out["accuracy"] == 0.75 and out["accuracy_per_class"] == {"0": 1.0, "1": 0.5}


class CountingBackend:
    name = "evaluator"

    def __init__(self):
        self.images_seen = 0

    def __call__(self, images, device):
        self.images_seen += len(images)
        x = torch.from_numpy(images).float().flatten(1)
        return metrics.Features(x[:, :4], x[:, :3])


def test_reference_cache_is_reused_and_invalidated_by_its_key(tmp_path):
    dataset = {"name": "procedural", "image_size": 16, "root": None, "download": False}
    weights = tmp_path / "evaluator.pt"
    weights.write_bytes(b"evaluator A")
    backend = CountingBackend()
    key = metrics.reference_key(dataset, "test", "evaluator", weights, None)
    first, path, reused = metrics.reference_features(key, backend, dataset, tmp_path / "cache", torch.device("cpu"))
    assert not reused and backend.images_seen == 500 and path.exists()
    again, path2, reused = metrics.reference_features(key, backend, dataset, tmp_path / "cache", torch.device("cpu"))
    assert reused and path2 == path and backend.images_seen == 500 and torch.equal(again.features, first.features)
    weights.write_bytes(b"evaluator B, retrained")  # another evaluator: another key, another entry
    key_b = metrics.reference_key(dataset, "test", "evaluator", weights, None)
    _, path_b, reused = metrics.reference_features(key_b, backend, dataset, tmp_path / "cache", torch.device("cpu"))
    assert not reused and path_b != path and backend.images_seen == 1000
    key_train = metrics.reference_key(dataset, "train", "evaluator", weights, 300)
    feats, _, reused = metrics.reference_features(key_train, backend, dataset, tmp_path / "cache", torch.device("cpu"))
    assert not reused and len(feats.features) == 300


def test_missing_inception_weights_is_a_clear_error_not_a_download(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    with pytest.raises(GuidelabError, match="metrics.inception_weights=FILE") as e:
        metrics.InceptionFeatures(None, torch.device("cpu"))
    assert metrics.INCEPTION_FILE in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(GuidelabError, match=str(tmp_path / "nope.pth")):
        metrics.InceptionFeatures(str(tmp_path / "nope.pth"), torch.device("cpu"))
