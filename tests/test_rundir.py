"""One run per run dir (guidelab.rundir): a held dir refuses a second holder in one line naming the first, and the
lock of a run that died (however: here SIGKILL) is taken over without anyone removing it; a second sampling command
into a held dir is told who holds it. A sampling run's shards (guidelab.shards): reused only with resume=true under
the same config and networks (the job key: an allow-list of config keys and the files read), checked, written to
job.json by rank 0 alone, and removed at the end; a finished run kept by a resume (a resumed sweep), refused without
one; a kill between samples.npz and its record resumable. The kills through the real scripts are in
tests/test_robustness.py and tests/test_resume.py."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from conftest import CONFIGS, REPO, check_command_line
from guidelab import rundir, shards
from guidelab.errors import GuidelabError

HOLD = (
    "import sys, time; from guidelab import rundir; rundir.hold(sys.argv[1]); print('held', flush=True); "
    "time.sleep(600)"
)


def _holder_process(run_dir, env: dict | None = None):
    env = {**os.environ, **(env or {})}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env)
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


def test_a_rank_joins_only_a_dir_its_own_rank_0_holds():
    """The rule of a rank > 0 (rundir's docstring): held by its job's rank 0 -> join, by anyone else -> stop, by no one
    yet -> wait (a stale record of a dead run, or of this job's own, decides nothing while the dir is not held)."""
    job = "TORCHELASTIC_RUN_ID=a MASTER_ADDR=n1 MASTER_PORT=29500 WORLD_SIZE=2"
    assert rundir.rank_decision(True, {"pid": 1, "job": job}, job) == "join"
    assert rundir.rank_decision(True, {"pid": 1, "job": job.replace("=a", "=b")}, job) == "stop"
    assert rundir.rank_decision(True, {"pid": 1, "job": None}, job) == "stop"  # a run of one process
    assert rundir.rank_decision(True, {"pid": 1}, job) == "stop"  # a record without a job
    assert rundir.rank_decision(False, {"pid": 1, "job": job}, job) == "wait"
    assert rundir.rank_decision(False, {}, job) == "wait"
    environ = {"RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "a", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}
    assert rundir.job_id(environ) == job and rundir.job_id({"RANK": "0"}) is None


def _job_env(run_id: str, rank: int) -> dict:
    return {"RANK": str(rank), "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": run_id, "MASTER_ADDR": "127.0.0.1"}


@pytest.mark.parametrize("holder_job", ["A", "B", None], ids=["own-rank-0", "another-job", "a-plain-run"])
def test_a_rank_above_0_joins_its_rank_0_and_stops_for_another_run(tmp_path, monkeypatch, holder_job):
    proc = _holder_process(tmp_path / "R", _job_env(holder_job, 0) if holder_job else None)
    for name, value in _job_env("A", 1).items():
        monkeypatch.setenv(name, value)
    try:
        if holder_job == "A":
            rundir.hold(tmp_path / "R")  # rank 1 of the holder's job: joins, takes no lock
            rundir.release(tmp_path / "R")
        else:
            with pytest.raises(GuidelabError, match=rf"is in use by another guidelab run \(pid {proc.pid} on "):
                rundir.hold(tmp_path / "R")
        assert rundir.holder(tmp_path / "R")["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_a_rank_above_0_waits_for_its_rank_0_and_gives_up_in_one_line(tmp_path, monkeypatch):
    for name, value in _job_env("A", 1).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(rundir, "JOIN_TIMEOUT_S", 0.3)
    started = time.monotonic()
    with pytest.raises(GuidelabError, match="rank 1 waited 0 s for rank 0 of its job to hold"):
        rundir.hold(tmp_path / "R")  # nobody holds it: a dead run's lock file is no holder either
    assert time.monotonic() - started >= 0.3 and not (tmp_path / "R").exists()  # a waiting rank writes nothing


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP], ids=["ENOLCK", "EOPNOTSUPP"])
def test_a_filesystem_without_locks_is_refused_in_one_line(tmp_path, monkeypatch, code):
    def flock(fd, how):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(rundir.fcntl, "flock", flock)
    with pytest.raises(GuidelabError) as err:
        rundir.hold(tmp_path / "R")
    message = str(err.value)
    assert "\n" not in message and f"{tmp_path / 'R'} is on a filesystem without file locks" in message, message
    assert os.strerror(code) in message and "choose a hydra.run.dir on a filesystem with locks" in message, message
    assert tmp_path / "R" not in rundir._held


@pytest.mark.slow
def test_the_ranks_of_a_refused_job_all_stop_before_hydra_writes(tmp_path):
    """rank 0 and rank 1 of a two-process job started into a dir that a plain run holds: both refused in one line,
    and the holder's dir gets no .hydra files (before, rank 1 went on into Hydra and then waited for rank 0)."""
    run_dir = tmp_path / "R"
    holder, ranks = _holder_process(run_dir), []
    try:
        ranks += [
            subprocess.Popen(
                [sys.executable, str(REPO / "train_diffusion.py"), "experiment=smoke", f"hydra.run.dir={run_dir}"],
                cwd=tmp_path,
                env={**os.environ, "HYDRA_FULL_ERROR": "0", "MASTER_PORT": "29999", **_job_env("J", rank)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for rank in (0, 1)
        ]
        for proc in ranks:
            try:
                _, err = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            lines = err.strip().splitlines()
            assert proc.returncode == 2 and lines and lines[-1].startswith("error: "), err[-2000:]
            assert f"{run_dir} is in use by another guidelab run (pid {holder.pid} on" in lines[-1], lines[-1]
        assert sorted(p.name for p in run_dir.iterdir()) == [".guidelab.live", ".guidelab.lock"]
    finally:
        for proc in [holder, *ranks]:
            proc.kill()
            proc.wait()


def _sampling_cfg(*overrides: str):
    """sample.py's composed config (every key it has), with `overrides`."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="sample", overrides=list(overrides))


def _key(*overrides: str, paths: dict | None = None, device: str = "cpu") -> dict:
    return shards.job_key(_sampling_cfg(*overrides), paths or {}, device)


COUNTS = {"nfe": 40, "classifier_nfe": 0, "classifier_seconds": None, "seconds": 1.5}


def test_every_key_of_sample_py_is_sorted_into_images_or_not():
    """The allow-list cannot miss a new key by oversight: each key of sample.py's config is in exactly one of
    shards.IMAGES (decides the images), shards.READS (a network whose files are keyed) and shards.NOT_IMAGES (with why
    not)."""
    keys = set(_sampling_cfg().keys())
    places = [set(shards.IMAGES), set(shards.READS), set(shards.NOT_IMAGES)]
    assert keys == set().union(*places), sorted(keys ^ set().union(*places))
    assert sum(len(p) for p in places) == len(keys)  # no key in two places


def test_the_job_key_holds_exactly_the_keys_that_decide_the_images(tmp_path):
    """An allow-list: the judges, metrics, the k-NN judge's k, progress, logger, runs_root, resume and the unused
    classifier_ckpt leave the key alone; every key of shards.IMAGES, the number drawn and the device change it."""
    base = _key()
    assert set(base) == set(shards.IMAGES) | {"num_samples", "device"}  # no network used: no files
    for same in [
        "evaluator_ckpt=/runs/E/last.pt",
        "metrics.k=5",
        "eval.knn_k=3",
        "progress=false",
        "logger=wandb",
        "runs_root=elsewhere",
        "resume=auto",
        "classifier_ckpt=/runs/C/last.pt",  # guidance=cfg reads no classifier: only `paths` names what is read
        "eval.num_samples=7",  # eval=false draws num_samples
    ]:
        assert _key(same) == base, same
    for other in ["scale=4", "schedule=linear", "sampler.steps=7", "labels=[1]", "batch_size=3", "seed=1"]:
        assert _key(other) != base, other
    assert _key("compile=true") != base and _key("guidance=cg") != base
    assert _key("eval.enabled=true", "eval.num_samples=100") == _key("num_samples=100")  # the same 100 samples
    assert _key(device="cuda") != base


def test_the_job_key_changes_when_a_network_is_replaced_at_the_same_path(tmp_path):
    """A checkpoint file, or a file of a diffusers model dir, rewritten in place names another job: a run drawn
    with the old network is refused naming it, never reused."""
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(b"weights one")
    model = tmp_path / "ddpm"
    model.mkdir()
    (model / "config.json").write_text('{"_class_name": "UNet2DModel", "sample_size": 8}')
    (model / "scheduler_config.json").write_text("{}")
    (model / "diffusion_pytorch_model.safetensors").write_bytes(b"weights one")
    paths = {"ckpt": str(ckpt), "guide_ckpt": f"diffusers:{model}", "evaluator_ckpt": str(ckpt)}
    key = _key(paths=paths)
    assert key["ckpt"]["files"][0]["size"] == len(b"weights one") and "evaluator_ckpt" not in key  # judges: no
    assert len(key["guide_ckpt"]["files"]) == 3  # the model dir's files, its scheduler config among them
    labels = np.arange(4)
    shards.start(tmp_path, key, resume=False)
    shards.save(tmp_path, 0, np.zeros((4, 2, 2, 1), np.uint8), labels, COUNTS)
    ckpt.write_bytes(b"other weights, more bytes")  # another checkpoint at the same path
    replaced = _key(paths=paths)
    assert replaced != key and replaced["ckpt"]["path"] == key["ckpt"]["path"]
    with pytest.raises(GuidelabError, match=rf"ckpt \(its file was replaced at {ckpt}\)"):
        shards.start(tmp_path, replaced, resume=True)
    (model / "diffusion_pytorch_model.safetensors").write_bytes(b"other weights, more bytes")
    assert _key(paths=paths)["guide_ckpt"] != replaced["guide_ckpt"]


def test_shards_are_reused_only_with_resume_under_the_same_config_and_checked(tmp_path):
    key = _key()
    assert shards.start(tmp_path, key, resume=False) == {}  # nothing yet: a fresh run
    images, labels = np.zeros((4, 8, 8, 1), np.uint8), np.arange(4)
    shards.save(tmp_path, 3, images, labels, COUNTS)
    with pytest.raises(
        GuidelabError, match="holds 1 finished batches of an interrupted sampling run; pass resume=true"
    ):
        shards.start(tmp_path, key, resume=False)
    with pytest.raises(GuidelabError, match=r"drawn under another config \(scale differ\)"):
        shards.start(tmp_path, {**key, "scale": 4.0}, resume=True)
    (found,) = shards.start(tmp_path, key, resume=True).items()
    assert found[0] == 3
    got, counts = shards.load(found[1], labels)
    assert np.array_equal(got, images) and counts == COUNTS
    with pytest.raises(GuidelabError, match="holds other labels than this run asks for"):
        shards.load(found[1], labels + 1)
    found[1].write_bytes(found[1].read_bytes()[:50])
    with pytest.raises(GuidelabError, match="is damaged .*delete it and resume again"):
        shards.load(found[1], labels)
    shards.finish(tmp_path, images, labels, [COUNTS], 1.5)
    assert [p.name for p in (tmp_path / "shards").iterdir()] == ["job.json"]  # the batches are gone


def test_a_finished_run_is_kept_by_a_resume_and_refused_without_one(tmp_path):
    key = {"ckpt": "/runs/A/last.pt", "scale": 3.0}
    assert shards.written(tmp_path, key, "auto", np.arange(4)) is None  # nothing written yet
    shards.start(tmp_path, key, resume=False)
    images, labels = np.ones((4, 8, 8, 1), np.uint8), np.arange(4)
    shards.finish(tmp_path, images, labels, [{"nfe": 40}], 2.5)
    got, counts, seconds = shards.written(tmp_path, key, "auto", labels)
    assert np.array_equal(got, images) and counts == [{"nfe": 40}] and seconds == 2.5
    with pytest.raises(GuidelabError, match="already holds samples.npz; pass resume=auto to keep it"):
        shards.written(tmp_path, key, False, labels)
    with pytest.raises(GuidelabError, match=r"drawn under another config \(scale differ\)"):
        shards.written(tmp_path, {**key, "scale": 4.0}, True, labels)
    with pytest.raises(GuidelabError, match="is not this run's finished samples"):
        shards.written(tmp_path, key, True, labels[::-1])
    np.savez(tmp_path / "samples.npz", images=images + 1, labels=labels)  # not the file job.json records
    with pytest.raises(GuidelabError, match="is not this run's finished samples"):
        shards.written(tmp_path, key, True, labels)


def test_only_rank_0_writes_the_job_record(tmp_path, monkeypatch):
    """The ranks of a job share its run dir: rank 1 reads job.json, never writes it."""
    monkeypatch.setenv("RANK", "1")
    assert shards.start(tmp_path, {"scale": 3.0}, resume=False) == {}
    assert not (tmp_path / "shards" / "job.json").exists()
    monkeypatch.setenv("RANK", "0")
    shards.start(tmp_path, {"scale": 3.0}, resume=False)
    assert (tmp_path / "shards" / "job.json").is_file()


@pytest.mark.parametrize("resume", [True, "auto"])
def test_a_kill_between_samples_and_its_finished_record_leaves_a_resumable_dir(tmp_path, resume):
    """Killed after samples.npz was written but before job.json recorded the run finished: a resume is not refused
    (it once was, for ever: "is not this run's finished samples"); it reuses every batch, still in RUN/shards, and
    writes the same samples.npz."""
    key, labels = {"scale": 3.0}, np.arange(8)
    images = np.arange(8 * 4, dtype=np.uint8).reshape(8, 2, 2, 1)
    shards.start(tmp_path, key, resume=False)
    for b in (0, 1):
        shards.save(tmp_path, b, images[4 * b : 4 * b + 4], labels[4 * b : 4 * b + 4], COUNTS)
    np.savez(tmp_path / "samples.npz", images=images, labels=labels)  # then the kill: no "finished" record
    assert shards.written(tmp_path, key, resume, labels) is None  # not kept: drawn from the shards
    reuse = shards.start(tmp_path, key, resume)
    assert sorted(reuse) == [0, 1]
    drawn = np.concatenate([shards.load(reuse[b], labels[4 * b : 4 * b + 4])[0] for b in (0, 1)])
    shards.finish(tmp_path, drawn, labels, [COUNTS], 3.0)
    got, _, seconds = shards.written(tmp_path, key, resume, labels)
    assert np.array_equal(got, images) and seconds == 3.0


def test_a_second_run_into_a_dir_that_is_drawing_names_the_holder(tmp_path):
    """While a sampling run draws, its dir holds shards (and at the end samples.npz): a second command into the dir
    is told who holds it, not that an interrupted run left shards behind."""
    run_dir = tmp_path / "R"
    proc = _holder_process(run_dir)
    try:
        shards.save(run_dir, 0, np.zeros((1, 2, 2, 1), np.uint8), np.arange(1), COUNTS)
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
