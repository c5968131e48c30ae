"""Bad input: one `error:` line naming the problem and the fix, a non-zero exit, and no existing file changed."""

import os

import pytest
import torch

from conftest import assert_one_line_error, check_command_line, run_script, tree_digest
from guidelab.guidance import MODES
from guidelab.sampling import SAMPLERS


@pytest.fixture
def guarded(smoke_runs):
    """Digest of every file the smoke runs wrote; the test asserts it is unchanged afterwards."""
    before = tree_digest(smoke_runs["root"])
    yield smoke_runs
    assert tree_digest(smoke_runs["root"]) == before


def _sample(runs, tmp_path, *overrides):
    return run_script(
        "sample.py",
        "experiment=smoke",
        f"ckpt={runs['diffusion']}",
        *overrides,
        f"hydra.run.dir={tmp_path / 'out'}",
        cwd=tmp_path,
    )


@pytest.mark.parametrize(
    "script,override,fragments",
    [
        (
            "train_diffusion.py",
            "dataset=imagenet",
            ["unknown dataset 'imagenet'", "cifar10, fashion_mnist, folder, mnist, mnist5k"],
        ),
        ("train_classifier.py", "dataset=svhn", ["unknown dataset 'svhn'", "procedural"]),
        ("sample.py", "guidance=pagx", ["unknown guidance 'pagx'", ", ".join(sorted(MODES))]),
        ("sample.py", "sampler=euler", ["unknown sampler 'euler'", ", ".join(sorted(SAMPLERS))]),
        (
            "train_diffusion.py",
            "model=unet_huge",
            ["unknown model 'unet_huge'", "unet16, unet16_attrs, unet_cifar, unet_small, unet_tiny"],
        ),
        (
            "sample.py",
            "experiment=fmnist16",
            ["unknown experiment 'fmnist16'", "cg_vs_cfg, demo", "configs/sample/experiment"],
        ),
        (
            "train_classifier.py",
            "model=unet_small",
            [
                "model= is not a config group of train_classifier.py",
                "dataset, classifier, diffusion, logger, experiment",
            ],
        ),
        ("sample.py", "dataset=mnist", ["dataset= is not a config group of sample.py"]),
    ],
)
def test_unknown_group_option_lists_the_valid_ones(script, override, fragments):
    line = check_command_line(script, override)
    assert all(f in line for f in fragments), line


@pytest.mark.slow
def test_a_bad_command_line_through_the_real_script_writes_nothing(tmp_path):
    for override, fragment in (
        ("guidance=pagx", "unknown guidance 'pagx'"),
        ("scale=x=1", "malformed override"),
        ("seed=abc", "could not be converted to Integer"),
    ):
        proc = run_script("sample.py", override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
        assert_one_line_error(proc, fragment)
        assert not (tmp_path / "run").exists()  # refused before Hydra wrote anything


@pytest.mark.parametrize(
    "overrides,fragments",
    [
        (["scale=-1"], ["scale must be >= 0, got -1; 0 = unconditional"]),
        (["scale=abc"], ["scale=abc: Value 'abc' of type 'str' could not be converted to Float", "--cfg job"]),
        (["scale=nan"], ["scale is nan; give it a finite number"]),
        (["scale=inf"], ["scale is inf"]),
        (["seed=abc"], ["seed=abc", "could not be converted to Integer"]),
        (["num_samples=0"], ["num_samples must be >= 1, got 0"]),
        (["batch_size=2.5"], ["batch_size=2.5", "could not be converted to Integer"]),
        (["sampler.eta=1.5"], ["sampler.eta must be in [0, 1], got 1.5; 0 = deterministic DDIM"]),
        (["sampler=ddpm", "sampler.eta=0.5"], ["unknown key 'sampler.eta' for sample.py"]),
        (
            ["guidance=cfgpp", "scale=2"],
            ["scale must be in [0, 1], got 2; guidance=cfgpp reads scale as its lambda", "scale=0.6"],
        ),
        (["guidance=cfg_rescale", "guidance.phi=1.5"], ["guidance.phi must be in [0, 1], got 1.5"]),
        (["guidance=cfg_rescale", "guidance.phi=nan"], ["guidance.phi is nan"]),
        (["guidance=cfg_rescale", "guidance.space=v"], ["guidance.space must be one of x0, eps, got 'v'"]),
        (["guidance=cfg_interval", "guidance.sigma_lo=5", "guidance.sigma_hi=1"], ["must be above guidance.sigma_lo"]),
        (["guidance=apg", "guidance.momentum=1.5"], ["guidance.momentum must be in [-0.99, 0.99], got 1.5"]),
        (["guidance=apg", "guidance.norm_threshold=0"], ["guidance.norm_threshold must be > 0, got 0"]),
        (["guidance=dynamic_threshold", "guidance.percentile=2"], ["guidance.percentile must be in [0.5, 1], got 2"]),
        (["schedule=step"], ["schedule must be one of constant, linear, cosine, got 'step'"]),
        (
            ["guidance=cg", "schedule=linear"],
            [
                "schedule=linear varies the CFG weight w = s - 1, but guidance=cg's scale is "
                "not a CFG weight; use schedule=constant"
            ],
        ),
        (["-m", "guidance=cfgpp", "scale=0.5,2"], ["scale must be in [0, 1], got 2", "(in the job", "scale=2"]),
        (["+foo=1"], ["+foo=1: guidelab's configs hold exactly the keys their code reads"]),
        (["sampler.steps=0"], ["sampler.steps must be >= 1, got 0"]),  # the sampler's shared keys, before any network
        (["sampler.spacing=time"], ["sampler.spacing must be one of linspace, leading, trailing, logsnr, got 'time'"]),
        (["-m", "sampler.steps=5,0"], ["sampler.steps must be >= 1, got 0", "(in the job", "sampler.steps=0"]),
        (["eval=true"], ["eval=true needs evaluator_ckpt=PATH"]),
        (
            ["eval=true", "evaluator_ckpt=E.pt", "metrics.features=clip"],
            ["metrics.features must be one of evaluator, inception, got 'clip'"],
        ),
        (
            [
                "eval=true",
                "evaluator_ckpt=E.pt",
                "metrics.features=inception",
                "metrics.inception_weights=/nonexistent/i.pth",
            ],
            ["Inception weights not found", "metrics.inception_weights=FILE", "metrics.features=evaluator"],
        ),
    ],
)
def test_bad_sampling_values_are_refused_before_hydra_starts(overrides, fragments):
    line = check_command_line("sample.py", "experiment=smoke", "ckpt=C.pt", *overrides)
    assert all(f in line for f in fragments), line


@pytest.mark.parametrize(
    "overrides,fragments",
    [
        (
            ["guidance=cg"],
            [
                "classifier_ckpt=latest found no classifier run on procedural at 16px",
                "train_classifier.py",
                "classifier_ckpt=PATH",
            ],
        ),
        (["guidance=cg_interval"], ["classifier_ckpt=latest found no classifier run"]),
        (["labels=[0,10]"], ["labels must be class indices in [0, 10)", "got 10"]),
        (["sampler.steps=5000"], ["sampler.steps must be in [1, 1000]"]),
        (["guidance=autoguidance"], ["guidance=autoguidance needs guide_ckpt=PATH"]),
    ],
)
def test_bad_sampling_options_that_need_the_networks(guarded, tmp_path, overrides, fragments):
    """Refused once the checkpoint is read (the class count, T, a classifier to find): still one line, nothing
    written."""
    assert_one_line_error(_sample(guarded, tmp_path, *overrides), *fragments)
    assert not (tmp_path / "out" / "samples.npz").exists()


@pytest.mark.slow
def test_nothing_to_sample_from(tmp_path):
    """ckpt=latest (the default) with no training run under outputs/: one line, before Hydra makes a run dir."""
    proc = run_script("sample.py", "guidance=cfg", "scale=3.0", cwd=tmp_path)
    assert_one_line_error(proc, "ckpt=latest found no diffusion run", "train_diffusion.py", "ckpt=PATH")
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_missing_corrupt_truncated_and_foreign_checkpoints(guarded, tmp_path):
    assert_one_line_error(
        run_script("sample.py", f"ckpt={tmp_path / 'nope.pt'}", f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path),
        "does not exist",
    )
    data = guarded["diffusion"].read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 3])
    assert_one_line_error(
        run_script("sample.py", f"ckpt={tmp_path / 'trunc.pt'}", f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path),
        "corrupt or truncated",
    )
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 1000)
    assert_one_line_error(
        run_script("sample.py", f"ckpt={tmp_path / 'junk.pt'}", f"hydra.run.dir={tmp_path / 'c'}", cwd=tmp_path),
        "corrupt or truncated",
    )
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "foreign.pt")
    assert_one_line_error(
        run_script("sample.py", f"ckpt={tmp_path / 'foreign.pt'}", f"hydra.run.dir={tmp_path / 'd'}", cwd=tmp_path),
        "not a guidelab checkpoint",
    )


def test_classifier_checkpoint_passed_as_the_diffusion_model(guarded, tmp_path):
    proc = run_script("sample.py", f"ckpt={guarded['classifier']}", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert_one_line_error(proc, "is a classifier checkpoint but a diffusion checkpoint is needed")


def test_evaluator_is_refused_as_a_guidance_classifier(guarded, tmp_path):
    proc = _sample(guarded, tmp_path, "guidance=cg", f"classifier_ckpt={guarded['evaluator']}")
    assert_one_line_error(
        proc, "is an evaluator", "this use needs a noisy guidance classifier", "python train_classifier.py`"
    )


@pytest.mark.slow
def test_a_judge_must_be_of_another_family_and_a_network_of_its_own(guarded, tmp_path):
    """The clean classifier of the guidance family (cg_x0's) is no judge; the second opinion is neither the primary
    evaluator itself nor another network of the primary's family."""
    assert_one_line_error(
        _sample(guarded, tmp_path, f"evaluator_ckpt={guarded['clean']}"),
        "is a clean classifier of the guidance family",
        "this use needs an evaluator",
    )
    assert_one_line_error(
        _sample(
            guarded, tmp_path, f"evaluator_ckpt={guarded['evaluator']}", f"second_evaluator_ckpt={guarded['evaluator']}"
        ),
        "already used as another network",
    )
    assert_one_line_error(
        _sample(guarded, tmp_path, f"second_evaluator_ckpt={guarded['evaluator2']}"),
        "second_evaluator_ckpt is set but evaluator_ckpt is not",
    )
    twin = tmp_path / "twin"
    proc = run_script(
        "train_classifier.py",
        "experiment=smoke",
        "classifier=evaluator",
        "classifier.channels=8",
        "classifier.channel_mult=[1]",
        "train.steps=2",
        f"hydra.run.dir={twin}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_one_line_error(
        _sample(
            guarded,
            tmp_path,
            f"evaluator_ckpt={guarded['evaluator']}",
            f"second_evaluator_ckpt={twin / 'checkpoints/last.pt'}",
        ),
        "is a resnet like the primary evaluator",
        "classifier=evaluator_vgg",
    )
    assert_one_line_error(  # an off-the-shelf ResNet guides: no ResNet may judge
        _sample(
            guarded,
            tmp_path,
            "guidance=cg_ots",
            f"classifier_ckpt={guarded['evaluator']}",
            f"evaluator_ckpt={twin / 'checkpoints/last.pt'}",
        ),
        "evaluator_ckpt is a resnet like the classifier that guides",
        "classifier=evaluator_mixer",
    )
    assert_one_line_error(  # a noisy classifier is no clean one
        _sample(guarded, tmp_path, "guidance=cg_ots", f"classifier_ckpt={guarded['classifier']}"),
        "is a noisy guidance classifier",
        "this use needs a clean classifier (classifier=clean, or an off-the-shelf ResNet, VGG or MLP-Mixer)",
    )


@pytest.mark.slow
def test_classifier_of_another_dataset_names_both(guarded, tmp_path):
    other = tmp_path / "other"
    proc = run_script(
        "train_classifier.py",
        "experiment=smoke",
        "dataset.name=mnist5k",
        "train.steps=2",
        f"hydra.run.dir={other}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = _sample(guarded, tmp_path, "guidance=cg", f"classifier_ckpt={other / 'checkpoints/last.pt'}")
    assert_one_line_error(proc, "different data", "dataset procedural vs mnist5k")
    proc = _sample(guarded, tmp_path, "guidance=cfg", f"evaluator_ckpt={other / 'checkpoints/last.pt'}")
    assert_one_line_error(proc, "dataset procedural vs mnist5k")


@pytest.mark.slow
def test_classifier_of_another_image_size_or_schedule(guarded, tmp_path):
    for name, override, fragment in [
        ("size", "dataset.image_size=12", "image_size 16 vs 12"),
        ("sched", "diffusion=cosine", "another noise schedule"),
    ]:
        run = tmp_path / name
        proc = run_script(
            "train_classifier.py", "experiment=smoke", override, "train.steps=2", f"hydra.run.dir={run}", cwd=tmp_path
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        proc = _sample(guarded, tmp_path, "guidance=cg", f"classifier_ckpt={run / 'checkpoints/last.pt'}")
        assert_one_line_error(proc, fragment)


@pytest.mark.slow
def test_missing_data_offline_says_where_it_looked(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_script(
        "train_diffusion.py",
        "dataset=mnist",
        f"dataset.root={empty}",
        "dataset.download=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert_one_line_error(proc, str(empty))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("script,extra", [("train_diffusion.py", []), ("train_classifier.py", [])])
def test_run_dir_with_checkpoints_of_another_run_is_refused(guarded, tmp_path, script, extra):
    run_dir = guarded["diffusion"].parent.parent
    before = tree_digest(run_dir)
    proc = run_script(script, "experiment=smoke", f"hydra.run.dir={run_dir}", *extra, cwd=tmp_path)
    assert_one_line_error(proc, "already holds checkpoints", "resume=true")
    assert tree_digest(run_dir) == before


@pytest.mark.slow
def test_resume_with_another_architecture_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    proc = run_script(
        "train_diffusion.py", "experiment=smoke", "train.steps=2", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    before = tree_digest(run_dir / "checkpoints")
    proc = run_script(
        "train_diffusion.py",
        "experiment=smoke",
        "train.steps=4",
        "resume=true",
        "model.channels=8",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert_one_line_error(proc, "model config differs")
    assert tree_digest(run_dir / "checkpoints") == before


def test_existing_samples_are_not_overwritten(guarded, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "samples.npz").write_bytes(b"earlier results")
    assert_one_line_error(_sample(guarded, tmp_path), "already holds samples.npz")
    assert (out / "samples.npz").read_bytes() == b"earlier results"


@pytest.mark.parametrize(
    "script,override,fragment",
    [
        ("train_diffusion.py", "train.steps=0", "train.steps must be >= 1, got 0"),
        ("train_diffusion.py", "model.p_uncond=1.5", "model.p_uncond must be in [0, 1]"),
        ("train_diffusion.py", "train.batch_size=-4", "train.batch_size"),
        ("train_diffusion.py", "train.lr=0", "train.lr must be > 0, got 0"),
        ("train_diffusion.py", "train.lr=nan", "train.lr is nan"),
        ("train_diffusion.py", "train.steps=1.5", "train.steps=1.5"),
        ("train_diffusion.py", "seed=abc", "seed=abc"),
        ("train_diffusion.py", "train.lr_schedule=step", "train.lr_schedule must be one of constant, cosine"),
        ("train_diffusion.py", "train.ema_decay=1", "train.ema_decay must be in [0, 1]"),
        ("train_classifier.py", "classifier.dropout=inf", "classifier.dropout is inf"),
        ("train_classifier.py", "train.keep_checkpoints=0", "train.keep_checkpoints must be >= 1"),
        ("train_diffusion.py", "resume=maybe", "resume=maybe is not one of true, false, auto"),
        ("train_classifier.py", "resume=1", "resume=1 is not one of true, false, auto"),
        ("sample.py", "resume=yes", "resume=yes is not one of true, false, auto"),
    ],
)
def test_bad_training_values_are_refused_before_hydra_starts(script, override, fragment):
    assert fragment in check_command_line(script, "experiment=smoke", override)


@pytest.mark.slow
def test_a_bad_training_value_through_the_real_script_writes_nothing(tmp_path):
    proc = run_script(
        "train_diffusion.py",
        "experiment=smoke",
        "model.p_uncond=1.5",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert_one_line_error(proc, "model.p_uncond must be in [0, 1], got 1.5")
    assert not (tmp_path / "run").exists()


def test_noisy_classifier_is_refused_as_the_evaluator(guarded, tmp_path):
    assert_one_line_error(
        _sample(guarded, tmp_path, f"evaluator_ckpt={guarded['classifier']}"), "is a noisy guidance classifier"
    )


@pytest.mark.parametrize(
    "script,override,fragments",
    [
        ("train_diffusion.py", "no_such_key=1", ["unknown key 'no_such_key' for train_diffusion.py", "--cfg job"]),
        ("sample.py", "sampler.stepz=10", ["unknown key 'sampler.stepz' for sample.py"]),
        ("train_classifier.py", "train.steps=[1,2", ["malformed override", "key=value"]),
        ("sample.py", "scale=x=1", ["malformed override"]),
    ],
)
def test_unknown_keys_and_malformed_overrides_are_one_line(script, override, fragments):
    line = check_command_line(script, override)
    assert all(f in line for f in fragments), line


@pytest.mark.slow
def test_wandb_logger_without_wandb_names_the_extra(tmp_path):
    """`logger=wandb` where wandb cannot be imported (a stub package that raises ImportError stands in for a missing
    install): one line naming the extra, before anything is written."""
    stub = tmp_path / "stub" / "wandb"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('No module named wandb')\n")
    env_path = f"{stub.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    proc = run_script(
        "train_diffusion.py",
        "experiment=smoke",
        "logger=wandb",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        env={"PYTHONPATH": env_path},
    )
    assert_one_line_error(proc, "logger=wandb needs the wandb package", "pip install -e '.[wandb]'")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_sizes_far_beyond_memory_are_one_line_errors_naming_what_to_lower(guarded, tmp_path):
    """Values that pass every check and still exceed the machine: the allocator's refusal, in one line."""
    proc = _sample(guarded, tmp_path, "num_samples=1000000000000")
    assert_one_line_error(proc, "out of memory", "num_samples")
    assert not (tmp_path / "out" / "samples.npz").exists()
    too_wide = ["experiment=smoke", "model.channels=60000", f"hydra.run.dir={tmp_path / 'T'}"]
    proc = run_script("train_diffusion.py", *too_wide, cwd=tmp_path)
    assert_one_line_error(proc, "out of memory", "channels")
    assert not list((tmp_path / "T").rglob("*.pt"))


@pytest.mark.parametrize(
    "script, override, says",
    [
        ("train_diffusion.py", "train.lr=1e39", "train.lr=1e+39 is beyond float32's range"),
        ("sample.py", "scale=-3e38", ""),  # inside float32: passes this check (the scale's own range refuses it)
        ("train_classifier.py", f"seed={2**63}", "is beyond int64's range"),
        ("sample.py", "seed=10000000000000", "seed must be in [0, 8.79609e+12]"),
        ("train_diffusion.py", "model.num_res_blocks=1000000000000", "beyond any network guidelab could build"),
        ("train_diffusion.py", "model.channels=-1", "model=unet_small cannot build its network"),
        ("train_classifier.py", "classifier.channel_mult=[]", "cannot build its network"),
    ],
)
def test_numbers_beyond_what_guidelab_computes_with_are_refused_in_one_line(script, override, says):
    line = check_command_line(script, override)
    if says:
        assert says in line, line
    else:
        assert "float32" not in line, line
