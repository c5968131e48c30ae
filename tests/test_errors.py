"""Bad input: one `error:` line naming the problem and the fix, a non-zero exit, and no existing file changed."""
import shutil

import pytest
import torch

from conftest import assert_one_line_error, run_script, tree_digest


@pytest.fixture
def guarded(smoke_runs):
    """Digest of every file the smoke runs wrote; the test asserts it is unchanged afterwards."""
    before = tree_digest(smoke_runs["root"])
    yield smoke_runs
    assert tree_digest(smoke_runs["root"]) == before


def _sample(runs, tmp_path, *overrides):
    return run_script("sample.py", "experiment=smoke", f"ckpt={runs['diffusion']}", *overrides,
                      f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)


@pytest.mark.parametrize("script,override,fragments", [
    ("train_diffusion.py", "dataset=imagenet", ["unknown dataset 'imagenet'", "cifar10, fashion_mnist, mnist, mnist5k"]),
    ("train_classifier.py", "dataset=svhn", ["unknown dataset 'svhn'", "procedural"]),
    ("sample.py", "guidance=pag", ["unknown guidance 'pag'", "apg, autoguidance, cfg, cfg_cg, cfg_interval, cfg_rescale, "
                                   "cfgpp, cg, cg_interval, dynamic_threshold, none"]),
    ("sample.py", "sampler=euler", ["unknown sampler 'euler'", "ddim, ddpm, dpmpp_2m"]),
    ("train_diffusion.py", "model=unet_huge", ["unknown model 'unet_huge'", "unet_cifar, unet_small"]),
])
def test_unknown_group_option_lists_the_valid_ones(tmp_path, script, override, fragments):
    proc = run_script(script, override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "run").exists()  # refused before Hydra wrote anything


@pytest.mark.parametrize("overrides,fragments", [
    (["scale=-1"], ["scale must be >= 0, got -1"]),
    (["scale=abc"], ["scale must be a number", "scale=3.0"]),
    (["guidance=cg"], ["classifier_ckpt=PATH", "train_classifier.py"]),
    (["guidance=cfg_cg"], ["classifier_ckpt=PATH"]),
    (["num_samples=0"], ["num_samples must be a positive integer"]),
    (["batch_size=2.5"], ["batch_size must be a positive integer, got 2.5"]),
    (["sampler.steps=0"], ["sampler.steps must be a positive integer"]),
    (["sampler.eta=1.5"], ["sampler.eta must be in [0, 1]"]),
    (["labels=[0,10]"], ["labels must be class indices in [0, 10)", "got 10"]),
    (["sampler.steps=5000"], ["sampler.steps must be in [1, 1000]"]),
    (["sampler.spacing=log"], ["sampler.spacing must be time or logsnr, got 'log'"]),
    (["guidance=cg_interval"], ["guidance=cg_interval needs classifier_ckpt=PATH"]),
    (["guidance=cfgpp", "scale=2"], ["guidance=cfgpp reads scale as its lambda in [0, 1], got 2", "scale=0.6"]),
    (["guidance=cfg_rescale", "guidance.phi=1.5"], ["guidance.phi must be in [0, 1], got 1.5"]),
    (["guidance=cfg_rescale", "guidance.space=v"], ["guidance.space must be x0 or eps, got 'v'"]),
    (["guidance=cfg_interval", "guidance.sigma_lo=5", "guidance.sigma_hi=1"], ["must be above guidance.sigma_lo"]),
    (["guidance=apg", "guidance.momentum=1.5"], ["guidance.momentum must be in [-0.99, 0.99], got 1.5"]),
    (["guidance=apg", "guidance.norm_threshold=0"], ["guidance.norm_threshold must be in"]),
    (["guidance=dynamic_threshold", "guidance.percentile=2"], ["guidance.percentile must be in [0.5, 1], got 2"]),
    (["guidance=autoguidance"], ["guidance=autoguidance needs guidance.guide_ckpt=PATH"]),
])
def test_bad_sampling_options(guarded, tmp_path, overrides, fragments):
    assert_one_line_error(_sample(guarded, tmp_path, *overrides), *fragments)
    assert not (tmp_path / "out" / "samples.npz").exists()


def test_missing_ckpt_argument(tmp_path):
    proc = run_script("sample.py", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert_one_line_error(proc, "ckpt=PATH is required", "train_diffusion.py")


def test_missing_corrupt_truncated_and_foreign_checkpoints(guarded, tmp_path):
    assert_one_line_error(run_script("sample.py", f"ckpt={tmp_path / 'nope.pt'}", f"hydra.run.dir={tmp_path / 'a'}",
                                     cwd=tmp_path), "does not exist")
    data = guarded["diffusion"].read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 3])
    assert_one_line_error(run_script("sample.py", f"ckpt={tmp_path / 'trunc.pt'}", f"hydra.run.dir={tmp_path / 'b'}",
                                     cwd=tmp_path), "corrupt or truncated")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 1000)
    assert_one_line_error(run_script("sample.py", f"ckpt={tmp_path / 'junk.pt'}", f"hydra.run.dir={tmp_path / 'c'}",
                                     cwd=tmp_path), "corrupt or truncated")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "foreign.pt")
    assert_one_line_error(run_script("sample.py", f"ckpt={tmp_path / 'foreign.pt'}", f"hydra.run.dir={tmp_path / 'd'}",
                                     cwd=tmp_path), "not a guidelab checkpoint")


def test_classifier_checkpoint_passed_as_the_diffusion_model(guarded, tmp_path):
    proc = run_script("sample.py", f"ckpt={guarded['classifier']}", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert_one_line_error(proc, "is a classifier checkpoint but a diffusion checkpoint is needed")


def test_evaluator_is_refused_as_a_guidance_classifier(guarded, tmp_path):
    proc = _sample(guarded, tmp_path, "guidance=cg", f"classifier_ckpt={guarded['evaluator']}")
    assert_one_line_error(proc, "clean-image evaluator, not a noisy classifier")


def test_classifier_of_another_dataset_names_both(guarded, tmp_path):
    other = tmp_path / "other"
    proc = run_script("train_classifier.py", "experiment=smoke", "dataset.name=mnist5k", "train.steps=2",
                      f"hydra.run.dir={other}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = _sample(guarded, tmp_path, "guidance=cg", f"classifier_ckpt={other / 'checkpoints/last.pt'}")
    assert_one_line_error(proc, "different data", "dataset procedural vs mnist5k")
    proc = _sample(guarded, tmp_path, "guidance=cfg", f"evaluator_ckpt={other / 'checkpoints/last.pt'}")
    assert_one_line_error(proc, "dataset procedural vs mnist5k")


def test_classifier_of_another_image_size_or_schedule(guarded, tmp_path):
    for name, override, fragment in [("size", "dataset.image_size=12", "image_size 16 vs 12"),
                                     ("sched", "diffusion=cosine", "another noise schedule")]:
        run = tmp_path / name
        proc = run_script("train_classifier.py", "experiment=smoke", override, "train.steps=2",
                          f"hydra.run.dir={run}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        proc = _sample(guarded, tmp_path, "guidance=cg", f"classifier_ckpt={run / 'checkpoints/last.pt'}")
        assert_one_line_error(proc, fragment)


def test_missing_data_offline_says_where_it_looked(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_script("train_diffusion.py", "dataset=mnist", f"dataset.root={empty}", "dataset.download=false",
                      f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_one_line_error(proc, str(empty))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("script,extra", [("train_diffusion.py", []), ("train_classifier.py", [])])
def test_run_dir_with_checkpoints_of_another_run_is_refused(guarded, tmp_path, script, extra):
    run_dir = guarded["diffusion"].parent.parent
    before = tree_digest(run_dir)
    proc = run_script(script, "experiment=smoke", f"hydra.run.dir={run_dir}", *extra, cwd=tmp_path)
    assert_one_line_error(proc, "already holds checkpoints", "resume=true")
    assert tree_digest(run_dir) == before


def test_resume_with_another_architecture_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    proc = run_script("train_diffusion.py", "experiment=smoke", "train.steps=2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before = tree_digest(run_dir / "checkpoints")
    proc = run_script("train_diffusion.py", "experiment=smoke", "train.steps=4", "resume=true", "model.channels=8",
                      f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert_one_line_error(proc, "model config differs")
    assert tree_digest(run_dir / "checkpoints") == before


def test_existing_samples_are_not_overwritten(guarded, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "samples.npz").write_bytes(b"earlier results")
    assert_one_line_error(_sample(guarded, tmp_path), "already holds samples.npz")
    assert (out / "samples.npz").read_bytes() == b"earlier results"


@pytest.mark.parametrize("override,fragment", [("train.steps=0", "train.steps"), ("model.p_uncond=1.5", "p_uncond"),
                                               ("train.batch_size=-4", "train.batch_size"), ("train.lr=0", "train.lr")])
def test_bad_training_options(tmp_path, override, fragment):
    proc = run_script("train_diffusion.py", "experiment=smoke", override, f"hydra.run.dir={tmp_path / 'run'}",
                      cwd=tmp_path)
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("overrides,fragments", [
    (["metrics.features=inception", "metrics.inception_weights=/nonexistent/inception.pth"],
     ["Inception weights not found", "metrics.inception_weights=FILE", "metrics.features=evaluator"]),
    (["metrics.features=clip"], ["unknown metrics.features 'clip'"]),
])
def test_bad_evaluation_options_fail_before_sampling(guarded, tmp_path, overrides, fragments):
    proc = _sample(guarded, tmp_path, "eval=true", f"evaluator_ckpt={guarded['evaluator']}", *overrides)
    assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "out" / "samples.npz").exists()


def test_eval_without_evaluator(guarded, tmp_path):
    assert_one_line_error(_sample(guarded, tmp_path, "eval=true"), "eval=true needs evaluator_ckpt=PATH")


def test_noisy_classifier_is_refused_as_the_evaluator(guarded, tmp_path):
    assert_one_line_error(_sample(guarded, tmp_path, f"evaluator_ckpt={guarded['classifier']}"),
                          "is a noisy guidance classifier")


@pytest.mark.parametrize("script,override,fragments", [
    ("train_diffusion.py", "no_such_key=1", ["unknown key 'no_such_key' for train_diffusion.py", "--cfg job"]),
    ("sample.py", "sampler.stepz=10", ["unknown key 'sampler.stepz' for sample.py"]),
    ("train_classifier.py", "train.steps=[1,2", ["malformed override", "key=value"]),
    ("sample.py", "scale=x=1", ["malformed override"]),
])
def test_unknown_keys_and_malformed_overrides_are_one_line(tmp_path, script, override, fragments):
    proc = run_script(script, override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert_one_line_error(proc, *fragments)
    assert not (tmp_path / "run").exists()
