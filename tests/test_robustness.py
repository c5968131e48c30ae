"""Runs that survive: pre-emption signals, SIGKILL and exact resume, payload-carrying checkpoints, full or
unwritable output dirs. Through the real entry points."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_checkpoint import Payload

from conftest import REPO, assert_one_line_error, run_script, tree_digest
from guidelab.rundir import holder

ENV = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}


def _start(tmp_path, run_dir, *overrides):
    return subprocess.Popen(
        [sys.executable, str(REPO / "train_diffusion.py"), "experiment=smoke", f"hydra.run.dir={run_dir}", *overrides],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path, proc, timeout=120):
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def _same_state(a_path, b_path):
    a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i]), "optimizer"
    assert torch.equal(a["data"]["perm"], b["data"]["perm"]) and a["data"]["cursor"] == b["data"]["cursor"]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    common = ["train.steps=160", "train.ckpt_every=20", "train.eval_every=0", "model.p_uncond=0.3"]
    straight = run_script(
        "train_diffusion.py", "experiment=smoke", *common, f"hydra.run.dir={tmp_path / 'A'}", cwd=tmp_path
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    proc = _start(tmp_path, tmp_path / "B", *common)
    _wait_for(tmp_path / "B" / "checkpoints" / "0000060.pt", proc)
    time.sleep(0.3)  # somewhere between two checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(tmp_path / "B" / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert 60 <= killed_at < 160
    resumed = run_script(
        "train_diffusion.py",
        "experiment=smoke",
        *common,
        "resume=true",
        f"hydra.run.dir={tmp_path / 'B'}",
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {killed_at}" in resumed.stdout
    _same_state(tmp_path / "A" / "checkpoints" / "last.pt", tmp_path / "B" / "checkpoints" / "last.pt")


@pytest.mark.slow
def test_a_second_run_into_a_running_runs_dir_is_refused_and_changes_nothing(tmp_path):
    """Two trainings started into one run dir (a requeued job and a user's rerun): the second is refused in one line
    naming the first, before Hydra writes its .hydra files; the first runs on. Once it is killed, resume takes over."""
    run_dir = tmp_path / "R"
    proc = _start(tmp_path, run_dir, "train.steps=100000", "train.ckpt_every=20", "train.eval_every=0")
    try:
        _wait_for(run_dir / "checkpoints" / "0000020.pt", proc)
        hydra_files = tree_digest(run_dir / ".hydra")
        second = run_script(
            "train_diffusion.py", "experiment=smoke", "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path
        )
        assert_one_line_error(
            second, f"{run_dir} is in use by another guidelab run (pid {proc.pid} on", "choose another hydra.run.dir"
        )
        assert tree_digest(run_dir / ".hydra") == hydra_files and proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert holder(run_dir)["pid"] == proc.pid  # the killed run's record is left: the kernel dropped its lock
    step = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"]
    resumed = run_script(  # resume=auto: what a requeued job passes every time
        "train_diffusion.py",
        "experiment=smoke",
        "resume=auto",
        f"train.steps={step + 5}",
        "train.eval_every=0",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {step}" in resumed.stdout and holder(run_dir)["pid"] != proc.pid


def _interrupt(tmp_path, sig):
    """Start a long run (resume=auto into an empty dir: a fresh run), send `sig` once it trains; it must save its
    current step and say how to resume."""
    run_dir = tmp_path / "R"
    proc = _start(tmp_path, run_dir, "train.steps=100000", "train.ckpt_every=0", "train.eval_every=0", "resume=auto")
    _wait_for(run_dir / "metrics.jsonl", proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert f"resume=auto but {run_dir / 'checkpoints'} holds no checkpoint: starting from step 0" in out
    assert proc.returncode == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: stopped by {sig.name} at step ") and "resume=true" in last, last
    step = int(last.split("at step ")[1].split(";")[0])
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == step > 0
    return run_dir, step


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_the_run_resumes(tmp_path):
    run_dir, step = _interrupt(tmp_path, signal.SIGTERM)
    proc = run_script(
        "train_diffusion.py",
        "experiment=smoke",
        f"train.steps={step + 10}",
        "train.ckpt_every=0",
        "train.eval_every=0",
        "resume=true",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == step + 10


@pytest.mark.slow
def test_sigint_is_handled_like_sigterm(tmp_path):
    _interrupt(tmp_path, signal.SIGINT)


def _evil_checkpoint(path, marker, source):
    ckpt = torch.load(source, weights_only=True)
    ckpt["extra"] = Payload(str(marker))
    torch.save(ckpt, path)


@pytest.mark.slow
def test_payload_checkpoints_are_refused_by_sample_and_resume_and_never_run(smoke_runs, tmp_path):
    marker = tmp_path / "payload-ran"
    _evil_checkpoint(tmp_path / "evil.pt", marker, smoke_runs["diffusion"])
    proc = run_script("sample.py", f"ckpt={tmp_path / 'evil.pt'}", f"hydra.run.dir={tmp_path / 'S'}", cwd=tmp_path)
    assert_one_line_error(proc, "was refused", "Unsupported global")
    run_dir = tmp_path / "R"
    (run_dir / "checkpoints").mkdir(parents=True)
    _evil_checkpoint(run_dir / "checkpoints" / "last.pt", marker, smoke_runs["diffusion"])
    before = tree_digest(run_dir / "checkpoints")
    proc = run_script("train_diffusion.py", "experiment=smoke", "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert_one_line_error(proc, "was refused")
    assert not marker.exists()
    assert tree_digest(run_dir / "checkpoints") == before


@pytest.mark.slow
def test_a_full_disk_is_refused_before_training(tmp_path):
    proc = run_script(
        "train_diffusion.py",
        "experiment=smoke",
        "train.min_free_gb=1e9",
        f"hydra.run.dir={tmp_path / 'R'}",
        cwd=tmp_path,
    )
    assert_one_line_error(proc, "GB free", "train.min_free_gb")
    assert not list((tmp_path / "R").rglob("*.pt"))


@pytest.mark.slow
def test_an_unwritable_run_dir_is_refused_before_hydra_writes(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    for script in ("train_diffusion.py", "sample.py"):
        proc = run_script(script, "experiment=smoke", f"hydra.run.dir={tmp_path / 'a_file' / 'run'}", cwd=tmp_path)
        assert_one_line_error(proc, "cannot create the run dir", "Not a directory", "hydra.run.dir")
    assert (tmp_path / "a_file").read_text() == "not a directory"
    proc = run_script(
        "train_diffusion.py", "-m", "experiment=smoke", "hydra.sweep.dir=/proc/guidelab-sweep", cwd=tmp_path
    )
    assert_one_line_error(proc, "cannot create the run dir /proc/guidelab-sweep", "hydra.sweep.dir")


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "R"
    proc = run_script(
        "train_diffusion.py",
        "experiment=smoke",
        "train.lr=1e30",
        "train.warmup_steps=0",
        "train.log_every=1",
        "train.ckpt_every=1",
        "train.eval_every=0",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert_one_line_error(proc, "loss is inf at step 2", "nothing was saved for it")
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert last["step"] == 1
    assert all(torch.isfinite(v).all() for part in ("model", "ema") for v in last[part].values())
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")) == ["0000001.pt", "last.pt"]


@pytest.mark.slow
def test_only_the_newest_checkpoints_are_kept(tmp_path):
    run_dir = tmp_path / "R"
    proc = run_script(
        "train_diffusion.py",
        "experiment=smoke",
        "train.steps=50",
        "train.ckpt_every=10",
        "train.keep_checkpoints=2",
        "train.eval_every=0",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["0000040.pt", "0000050.pt", "last.pt"]
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == (run_dir / "checkpoints" / "0000050.pt").read_bytes()


@pytest.mark.slow
def test_a_damaged_last_pt_resumes_from_the_newest_intact_checkpoint(tmp_path):
    """last.pt and the newest numbered checkpoint (one file, two names) truncated: resume=true says so, continues from
    the one before, and ends bit-identical to the undamaged run."""
    common = ["train.steps=60", "train.ckpt_every=20", "train.eval_every=0"]
    proc = run_script(
        "train_diffusion.py", "experiment=smoke", *common, f"hydra.run.dir={tmp_path / 'R'}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = tmp_path / "R" / "checkpoints"
    os.replace(ckpts / "last.pt", tmp_path / "intact_last.pt")
    data = (ckpts / "0000060.pt").read_bytes()
    (ckpts / "0000060.pt").unlink()
    (ckpts / "0000060.pt").write_bytes(data[: len(data) // 2])
    os.link(ckpts / "0000060.pt", ckpts / "last.pt")
    proc = run_script(
        "train_diffusion.py",
        "experiment=smoke",
        *common,
        "resume=true",
        f"hydra.run.dir={tmp_path / 'R'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped damaged last.pt" in proc.stdout and "0000040.pt (step 40)" in proc.stdout, proc.stdout
    _same_state(tmp_path / "intact_last.pt", ckpts / "last.pt")


@pytest.mark.slow
def test_a_sampling_run_killed_mid_way_resumes_to_the_identical_samples(smoke_runs, tmp_path):
    """Each finished batch is a shard in the run dir: after SIGKILL the same command is refused without resume=true
    (it would draw everything again), and with it draws only the missing batches; samples.npz is byte for byte the
    uninterrupted run's, the counted NFE too, and the batches are gone."""
    common = [
        "experiment=smoke",
        f"ckpt={smoke_runs['diffusion']}",
        f"evaluator_ckpt={smoke_runs['evaluator']}",
        "guidance=cfg",
        "num_samples=160",
        "batch_size=4",
        "sampler.steps=10",
    ]
    straight = run_script("sample.py", *common, f"hydra.run.dir={tmp_path / 'A'}", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    run_dir = tmp_path / "B"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "sample.py"), *common, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _wait_for(run_dir / "shards" / "batch_000002.npz", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((run_dir / "shards").glob("batch_*.npz")))
    assert 3 <= done < 40 and not (run_dir / "samples.npz").exists()
    again = run_script("sample.py", *common, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert_one_line_error(again, f"holds {done} finished batches", "pass resume=true")
    resumed = run_script("sample.py", *common, "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resume: {done} of 40 batches were drawn before" in resumed.stdout
    assert (run_dir / "samples.npz").read_bytes() == (tmp_path / "A" / "samples.npz").read_bytes()
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "A", run_dir)]
    assert metrics[0]["nfe"] == metrics[1]["nfe"] == 20 and metrics[0]["accuracy"] == metrics[1]["accuracy"]
    assert [p.name for p in (run_dir / "shards").iterdir()] == ["job.json"]  # the batches are gone
