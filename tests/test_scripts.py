"""The real entry points, run as a user runs them: the command contract, outputs, sweeps, wandb, resume."""
import json
import shutil
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from conftest import REPO, run_script


def test_command_contract_writes_samples_and_grid(smoke_runs, tmp_path):
    run3 = tmp_path / "RUN3"
    proc = run_script("sample.py", "experiment=smoke", f"ckpt={smoke_runs['diffusion']}",
                      f"classifier_ckpt={smoke_runs['classifier']}", "guidance=cg", "scale=3.0",
                      f"hydra.run.dir={run3}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = np.load(run3 / "samples.npz")
    assert data["images"].dtype == np.uint8 and data["images"].shape == (20, 16, 16, 1)
    assert data["labels"].dtype == np.int64 and sorted(set(data["labels"].tolist())) == list(range(10))
    grid = Image.open(run3 / "grid.png")
    assert grid.size[1] > grid.size[0] / 2  # one row per class: 10 rows of 2 samples
    assert (run3 / ".hydra" / "config.yaml").exists()
    assert not (run3 / "metrics.json").exists()  # no evaluator given


def test_training_outputs_and_embedded_config(smoke_runs):
    ckpt = torch.load(smoke_runs["diffusion"], weights_only=True)
    assert ckpt["kind"] == "diffusion" and ckpt["step"] == 60
    assert ckpt["config"]["dataset"]["name"] == "procedural" and ckpt["config"]["data_info"]["num_classes"] == 10
    assert set(ckpt) >= {"model", "ema", "optimizer", "scheduler", "rng", "config"}
    run_dir = smoke_runs["diffusion"].parent.parent
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")) == ["0000030.pt", "0000060.pt", "last.pt"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [10, 20, 30, 40, 50, 60]
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]
    assert (run_dir / "samples" / "0000060.png").exists()
    cls = torch.load(smoke_runs["classifier"], weights_only=True)
    assert {"test_acc_t125", "test_acc_t875"} <= set(cls["metrics"])
    ev = torch.load(smoke_runs["evaluator"], weights_only=True)
    assert ev["config"]["classifier"]["noisy"] is False and "test_acc" in ev["metrics"]


def test_every_guidance_and_sampler_with_evaluator(smoke_runs, tmp_path):
    for guidance, sampler in [("none", "ddpm"), ("cfg", "ddim"), ("cfg_cg", "ddpm"), ("cg", "ddim")]:
        out = tmp_path / f"{guidance}-{sampler}"
        proc = run_script("sample.py", "experiment=smoke", f"ckpt={smoke_runs['diffusion']}",
                          f"classifier_ckpt={smoke_runs['classifier']}", f"evaluator_ckpt={smoke_runs['evaluator']}",
                          f"guidance={guidance}", f"sampler={sampler}", "sampler.steps=4", "labels=[2,5]",
                          "num_samples=6", "batch_size=4", f"hydra.run.dir={out}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["guidance"] == guidance and metrics["w"] == metrics["scale"] - 1
        assert set(metrics["accuracy_per_class"]) == {"2", "5"} and 0 <= metrics["accuracy"] <= 1
        assert np.load(out / "samples.npz")["labels"].tolist() == [2, 5, 2, 5, 2, 5]


def test_sampling_is_reproducible_for_a_seed(smoke_runs, tmp_path):
    outs = []
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        proc = run_script("sample.py", "experiment=smoke", f"ckpt={smoke_runs['diffusion']}", "guidance=cfg",
                          f"seed={seed}", f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(np.load(tmp_path / name / "samples.npz")["images"])
    assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])


def test_multirun_sweep_and_report(smoke_runs, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_script("sample.py", "-m", "experiment=smoke", "guidance=cfg,cg", "scale=0,3",
                      f"ckpt={smoke_runs['diffusion']}", f"classifier_ckpt={smoke_runs['classifier']}",
                      f"evaluator_ckpt={smoke_runs['evaluator']}", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(sweep.glob("*/metrics.json"))) == 4
    report = subprocess.run([sys.executable, "-m", "guidelab.report", str(sweep)], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    table = (sweep / "accuracy.md").read_text().splitlines()
    assert len(table) == 2 + 4 and table[2].startswith("| cfg | 0 | -1 |") and table[-1].startswith("| cg | 3 | 2 |")
    assert Image.open(sweep / "comparison.png").size[0] > 100


def test_wandb_offline_run_is_written_by_the_real_client(tmp_path):
    run = tmp_path / "W"
    proc = run_script("train_diffusion.py", "experiment=smoke", "logger=wandb", "train.steps=10", "train.eval_every=5",
                      f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb")), list((run / "wandb").rglob("*"))
    assert (run / "metrics.jsonl").read_text().count("train/loss") == 1


def test_resume_continues_bit_exactly(tmp_path):
    """A run resumed from its step-30 checkpoint ends with the same weights, EMA and optimizer as the straight run."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    proc = run_script("train_diffusion.py", "experiment=smoke", f"hydra.run.dir={straight}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "checkpoints" / "0000030.pt", resumed / "checkpoints" / "last.pt")
    proc = run_script("train_diffusion.py", "experiment=smoke", "resume=true", f"hydra.run.dir={resumed}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 60
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
