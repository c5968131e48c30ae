"""Speed of guidelab.morpho.measure: digits per second over 10,000 real 28 x 28 digits (mnist5k's 4,500 training
digits, tiled) with one worker process and with two, and the machine it ran on (CPU, cores, load average: another
process on the cores slows the two-worker figure first).

    python benchmarks/morpho_bench.py
    python benchmarks/morpho_bench.py --n 20000 --workers 1 2 4

The time includes starting the worker processes (spawned: about a second each), as a caller pays it.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import scipy
import skimage

from guidelab import morpho


def digits(n: int) -> np.ndarray:
    """mnist5k's training digits as uint8 (n, 28, 28), tiled to n."""
    # imported here, not at the top: the spawned workers import this script again, and guidelab.data brings torch
    from guidelab.data import load_dataset

    images = load_dataset("mnist5k", "train", download=False).images[:, 0]
    images = ((images + 1) * 127.5).round().byte().numpy()
    return np.resize(images, (n, *images.shape[1:]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="digits to measure")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    args = parser.parse_args(argv)
    images = digits(args.n)
    morpho.measure(images[:20], workers=1)  # warm the caches (the zoom matrix) and the imports
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):  # platform.processor() is only "x86_64" on Linux
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    print(f"machine: {cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}")
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, "
        f"scikit-image {skimage.__version__}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n"
    )
    print("| workers | digits | seconds | digits / s | load average before |")
    print("|---:|---:|---:|---:|---|")
    for workers in args.workers:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        start = time.perf_counter()
        m = morpho.measure(images, workers=workers)
        seconds = time.perf_counter() - start
        assert len(m["area"]) == args.n
        print(f"| {workers} | {args.n} | {seconds:.2f} | {args.n / seconds:.0f} | {load} |")


if __name__ == "__main__":
    main()
