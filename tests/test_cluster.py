"""Past one machine, without a cluster: the tasks of a SLURM job step (SLURM's variables on localhost, gloo) and two
torchrun "nodes" meeting through the c10d rendezvous train bit-identically to a torchrun run of the same config;
hydra/launcher=local (submitit's local executor, the slurm preset's twin) runs a real sampling sweep with its report,
and a job it runs that receives SLURM's pre-emption signal saves, is requeued with resume=auto and ends bit-identical
to an uninterrupted run."""

import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from test_robustness import _same_state, _wait_for

from conftest import REPO, check_command_line, run_script
from guidelab.dist import first_host, scheduler_env

ENV = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TRAIN = ["experiment=smoke", "train.steps=60", "train.ckpt_every=20", "train.eval_every=0", "model.p_uncond=0.3"]


def _free_port() -> int:
    """A port in 20000-39999 (the range scheduler_env derives from a SLURM job id) that nothing listens on now."""
    while True:
        port = random.randint(20000, 39999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue


def test_slurm_variables_become_torchruns():
    step = {"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456"}
    step |= {"SLURM_STEP_NODELIST": "gpu[007-010]", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}
    env = scheduler_env(step)
    assert env == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "gpu007",
        "MASTER_PORT": str(20000 + 123456 % 20000),
    }
    assert scheduler_env(step | {"MASTER_PORT": "1234"})["MASTER_PORT"] == "1234"  # the user's port is kept
    assert scheduler_env(step | {"WORLD_SIZE": "2"}) == {}  # torchrun inside the job step: torchrun's variables rule
    assert scheduler_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"}) == {}  # the batch shell
    local = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_NTASKS": "2"}
    env = scheduler_env(local | {"SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_JOB_ID": "77"})
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"], env["MASTER_PORT"]) == ("1", "2", "127.0.0.1", "20077")
    assert scheduler_env({}) == {}


@pytest.mark.parametrize(
    "nodelist, first",
    [("gpu[007-010,12],cpu1", "gpu007"), ("a1,b[2-3]", "a1"), ("n[5]", "n5"), ("localhost", "localhost")],
)
def test_first_host_of_a_slurm_hostlist(nodelist, first):
    assert first_host(nodelist) == first


def test_a_launched_job_resumes_unless_told_otherwise_and_a_requeued_one_always():
    from hydra_plugins.guidelab_cluster.launchers import requeued, with_resume

    assert with_resume(["scale=3"]) == ["scale=3", "resume=auto"]  # SLURM's own requeue reruns this: it continues
    assert with_resume(["scale=3", "resume=false"]) == ["scale=3", "resume=false"]  # what the user typed stands
    assert requeued(["scale=3", "resume=false", "seed=1"]) == ["scale=3", "seed=1", "resume=auto"]
    assert requeued(["scale=3"]) == ["scale=3", "resume=auto"]


def test_the_launcher_presets_compose_with_their_resources():
    from hydra import compose, initialize_config_dir

    from guidelab import config

    config.register()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train_diffusion", ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=8"], True)
        slurm = cfg.hydra.launcher
        assert slurm._target_ == "hydra_plugins.guidelab_cluster.launchers.SlurmLauncher"
        assert (slurm.tasks_per_node, slurm.nodes, slurm.signal_delay_s) == (8, 1, 120)  # one task per GPU
        cfg = compose("sample", ["hydra/launcher=local"], True)
        assert cfg.hydra.launcher._target_ == "hydra_plugins.guidelab_cluster.launchers.LocalLauncher"


def test_a_launcher_without_the_cluster_extra_is_refused_in_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if "hydra_submitit_launcher" in n else real(n, *a)
    )
    line = check_command_line("sample.py", "-m", "hydra/launcher=slurm", "scale=1,3")
    assert "pip install -e '.[cluster]'" in line, line


def _torchrun_reference(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*cmd, str(REPO / "train_diffusion.py"), *TRAIN, f"hydra.run.dir={tmp_path / 'torchrun'}"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path / "torchrun" / "checkpoints" / "last.pt"


def _together(commands, tmp_path) -> None:
    """Start every (argv, env) at once and wait for all; each must succeed."""
    procs = [
        subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for argv, env in commands
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_a_slurm_job_step_and_two_torchrun_nodes_train_like_torchrun(tmp_path):
    reference = _torchrun_reference(tmp_path)
    port = _free_port()  # SLURM_JOB_ID chosen so that the port derived from it is free
    script = [sys.executable, str(REPO / "train_diffusion.py"), *TRAIN, f"hydra.run.dir={tmp_path / 'slurm'}"]
    step = {"SLURM_JOB_ID": str(port - 20000), "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "localhost"}
    step["SLURM_STEP_TASKS_PER_NODE"] = "2"
    _together([(script, ENV | step | {"SLURM_PROCID": r, "SLURM_LOCALID": r}) for r in "01"], tmp_path)
    _same_state(reference, tmp_path / "slurm" / "checkpoints" / "last.pt")

    port = _free_port()
    nodes = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1"]
    nodes += ["--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=guidelab-test"]
    script = [str(REPO / "train_diffusion.py"), *TRAIN, f"hydra.run.dir={tmp_path / 'nodes'}"]
    _together([([*nodes, f"--node_rank={r}", *script], ENV) for r in "01"], tmp_path)
    _same_state(reference, tmp_path / "nodes" / "checkpoints" / "last.pt")


@pytest.mark.slow
def test_a_sampling_sweep_through_the_local_launcher_writes_its_report_and_resumes(smoke_runs, tmp_path):
    """Two jobs through submitit, then the same command again: guidelab's launchers run jobs with resume=auto, so the
    finished jobs are not drawn again (their samples.npz untouched) and the report is the same."""
    sweep = tmp_path / "sweep"
    command = ["sample.py", "-m", "hydra/launcher=local", "experiment=smoke", f"ckpt={smoke_runs['diffusion']}"]
    command += ["num_samples=8", "batch_size=4", "guidance=cfg,none", f"hydra.sweep.dir={sweep}"]
    proc = run_script(*command, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = (sweep / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and {r.split(",")[0] for r in rows[1:]} == {"cfg", "none"}, rows
    samples = sorted(sweep.glob("*/samples.npz"))
    assert len(samples) == 2
    assert list((sweep / ".submitit").glob("*/*_submitted.pkl")), "not run through submitit"
    written = [p.stat().st_mtime_ns for p in samples]
    again = run_script(*command, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert [p.stat().st_mtime_ns for p in samples] == written  # kept, not drawn again
    logs = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_log.out"))
    assert logs.count("kept the finished") == 2, logs[-2000:]
    assert (sweep / "results.csv").read_text().splitlines() == rows


@pytest.mark.slow
def test_a_preempted_job_is_requeued_and_ends_like_an_uninterrupted_run(tmp_path):
    """The local launcher's task gets USR2 (what SLURM sends signal_delay_s before the limit); it saves, requeues
    itself with resume=auto, and the requeued job finishes the run."""
    common = ["experiment=smoke", "train.steps=100", "train.ckpt_every=20", "train.eval_every=0", "model.p_uncond=0.3"]
    straight = run_script(
        "train_diffusion.py", *common, f"hydra.run.dir={tmp_path / 'A'}", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"}
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    sweep = tmp_path / "B"
    argv = [sys.executable, str(REPO / "train_diffusion.py"), "-m", "hydra/launcher=local", *common]
    proc = subprocess.Popen(
        [*argv, f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _wait_for(sweep / "0" / "checkpoints" / "0000040.pt", proc)
    time.sleep(0.3)  # somewhere between two checkpoints
    task = subprocess.run(["pgrep", "-f", f"submitit.core._submit {sweep}"], capture_output=True, text=True)
    assert task.stdout.split(), "the job's task is not running"
    for pid in task.stdout.split():
        os.kill(int(pid), signal.SIGUSR2)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_0_log.*"))
    assert "Caught signal SIGUSR2" in logs and "resumed from" in logs, logs[-3000:]
    assert "- resume=auto" in (sweep / "0" / ".hydra" / "overrides.yaml").read_text()
    stopped = int(logs.split("resumed from")[1].split("at step ")[1].split()[0])
    assert 40 <= stopped < 100
    _same_state(tmp_path / "A" / "checkpoints" / "last.pt", sweep / "0" / "checkpoints" / "last.pt")
    assert torch.load(sweep / "0" / "checkpoints" / "last.pt", weights_only=True)["step"] == 100
