"""Speed levers change speed, not results: a compiled, channels_last training run follows the eager run's loss
trajectory and writes the same checkpoint keys; compiled sampling gives the eager samples. (aot_eager traces the
network through torch.compile without generating kernels, so the test stays within CPU time; inductor's own
kernels are PyTorch's to test. Speeds are measured by `python benchmarks/bench.py --levers`, never asserted.)"""

import json

import numpy as np
import pytest
import torch

from conftest import run_script

pytestmark = pytest.mark.slow  # `make test-fast` leaves this module out


def _losses(run_dir):
    return [
        json.loads(line)["train/loss"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in line
    ]


def test_compiled_channels_last_training_matches_eager(tmp_path):
    runs = {
        "eager": [],
        "levers": ["train.compile=true", "train.compile_backend=aot_eager", "train.channels_last=true"],
    }
    for name, overrides in runs.items():
        proc = run_script(
            "train_diffusion.py",
            "experiment=smoke",
            "train.steps=20",
            "train.eval_every=0",
            *overrides,
            f"hydra.run.dir={tmp_path / name}",
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    eager, levers = _losses(tmp_path / "eager"), _losses(tmp_path / "levers")
    assert len(eager) == 2 and np.allclose(eager, levers, rtol=1e-4), (eager, levers)
    a, b = (torch.load(tmp_path / n / "checkpoints" / "last.pt", weights_only=True) for n in runs)
    assert list(a["model"]) == list(b["model"])  # no torch.compile prefix in the saved names
    for key in a["model"]:
        assert torch.allclose(a["model"][key], b["model"][key], atol=1e-4), key
    assert b["config"]["train"]["compile"] is True and b["config"]["train"]["channels_last"] is True


def test_compiled_sampling_gives_the_eager_samples(smoke_runs, tmp_path):
    for name, overrides in {"eager": [], "compiled": ["compile=true", "compile_backend=aot_eager"]}.items():
        proc = run_script(
            "sample.py",
            "experiment=smoke",
            f"ckpt={smoke_runs['diffusion']}",
            "guidance=cfg",
            *overrides,
            f"hydra.run.dir={tmp_path / name}",
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (np.load(tmp_path / n / "samples.npz")["images"].astype(int) for n in ("eager", "compiled"))
    assert np.abs(a - b).max() <= 1  # uint8 images: at most one level of rounding apart
