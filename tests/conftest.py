"""Shared helpers: run the real entry points in a subprocess, and hash a directory to prove nothing changed."""

import contextlib
import hashlib
import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from guidelab import config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
config.register()  # the schemas and resolvers, as every entry point registers them before composing a config


def run_script(
    script: str, *overrides: str, cwd: Path, timeout: int = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """python SCRIPT overrides... in `cwd`, offline wandb, no progress bars; returns the finished process."""
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [sys.executable, str(REPO / script), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _script_module(script: str):
    """An entry script imported as a module (its `if __name__ == "__main__"` part does not run)."""
    name = f"_script_{script.removesuffix('.py')}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / script)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def check_command_line(script: str, *overrides: str, register: bool = True) -> str:
    """What `python SCRIPT overrides...` checks before Hydra starts (group options, run dir, types, nan, the script's
    value checks for every job), run in this process by the same functions its main runs: the one `error:` line it
    prints (exit status 2), or "" if the command line passes. register=False: the schemas were registered already
    (the property test calls this thousands of times)."""
    from guidelab import cli, config

    if register:
        config.register()
    name = script.removesuffix(".py")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            argv = cli.expand_aliases(list(overrides), {"eval": "eval.enabled"})
            cli.preflight(argv, name, "samples" if name == "sample" else "checkpoints")
            cli.check_jobs(argv, CONFIGS, name, _script_module(script).check)
        except SystemExit as e:
            assert e.code == 2, e.code
            lines = err.getvalue().strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), lines
            return lines[0]
    return ""


def eps_function(
    mode: str,
    unet,
    y,
    scale: float = 1.0,
    classifier=None,
    diffusion=None,
    guide=None,
    schedule: str = "constant",
    **params,
):
    """The eps-function of guidance `mode` resolved with `params` (the rest at their defaults), as sample.py builds
    it."""
    from guidelab.guidance import make_eps_fn, resolve

    return make_eps_fn(resolve(mode, scale, schedule, **params), unet, y, classifier, diffusion, guide)


def tree_digest(path: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `path` (empty if it does not exist)."""
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Non-zero exit, and the last stderr line is one `error: ...` line holding every fragment."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory):
    """The command contract with experiment=smoke: a diffusion UNet, a noisy classifier, a clean classifier of the
    guidance family (cg_x0) and the three judges' families (a ResNet, a VGG with another seed, an MLP-Mixer)."""
    root = tmp_path_factory.mktemp("smoke")
    runs = {
        "diffusion": root / "RUN1",
        "classifier": root / "RUN2",
        "clean": root / "CLEAN",
        "evaluator": root / "EVAL",
        "evaluator2": root / "EVAL2",
        "mixer": root / "MIXER",
    }
    small = ["classifier.channels=16", "classifier.channel_mult=[1,2]"]
    for script, run_dir, extra in [
        ("train_diffusion.py", runs["diffusion"], []),
        ("train_classifier.py", runs["classifier"], []),
        ("train_classifier.py", runs["clean"], ["classifier=clean", *small]),
        ("train_classifier.py", runs["evaluator"], ["classifier=evaluator", *small]),
        ("train_classifier.py", runs["evaluator2"], ["classifier=evaluator_vgg", "seed=1", *small]),
        (
            "train_classifier.py",
            runs["mixer"],
            ["classifier=evaluator_mixer", "classifier.dim=16", "classifier.depth=1"],
        ),
    ]:
        proc = run_script(script, "experiment=smoke", f"hydra.run.dir={run_dir}", *extra, cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, **{k: v / "checkpoints" / "last.pt" for k, v in runs.items()}}


# The slowest files, slowest first (seconds per file, summed from `make test`'s per-test times in a JUnit report:
# PYTEST_ADDOPTS=--junitxml=FILE make test; see docs/testing.md). `make test` hands files to its two workers in this
# order (--no-loadscope-reorder), longest first, so that no long file starts last; the other files follow in
# collection order. Only the wall time depends on this list.
SLOWEST_FILES = (
    "test_learning.py",
    "test_scripts.py",
    "test_robustness.py",
    "test_properties.py",
    "test_errors.py",
    "test_cluster.py",
    "test_diffusers.py",
    "test_ddp.py",
    "test_cg_schedules.py",
    "test_attribute_learning.py",
    "test_config.py",
    "test_resume.py",
    "test_docs.py",
    "test_regressor.py",
    "test_levers.py",
    "test_folder_data.py",
    "test_bench.py",
    "test_knn_judge.py",
    "test_sampling.py",
    "test_rundir.py",
    "test_attributes.py",
    "test_guidance_free.py",
    "test_unchanged.py",
)


def pytest_collection_modifyitems(items):
    """A test that needs the trained smoke networks runs the real scripts end to end: it is slow (`make test-fast`
    leaves it out; `make test` runs it). Files are ordered slowest first (SLOWEST_FILES); the order of the tests
    within a file is kept."""
    for item in items:
        if "smoke_runs" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FILES)))
