"""A sampling run resumed through the real script: keyed by the networks it read, not by their paths (a checkpoint
replaced at the same path is refused, never reused), and a run killed between writing samples.npz and recording it
finished resumes (with resume=true and resume=auto) to the uninterrupted run's samples."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, assert_one_line_error, run_script

# sample.py as a user runs it, but killed (os._exit, as SIGKILL would: nothing is cleaned up) at the moment it would
# write job.json's "finished" record: after samples.npz, before the record.
DIES_BEFORE_THE_RECORD = """
import io, os, runpy, sys
import guidelab.files as files, guidelab.shards as shards
real = files.atomic_write
def dying(path, write):
    if str(path).endswith("job.json"):
        text = io.BytesIO()
        write(text)
        if b'"finished"' in text.getvalue():
            os._exit(137)
    return real(path, write)
files.atomic_write = shards.atomic_write = dying
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _killed_before_the_record(*overrides: str, cwd) -> None:
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-c", DIES_BEFORE_THE_RECORD, str(REPO / "sample.py"), *overrides]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 137, proc.stderr[-3000:]


def _common(ckpt) -> list[str]:
    return ["experiment=smoke", f"ckpt={ckpt}", "guidance=cfg", "num_samples=8", "batch_size=4", "sampler.steps=3"]


@pytest.mark.slow
def test_a_network_replaced_at_its_path_is_refused_not_reused(smoke_runs, tmp_path):
    """The checkpoint a run read is replaced by another at the same path (another step of the same training): the
    finished run (resume=auto) and the killed run's batches (resume=true) are refused naming ckpt; nothing is
    overwritten."""
    ckpt = tmp_path / "model.pt"
    shutil.copy(smoke_runs["diffusion"], ckpt)
    common = _common(ckpt)
    done = run_script("sample.py", *common, f"hydra.run.dir={tmp_path / 'A'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    _killed_before_the_record(*common, f"hydra.run.dir={tmp_path / 'B'}", cwd=tmp_path)
    kept = (tmp_path / "A" / "samples.npz").read_bytes()
    shutil.copy(smoke_runs["diffusion"].parent / "0000030.pt", ckpt)  # other weights, the same path
    for run, resume in (("A", "auto"), ("B", "true")):
        again = run_script("sample.py", *common, f"resume={resume}", f"hydra.run.dir={tmp_path / run}", cwd=tmp_path)
        assert_one_line_error(again, "drawn under another config", f"ckpt (its file was replaced at {ckpt})")
    assert (tmp_path / "A" / "samples.npz").read_bytes() == kept
    assert len(list((tmp_path / "B" / "shards").glob("batch_*.npz"))) == 2  # the killed run's batches stay


@pytest.mark.slow
@pytest.mark.parametrize("resume", ["true", "auto"])
def test_a_kill_before_the_finished_record_resumes_to_the_same_samples(smoke_runs, tmp_path, resume):
    common = _common(smoke_runs["diffusion"])
    straight = run_script("sample.py", *common, f"hydra.run.dir={tmp_path / 'A'}", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    run_dir = tmp_path / "B"
    _killed_before_the_record(*common, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert (run_dir / "samples.npz").is_file()  # killed after samples.npz, before its record
    resumed = run_script("sample.py", *common, f"resume={resume}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume: 2 of 2 batches were drawn before" in resumed.stdout
    assert (run_dir / "samples.npz").read_bytes() == (tmp_path / "A" / "samples.npz").read_bytes()
    assert [p.name for p in (run_dir / "shards").iterdir()] == ["job.json"]  # the batches are gone
    kept = run_script("sample.py", *common, f"resume={resume}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert kept.returncode == 0 and "kept the finished" in kept.stdout, kept.stderr[-3000:]
