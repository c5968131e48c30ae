"""The third judge: a k-nearest-neighbour vote among the real training images in pixel space (`knn_judge`). It has no
weights, so no guiding network shares anything with it and no sample can be steered along its gradient; its held-out
accuracy on the real test split is computed once and cached (guidelab.metrics' cache, keyed by `knn_key`).

    python -m guidelab.knn DATASET [K ...]      # its held-out accuracy, computed afresh
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from guidelab.errors import GuidelabError
from guidelab.files import atomic_text, key_digest
from guidelab.metrics import cached, class_accuracy

KNN_RULE = "uint8-pixels-l2-majority-nearest-v1"  # in the cache key: a change of the rule below is a new entry


def knn_predict(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    chunk: int = 1024,  # queries per block
    train_chunk: int = 2048,  # training images per block: a block of distances (chunk x train_chunk float64, 17 MB)
) -> torch.Tensor:
    """k-nearest-neighbour classification (Cover & Hart 1967, "Nearest neighbor pattern classification"): each query
    takes the majority label of its k nearest training images in Euclidean pixel distance. A tied vote goes to the
    tied class whose nearest member is closest (the 1-NN rule among the tied), and neighbours at equal distance are
    taken in training order. Images are uint8 of any shape (flattened here); the squared distances
    ||q||^2 + ||t||^2 - 2 q.t are sums of integers below 2^53, exact in float64 on any device and BLAS, so the labels
    do not depend on the chunk sizes. Memory: one block of distances and a running k-best per query, never the full
    distance matrix (60,000 x 784 training images against 10,000 queries: ~60 MB of blocks)."""
    n, device = len(train), train.device
    if train.is_floating_point() or queries.is_floating_point():  # exact integer distances are what makes it exact
        raise GuidelabError("knn_predict takes uint8 pixels (guidelab.images.to_uint8), not floats")
    if not 1 <= k <= n:
        raise GuidelabError(f"the k-NN judge needs 1 <= k <= {n} (its training images), got k = {k}; set eval.knn_k")
    train, queries = train.flatten(1), queries.flatten(1).to(device)  # (N, D): each image one vector
    num_classes = int(train_labels.max()) + 1
    out = []
    for q0 in range(0, len(queries), chunk):
        q = queries[q0 : q0 + chunk].double()
        best = q.new_empty((len(q), 0))  # keys d2 * n + index: unique, ordered by distance, then training order
        for t0 in range(0, n, train_chunk):
            t = train[t0 : t0 + train_chunk].double()
            d2 = q.pow(2).sum(1, keepdim=True) + t.pow(2).sum(1) - 2 * q @ t.T
            keys = d2 * n + torch.arange(t0, t0 + len(t), device=device, dtype=torch.float64)
            best = torch.cat([best, keys], 1).topk(min(k, best.shape[1] + len(t)), 1, largest=False).values
        neighbours = train_labels.to(device)[(best % n).long()]  # (chunk, k), nearest first
        onehot = torch.nn.functional.one_hot(neighbours, num_classes)  # (chunk, k, C)
        rank = torch.arange(k, device=device).view(1, k, 1)
        first = torch.where(onehot.bool(), rank, k).amin(1)  # each class's nearest neighbour's rank (k: none)
        out.append((onehot.sum(1) * (k + 1) - first).argmax(1))  # most votes, then the nearest among the tied
    return torch.cat(out).cpu() if out else torch.zeros(0, dtype=torch.long)


def knn_key(dataset: dict, k: int, num_train: int) -> dict:
    """What the k-NN judge's cached held-out accuracy depends on: the data (a folder's files too), the training split
    it votes from, the test split it is scored on, k, the number of training images and the rule."""
    from guidelab.data import data_key

    return {
        "dataset": dataset["name"],
        "image_size": int(dataset["image_size"]),
        "train_split": "train",
        "split": "test",
        "k": int(k),
        "num_train": int(num_train),
        "rule": KNN_RULE,
        **data_key(dataset),
    }


def knn_test_accuracy(
    key: dict, train: torch.Tensor, train_labels: torch.Tensor, dataset: dict, cache_dir: str | Path
) -> tuple[float, Path, bool]:
    """The k-NN judge's accuracy on the real test split, from the cache when present (accuracy, file, reused)."""
    from guidelab.data import load_from_config
    from guidelab.images import to_uint8

    digest = key_digest(key, 16)
    path = Path(cache_dir).expanduser() / "knn" / f"{key['dataset']}-{key['image_size']}px-k{key['k']}-{digest}.json"

    def compute() -> dict:
        test = load_from_config(dataset, key["split"])
        pred = knn_predict(train, train_labels, torch.from_numpy(to_uint8(test.images)).to(train.device), key["k"])
        return {"accuracy": float((pred == test.labels).double().mean()), "num_test": len(test.labels)}

    write = lambda entry, path: atomic_text(path, json.dumps(entry, indent=1) + "\n")  # never half a file
    entry, reused = cached(path, key, lambda p: json.loads(p.read_text()), compute, write)
    return entry["accuracy"], path, reused


def knn_train_set(dataset: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The real training split by the loader of the reference statistics, quantised to uint8 like the samples (NHWC,
    the layout of samples.npz), and its labels."""
    from guidelab.data import load_from_config
    from guidelab.images import to_uint8

    real = load_from_config(dataset, "train")
    return torch.from_numpy(to_uint8(real.images)).to(device), real.labels


def knn_judge(
    images: np.ndarray, labels: np.ndarray, dataset: dict, k: int, cache_dir: str | Path, device: torch.device
) -> dict:
    """The third opinion, which no gradient can push: a k-NN vote among the real training images of the
    run's data (knn_train_set) has no weights, so no guiding network shares anything with it and no sample can be
    steered along its gradient. Returns accuracy_knn (overall and per class) on the samples' requested labels and
    knn_test_acc, its accuracy on the real test split (cached: knn_test_accuracy)."""
    train, train_labels = knn_train_set(dataset, device)
    key = knn_key(dataset, k, len(train))
    test_acc, path, reused = knn_test_accuracy(key, train, train_labels, dataset, cache_dir)
    pred = knn_predict(train, train_labels, torch.from_numpy(np.ascontiguousarray(images)).to(device), k)
    return {
        **class_accuracy(pred, labels, "accuracy_knn"),
        "knn_test_acc": test_acc,
        "knn_k": k,
        "knn_num_train": len(train),
        "knn_reference": str(path),
        "knn_reused": reused,
    }


if __name__ == "__main__":  # python -m guidelab.knn DATASET [K ...]: the k-NN judge's held-out accuracy, computed
    import sys
    import tempfile
    import time

    from guidelab.data import dataset_info

    name, ks = sys.argv[1], [int(a) for a in sys.argv[2:]] or [10]
    cfg = {"name": name, "image_size": dataset_info(name).image_size}
    with tempfile.TemporaryDirectory() as tmp:  # a fresh cache: the time printed is the computation's
        for k in ks:
            t0 = time.perf_counter()
            train, train_labels = knn_train_set(cfg, torch.device("cpu"))
            acc = knn_test_accuracy(knn_key(cfg, k, len(train)), train, train_labels, cfg, tmp)[0]
            print(f"{name}: k-NN judge (k = {k}) held-out accuracy {acc:.4f} ({time.perf_counter() - t0:.1f} s)")
