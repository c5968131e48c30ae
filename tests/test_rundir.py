"""One run per run dir (guidelab.rundir): a held dir refuses a second holder in one line naming the first, and the
lock of a run that died (however: here SIGKILL) is taken over without anyone removing it. A sampling run's shards
(guidelab.shards): reused only with resume=true under the same config, checked, and removed at the end. The kills
through the real scripts are in tests/test_robustness.py."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf

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
    shards.remove(tmp_path)
    assert not (tmp_path / "shards").exists()
