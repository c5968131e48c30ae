"""FID, IS, precision/recall against closed forms and limiting cases; the reference cache; Inception's clear error."""

import math
import multiprocessing
import os
import time

import numpy as np
import pytest
import torch

from guidelab import metrics
from guidelab.errors import GuidelabError
from guidelab.files import atomic_torch


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


def _brute_force_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[int, int]:
    """Kynkaanniemi et al. 2019 by hand: how many fakes lie in some real k-NN ball, how many reals in some fake one."""

    def radius(points, i):  # distance from points[i] to its k-th nearest other point
        return sorted(math.dist(points[i], points[j]) for j in range(len(points)) if j != i)[k - 1]

    def inside(query, support):
        radii = [radius(support, j) for j in range(len(support))]
        return sum(any(math.dist(q, s) <= r for s, r in zip(support, radii)) for q in query)

    return inside(fake, real), inside(real, fake)


def test_precision_recall_matches_a_brute_force_reference():
    """torch-fidelity's features_1 = generated / features_2 = real convention, checked point by point: a tight fake
    cloud inside a wide real one has high precision and low recall, so a swap would show."""
    g = torch.Generator().manual_seed(5)
    real = torch.randn(40, 2, generator=g, dtype=torch.float64)
    fake = 0.5 * torch.randn(40, 2, generator=g, dtype=torch.float64) + torch.tensor([1.5, 0.0], dtype=torch.float64)
    n_precise, n_recalled = _brute_force_precision_recall(real.tolist(), fake.tolist(), k=3)
    assert 0 < n_recalled < n_precise < 40  # a case that tells precision from recall
    precision, recall = metrics.precision_recall(real, fake, k=3)
    assert (round(precision * 40), round(recall * 40)) == (n_precise, n_recalled)
    assert (precision, recall) == pytest.approx((n_precise / 40, n_recalled / 40), abs=1e-7)
    assert metrics.precision_recall(fake, real, k=3) == (recall, precision)


def test_inception_score_limits():
    k = 10
    assert metrics.inception_score(torch.zeros(1000, k), splits=1) == pytest.approx(1.0, abs=1e-6)
    confident = torch.nn.functional.one_hot(torch.arange(1000) % k, k).float() * 100
    assert metrics.inception_score(confident, splits=1) == pytest.approx(k, rel=1e-4)
    assert metrics.inception_score(confident, splits=10) == pytest.approx(k, rel=0.05)


def test_inception_score_does_not_depend_on_the_global_rng():
    """The split shuffle has its own fixed seed: reseeding torch and numpy between calls changes nothing."""
    logits = 3 * torch.randn(1000, 10, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    np.random.seed(0)
    first = metrics.inception_score(logits, 10)
    torch.manual_seed(12345)
    np.random.seed(54321)
    torch.rand(7)
    np.random.rand(7)
    assert metrics.inception_score(logits, 10) == first
    assert metrics.inception_score(logits, 10, seed=metrics.IS_SEED + 1) != first  # the seed does pick the splits


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


def _compute_slowly(path, log, out):
    """One sweep job needing the cache entry at `path` (run in a child process)."""

    def compute():
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # long enough that the other job asks while this one computes
        return {"features": torch.arange(5.0)}

    entry, reused = metrics.cached(
        path, {"dataset": "x"}, lambda p: torch.load(p, weights_only=True), compute, atomic_torch
    )
    torch.save({"features": entry["features"], "reused": reused}, out)


def test_two_jobs_needing_the_same_reference_statistics_at_once_compute_them_once(tmp_path):
    path = tmp_path / "cache" / "x.pt"
    ctx = multiprocessing.get_context("fork")
    jobs = [ctx.Process(target=_compute_slowly, args=(path, tmp_path / "log", tmp_path / f"{i}.pt")) for i in "ab"]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(60)
        assert job.exitcode == 0
    assert len((tmp_path / "log").read_text().split()) == 1  # computed once
    results = [torch.load(tmp_path / f"{i}.pt", weights_only=True) for i in "ab"]
    assert sorted(r["reused"] for r in results) == [False, True]  # the other job read what the first wrote
    assert all(torch.equal(r["features"], torch.arange(5.0)) for r in results)
    assert torch.load(path, weights_only=True)["key"] == {"dataset": "x"}  # one intact entry
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.pt", "x.pt.lock"]  # no temporary file left


def test_a_damaged_cache_entry_is_computed_again_and_replaced(tmp_path, capsys):
    path, key = tmp_path / "x.pt", {"dataset": "x"}
    read = lambda p: torch.load(p, weights_only=True)
    atomic_torch({"key": key, "features": torch.ones(3)}, path)
    path.write_bytes(path.read_bytes()[:40])  # truncated
    entry, reused = metrics.cached(path, key, read, lambda: {"features": torch.zeros(3)}, atomic_torch)
    assert not reused and torch.equal(entry["features"], torch.zeros(3))
    assert f"the cache entry {path} is damaged" in capsys.readouterr().out
    assert torch.equal(read(path)["features"], torch.zeros(3))  # replaced by an intact one
