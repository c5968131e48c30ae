"""One run per run dir (guidelab.rundir): a held dir refuses a second holder in one line naming the first, and the
lock of a run that died (however: here SIGKILL) is taken over without anyone removing it; a second sampling command
into a held dir is told who holds it. A sampling run's shards
(guidelab.shards): reused only with resume=true under the same config, checked, and removed at the end; a finished
run kept by a resume (a resumed sweep), refused without one. The kills through the real scripts are in
tests/test_robustness.py."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import check_command_line
from guidelab import rundir, shards
from guidelab.errors import GuidelabError

HOLD = (
    "import sys, time; from guidelab import rundir; rundir.hold(sys.argv[1]); print('held', flush=True); "
    "time.sleep(600)"
)


def _holder_process(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_dir_refuses_a_second_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "R"
    proc = _holder_process(run_dir)
    try:
        with pytest.raises(GuidelabError, match=rf"is in use by another guidelab run \(pid {proc.pid} on "):
            rundir.hold(run_dir)
        assert rundir.holder(run_dir)["pid"] == proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert rundir.holder(run_dir)["pid"] == proc.pid  # the dead run's record stays: a stale file, not a lock
    rundir.hold(run_dir)
    try:
        assert rundir.holder(run_dir)["pid"] == os.getpid()
        rundir.hold(run_dir)  # a process holding the dir may ask again
        second = subprocess.run([sys.executable, "-c", HOLD, str(run_dir)], capture_output=True, text=True, timeout=60)
        assert second.returncode != 0 and f"pid {os.getpid()} on" in second.stderr
    finally:
        rundir.release(run_dir)
    proc = _holder_process(run_dir)  # released: another process takes it
    proc.kill()
    proc.wait()


def test_other_ranks_of_a_job_share_the_dir_without_holding_it(tmp_path, monkeypatch):
    proc = _holder_process(tmp_path / "R")
    try:
        monkeypatch.setenv("RANK", "1")
        rundir.hold(tmp_path / "R")  # rank 1 of the holder's job: no lock taken, nothing refused
        assert rundir.holder(tmp_path / "R")["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_shards_are_reused_only_with_resume_under_the_same_config_and_checked(tmp_path):
    cfg = OmegaConf.create(
        {"ckpt": "latest", "scale": 3.0, "progress": True, "evaluator_ckpt": None, "eval": {"knn_k": 10}}
    )
    key = shards.job_key(cfg, {"ckpt": "/runs/A/last.pt", "classifier_ckpt": "/runs/C/last.pt"})
    assert key == {"ckpt": "/runs/A/last.pt", "scale": 3.0, "eval": {}}  # latest resolved; the judges left out
    assert shards.start(tmp_path, key, resume=False) == {}  # nothing yet: a fresh run
    images, labels = np.zeros((4, 8, 8, 1), np.uint8), np.arange(4)
    shards.save(
        tmp_path, 3, images, labels, {"nfe": 40, "classifier_nfe": 0, "classifier_seconds": None, "seconds": 1.5}
    )
    with pytest.raises(
        GuidelabError, match="holds 1 finished batches of an interrupted sampling run; pass resume=true"
    ):
        shards.start(tmp_path, key, resume=False)
    with pytest.raises(GuidelabError, match=r"drawn under another config \(scale differ\)"):
        shards.start(tmp_path, {**key, "scale": 4.0}, resume=True)
    (found,) = shards.start(tmp_path, key, resume=True).items()
    assert found[0] == 3
    got, counts = shards.load(found[1], labels)
    assert np.array_equal(got, images) and counts == {
        "nfe": 40,
        "classifier_nfe": 0,
        "classifier_seconds": None,
        "seconds": 1.5,
    }
    with pytest.raises(GuidelabError, match="holds other labels than this run asks for"):
        shards.load(found[1], labels + 1)
    found[1].write_bytes(found[1].read_bytes()[:50])
    with pytest.raises(GuidelabError, match="is damaged .*delete it and resume again"):
        shards.load(found[1], labels)
    counts = [{"nfe": 40, "classifier_nfe": 0, "classifier_seconds": None}]
    shards.close(tmp_path, counts, 1.5)
    assert [p.name for p in (tmp_path / "shards").iterdir()] == ["job.json"]  # the batches are gone


def test_a_finished_run_is_kept_by_a_resume_and_refused_without_one(tmp_path):
    key = {"ckpt": "/runs/A/last.pt", "scale": 3.0}
    assert shards.written(tmp_path, key, "auto", np.arange(4)) is None  # nothing written yet
    shards.start(tmp_path, key, resume=False)
    images, labels = np.ones((4, 8, 8, 1), np.uint8), np.arange(4)
    np.savez(tmp_path / "samples.npz", images=images, labels=labels)
    shards.close(tmp_path, [{"nfe": 40}], 2.5)
    got, counts, seconds = shards.written(tmp_path, key, "auto", labels)
    assert np.array_equal(got, images) and counts == [{"nfe": 40}] and seconds == 2.5
    with pytest.raises(GuidelabError, match="already holds samples.npz; pass resume=auto to keep it"):
        shards.written(tmp_path, key, False, labels)
    with pytest.raises(GuidelabError, match=r"drawn under another config \(scale differ\)"):
        shards.written(tmp_path, {**key, "scale": 4.0}, True, labels)
    with pytest.raises(GuidelabError, match="is not this run's finished samples"):
        shards.written(tmp_path, key, True, labels[::-1])


def test_a_second_run_into_a_dir_that_is_drawing_names_the_holder(tmp_path):
    """While a sampling run draws, its dir holds shards (and at the end samples.npz): a second command into the dir
    is told who holds it, not that an interrupted run left shards behind."""
    run_dir = tmp_path / "R"
    proc = _holder_process(run_dir)
    try:
        shards.save(run_dir, 0, np.zeros((1, 2, 2, 1), np.uint8), np.arange(1), dict.fromkeys(shards.COUNTS, 1.0))
        for resume in ("false", "true"):
            line = check_command_line("sample.py", f"hydra.run.dir={run_dir}", f"resume={resume}")
            assert f"is in use by another guidelab run (pid {proc.pid} on " in line, line
        np.savez(run_dir / "samples.npz", images=np.zeros((1, 2, 2, 1), np.uint8), labels=np.arange(1))
        line = check_command_line("sample.py", f"hydra.run.dir={run_dir}")
        assert f"(pid {proc.pid} on " in line, line
    finally:
        proc.kill()
        proc.wait()
    line = check_command_line("sample.py", f"hydra.run.dir={run_dir}")  # the holder is gone: what it left is named
    assert "already holds samples.npz" in line, line


def test_a_damaged_job_record_is_refused_naming_it(tmp_path):
    key = {"ckpt": "/runs/A/last.pt"}
    shards.start(tmp_path, key, resume=False)
    shards.save(tmp_path, 0, np.zeros((1, 2, 2, 1), np.uint8), np.arange(1), dict.fromkeys(shards.COUNTS, 1.0))
    (tmp_path / "shards" / "job.json").write_text('{"digest": ')
    with pytest.raises(GuidelabError, match=r"job.json is damaged .*delete .*shards to draw the run again"):
        shards.start(tmp_path, key, resume=True)


@pytest.mark.parametrize(
    "where, says",
    [
        (lambda t: t / "a_file" / "run", "Not a directory"),
        (lambda t: Path("/proc/guidelab-run"), "/proc/guidelab-run"),  # a pseudo filesystem: FileNotFoundError
        (lambda t: t / ("a" * 300) / "run", "File name too long"),
    ],
    ids=["through-a-file", "proc", "name-too-long"],
)
def test_a_place_that_cannot_hold_a_run_dir_is_refused_and_left_as_it_was(tmp_path, where, says):
    (tmp_path / "a_file").write_text("x")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(GuidelabError, match="cannot create the run dir") as err:
        rundir.probe(where(tmp_path) / "deeper")
    assert says in str(err.value) and "choose another hydra.run.dir" in str(err.value)
    assert sorted(tmp_path.rglob("*")) == before  # nothing created is left behind


def test_the_probe_leaves_no_trace_where_it_can_write(tmp_path):
    rundir.probe(tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()
