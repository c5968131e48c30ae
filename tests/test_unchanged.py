"""Behaviour kept through the restructuring of sampling (the results row in guidelab.results, the batch loop in
guidelab.drawing, the evaluators as networks.Judge, the report as a package, FLOPs counted without FlopCounterMode's
module tracker): the same smoke sampling runs, with the code of commit BASELINE (the last before it) and with this
code, on the same tiny checkpoints, give equal results rows and byte-identical samples.npz and grid.png.

Needs the repository's git history (`git archive BASELINE` extracts the old code): where git, the repository or the
commit is missing the test fails saying so, rather than skipping and passing in silence."""

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

from conftest import REPO, run_script

BASELINE = "1515ac3"
TIMED = {"seconds", "seconds_per_sample", "classifier_share"}  # wall-clock measurements: differ run to run


@pytest.fixture(scope="module")
def baseline_code(tmp_path_factory):
    """The repository at BASELINE, extracted by `git archive`."""
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", BASELINE], capture_output=True, timeout=120)
    except FileNotFoundError:
        pytest.fail(f"this test needs git and the repository's history (commit {BASELINE}); git is not installed")
    if archive.returncode != 0:
        pytest.fail(
            f"this test needs the repository's git history (commit {BASELINE}, the code before the restructuring); "
            f"`git archive {BASELINE}` in {REPO} said: {archive.stderr.decode().strip()[:300]}; run it in a full clone"
        )
    out = tmp_path_factory.mktemp("baseline")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(out, filter="data")
    return out


def _normalised(value, root: str):
    """A metrics.json value with the version's own root dir (run dirs, caches) written as <ROOT>."""
    if isinstance(value, dict):
        return {k: _normalised(v, root) for k, v in value.items()}
    return value.replace(root, "<ROOT>") if isinstance(value, str) else value


CASES = {  # eval=true with two judges (the `_2` columns, FID in the evaluators' features); CG read by one and k-NN
    "cfg": ["guidance=cfg", "sampler=ddpm", "eval=true", "eval.num_samples=20", "second_evaluator_ckpt={evaluator2}"],
    "cg": ["guidance=cg", "classifier_ckpt={classifier}", "labels=[2,5]", "batch_size=8"],
}


NEW_MODEL_KEYS = {"attributes": [], "p_field": 0.1}  # UNet keys added since BASELINE, at values that add no weights


def _without_new_model_keys(ckpt: str, out) -> str:
    """A copy of a class-only checkpoint whose config lacks NEW_MODEL_KEYS (the old code refuses unknown keys); at
    these values the network has exactly the old weights (tests/test_conditions.py), so the copy is the same network."""
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    for key, default in NEW_MODEL_KEYS.items():
        assert state["config"]["model"].pop(key) == default, key
    torch.save(state, out)
    return str(out)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_a_sampling_run_gives_the_rows_and_samples_of_the_code_before(smoke_runs, baseline_code, tmp_path, case):
    args = [
        "experiment=smoke",
        f"ckpt={smoke_runs['diffusion']}",
        f"evaluator_ckpt={smoke_runs['evaluator']}",
        *(a.format(**smoke_runs) for a in CASES[case]),
    ]
    outputs = {}
    for version in ("before", "now"):
        root = tmp_path / version
        run = [*args, f"hydra.run.dir={root / 'run'}", f"metrics.cache_dir={root / 'cache'}"]
        if version == "before":  # a checkpoint config the old code can read: without the keys added since
            old_ckpt = _without_new_model_keys(smoke_runs["diffusion"], tmp_path / "diffusion_before.pt")
            run = [a.replace(f"ckpt={smoke_runs['diffusion']}", f"ckpt={old_ckpt}") for a in run]
            env = {**os.environ, "PYTHONPATH": str(baseline_code / "src"), "WANDB_MODE": "offline"}
            cmd = [sys.executable, str(baseline_code / "sample.py"), *run]
            proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        else:
            proc = run_script("sample.py", *run, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics = json.loads((root / "run" / "metrics.json").read_text())
        outputs[version] = {
            "row": _normalised({k: v for k, v in metrics.items() if k not in TIMED}, str(root)),
            **{name: (root / "run" / name).read_bytes() for name in ("samples.npz", "grid.png")},
        }
    before, now = outputs["before"], outputs["now"]
    added = set(now["row"]) - set(before["row"])  # the attribute columns: empty for a class-only request
    assert added and all(now["row"][k] is None for k in added), {k: now["row"][k] for k in added}
    assert now["row"].pop("ckpt") == str(smoke_runs["diffusion"]) and before["row"].pop("ckpt").endswith("_before.pt")
    assert {k: v for k, v in now["row"].items() if k not in added} == before["row"]
    assert now["row"]["accuracy"] is not None and now["row"]["accuracy_knn"] is not None
    assert now["samples.npz"] == before["samples.npz"] and now["grid.png"] == before["grid.png"]
