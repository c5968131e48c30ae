"""Diffusion models guidelab did not train: a diffusers UNet2DModel (random weights, built from a config and saved to
tmp) read through `ckpt=diffusers:PATH`. guidelab's eps is the model's output bit for bit, its samplers reproduce
diffusers' own scheduler loops, the schedule and prediction type come from the scheduler config, and what the model
cannot do (CFG without a null class) is refused in one line."""

import json

import diffusers
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_one_line_error, check_command_line, run_script
from guidelab import sampling
from guidelab.diffusion import scheduler_betas
from guidelab.errors import GuidelabError
from guidelab.guidance import make_eps_fn, resolve
from guidelab.guidance.perturbation import identity_attention
from guidelab.networks import check_pretrained, load_pretrained
from guidelab.schedules import process, same_schedule, schedule_signature

CPU = torch.device("cpu")
T = 50  # a short process keeps the full-length DDPM loop cheap


def tiny_unet(num_class_embeds=None, out_channels=1, seed=0) -> diffusers.UNet2DModel:
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=out_channels,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=num_class_embeds,
    ).eval()


def save_pipeline(root, unet, **scheduler) -> str:
    """A pipeline directory (unet/, scheduler/) as DDPMPipeline.save_pretrained writes it; returns its reference."""
    unet.save_pretrained(root / "unet")
    args = {"num_train_timesteps": T, "beta_start": 1e-3, "beta_end": 0.2, "clip_sample": False, **scheduler}
    diffusers.DDPMScheduler(**args).save_pretrained(root / "scheduler")
    return f"diffusers:{root}"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    unet = tiny_unet()
    return save_pipeline(root, unet), unet, root


def test_eps_is_the_models_output_bit_for_bit(pipeline):
    reference, unet, _ = pipeline
    net, record = load_pretrained(reference, CPU)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 7, 30, T - 1])
    with torch.no_grad():
        assert torch.equal(net(x, t, torch.zeros(4, dtype=torch.long)), unet(x, t).sample)
    assert record["config"]["schedule"] == {
        "beta_schedule": "linear",
        "num_steps": T,
        "beta_start": 1e-3,
        "beta_end": 0.2,
    }
    assert net.null_class is None and not net.conditional and record["config"]["data_info"]["num_classes"] is None


def _diffusers_loop(scheduler, unet, noise, generator=None):
    """The plain loop of diffusers' examples: x <- scheduler.step(unet(x, t), t, x) over scheduler.timesteps."""
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_with_guidance_none_is_diffusers_ddim_loop(tmp_path, prediction_type):
    """guidance=none (base=uncond) under guidelab's DDIM on the `leading` grid equals DDIMScheduler's loop (leading
    spacing, set_alpha_to_one, no clipping) within 1e-5; v and x0 predictions go through guidelab's conversion to
    eps."""
    unet = tiny_unet(seed=1)
    reference = save_pipeline(tmp_path, unet, prediction_type=prediction_type)
    net, record = load_pretrained(reference, CPU)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    eps_fn = make_eps_fn(resolve("none", base="uncond"), net, torch.zeros(3, dtype=torch.long))
    ours = sampling.sample("ddim", eps_fn, process(record["config"]["diffusion"]), noise, 10, "leading", False)
    scheduler = diffusers.DDIMScheduler.from_pretrained(tmp_path / "scheduler")
    scheduler.set_timesteps(10)
    theirs = _diffusers_loop(scheduler, unet, noise)
    assert (ours - theirs).abs().max() <= 1e-5 * max(1.0, theirs.abs().max())


def test_ddpm_with_guidance_none_is_diffusers_ddpm_loop(pipeline):
    """All T steps of ancestral sampling with clipping equal DDPMScheduler's loop (fixed_small variance, clip_sample)
    over the same initial noise and the same generator for the per-step noise."""
    reference, unet, root = pipeline
    net, record = load_pretrained(reference, CPU)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    eps_fn = make_eps_fn(resolve("none", base="uncond"), net, torch.zeros(3, dtype=torch.long))
    diffusion = process(record["config"]["diffusion"])
    ours = sampling.sample("ddpm", eps_fn, diffusion, noise, None, "linspace", True, torch.Generator().manual_seed(3))
    scheduler = diffusers.DDPMScheduler.from_pretrained(root / "scheduler", clip_sample=True)
    scheduler.set_timesteps(T)
    theirs = _diffusers_loop(scheduler, unet, noise, torch.Generator().manual_seed(3))
    assert (ours - theirs).abs().max() <= 1e-5 * max(1.0, theirs.abs().max())


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_betas_are_the_schedulers(tmp_path, kind):
    diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=kind).save_pretrained(tmp_path)
    theirs = diffusers.DDPMScheduler.from_pretrained(tmp_path).betas.double()  # float32: rounded to 6e-8 relative
    schedule = {"beta_schedule": kind, "num_steps": T, "beta_start": 1e-4, "beta_end": 0.02}
    assert torch.allclose(scheduler_betas(schedule), theirs, rtol=2e-7, atol=0)


def test_guidelab_schedules_match_their_diffusers_names():
    """guidelab's linear at T = 1000 is diffusers' linear from 1e-4 to 0.02; its cosine is squaredcos_cap_v2; a
    linear of other length rescales the bounds and so differs."""
    linear = {"beta_schedule": "linear", "num_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02}
    assert same_schedule(schedule_signature({"schedule": "linear", "num_steps": 1000}), linear)
    assert not same_schedule(schedule_signature({"schedule": "linear", "num_steps": 500}), linear | {"num_steps": 500})
    cosine = schedule_signature({"schedule": "cosine", "num_steps": 1000})
    assert not same_schedule(cosine, linear) and not same_schedule(linear, cosine)  # names differ: no float compare
    assert torch.allclose(scheduler_betas(cosine), process({"schedule": "cosine", "num_steps": 1000}).betas)


def test_learned_variance_output_gives_its_eps_half(tmp_path):
    unet = tiny_unet(out_channels=2)
    net, _ = load_pretrained(save_pipeline(tmp_path, unet), CPU)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 9])
    with torch.no_grad():
        assert torch.equal(net(x, t, torch.zeros(2, dtype=torch.long)), unet(x, t).sample[:, :1])


def test_both_directory_layouts_load(tmp_path, pipeline):
    """A bare model directory with scheduler_config.json beside config.json loads like the pipeline directory."""
    _, unet, root = pipeline
    bare = tmp_path / "bare"
    unet.save_pretrained(bare)
    (bare / "scheduler_config.json").write_text((root / "scheduler" / "scheduler_config.json").read_text())
    a, _ = load_pretrained(f"diffusers:{root}", CPU)
    b, _ = load_pretrained(f"diffusers:{bare}", CPU)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 40]), torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(a(x, t, y), b(x, t, y))


@pytest.mark.parametrize("damaged", ["scheduler/scheduler_config.json", "unet/config.json", "unet/weights"])
def test_a_damaged_model_directory_is_refused_naming_the_file(tmp_path, damaged):
    root = tmp_path / "pipe"
    reference = save_pipeline(root, tiny_unet())
    weights = next((root / "unet").glob("*.safetensors"))
    path = weights if damaged == "unet/weights" else root / damaged
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(GuidelabError) as err:
        load_pretrained(reference, CPU)
    message = str(err.value)
    assert "\n" not in message and "damaged" in message.replace(str(tmp_path), ""), message
    assert str(path if damaged != "unet/weights" else root / "unet") in message, message


def test_what_the_model_cannot_do_is_refused_in_one_line(tmp_path, pipeline):
    reference, _, root = pipeline
    for mode in ("cfg", "cfg_cg", "apg", "cads"):
        with pytest.raises(GuidelabError, match="unconditional.*label dropout.*modes that work with it: .*cg"):
            check_pretrained(resolve(mode, 3.0), reference)
    check_pretrained(resolve("cg", 3.0), reference)  # CG needs no class input
    check_pretrained(resolve("pag", 3.0), reference)
    conditional = save_pipeline(tmp_path / "cond", tiny_unet(num_class_embeds=3))
    with pytest.raises(GuidelabError, match="no null class.*label dropout.*cg \\(guidance.base=cond\\)"):
        check_pretrained(resolve("cfg", 3.0), conditional)
    check_pretrained(resolve("cg", 3.0, base="cond"), conditional)
    bad = tmp_path / "bad"
    for key, value, fragment in [
        ("beta_schedule", "sigmoid", "beta_schedule 'sigmoid' is not supported"),
        ("prediction_type", "flow", "prediction_type 'flow' is not supported"),
    ]:
        save_pipeline(bad, tiny_unet())
        config = json.loads((bad / "scheduler" / "scheduler_config.json").read_text()) | {key: value}
        (bad / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
        with pytest.raises(GuidelabError, match=fragment):
            check_pretrained(resolve("cg", 3.0), f"diffusers:{bad}")
    with pytest.raises(GuidelabError, match="no scheduler config"):
        (bad / "scheduler" / "scheduler_config.json").unlink()
        check_pretrained(resolve("cg", 3.0), f"diffusers:{bad}")


def test_an_unconditional_model_takes_either_base_of_a_one_prediction_mode(pipeline):
    """An unconditional model has one prediction: eps(x_t, y) and eps(x_t, null) are both it, so a mode that guides
    the prediction its `base` names (none, cg, ...) works at either base; a mode that combines two (cfg) is refused."""
    reference, unet, _ = pipeline
    assert check_command_line("sample.py", f"ckpt={reference}", "guidance=none") == ""  # default base=cond
    assert check_command_line("sample.py", f"ckpt={reference}", "guidance=cg", "guidance.base=cond", "scale=2") == ""
    line = check_command_line("sample.py", f"ckpt={reference}", "guidance=cfg", "scale=3")
    assert "unconditional" in line and "modes that work with it: " in line and "none (guidance.base" not in line
    net, _ = load_pretrained(reference, CPU)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([4, 30]), torch.tensor([0, 1])
    with torch.no_grad():
        cond, uncond = (make_eps_fn(resolve("none", base=b), net, y)(x, t).eps for b in ("cond", "uncond"))
        assert torch.equal(cond, unet(x, t).sample) and torch.equal(cond, uncond)


def test_the_command_line_refuses_before_hydra_starts(pipeline, monkeypatch):
    reference, _, _ = pipeline
    assert check_command_line("sample.py", f"ckpt={reference}", "guidance=cg", "scale=3") == ""
    line = check_command_line("sample.py", f"ckpt={reference}", "guidance=cfg", "scale=3")
    assert "CFG needs a class-conditional model trained with label dropout" in line
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = check_command_line("sample.py", "ckpt=hub:google/ddpm-cifar10-32", "guidance=cg")
    assert "could not be fetched" in line and "ckpt=diffusers:DIR" in line


def test_perturbation_seam_of_the_diffusers_model(pipeline):
    """The seam means what guidelab's UNet's does: softmax attention through the hook changes nothing (the processor
    reproduces diffusers'), identity attention (PAG) changes the output, the hooks are gone after the block."""
    reference, _, _ = pipeline
    net, _ = load_pretrained(reference, CPU)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 20]), torch.zeros(2, dtype=torch.long)
    blocks = list(net.attention_blocks())
    assert "mid_block.attentions.0" in blocks
    with torch.no_grad():
        plain = net(x, t, y)
        with net.perturbed(
            attention=dict.fromkeys(blocks, lambda q, k, v, hw: F.scaled_dot_product_attention(q, k, v))
        ):
            assert torch.allclose(net(x, t, y), plain, atol=1e-6)
        with net.perturbed(attention={"mid_block.attentions.0": identity_attention}):
            assert not torch.allclose(net(x, t, y), plain, atol=1e-4)
        with net.perturbed(time_features=lambda f: f + 1.0):
            assert not torch.allclose(net(x, t, y), plain, atol=1e-4)
        assert torch.equal(net(x, t, y), plain)
    with pytest.raises(GuidelabError, match="not attention blocks.*mid_block.attentions.0"):
        net.attention_blocks(["encoder.mid.1"])


@pytest.mark.slow
def test_classifier_guidance_of_a_diffusers_model_through_the_scripts(tmp_path, pipeline):
    """The chain a researcher runs: a noisy classifier trained on the diffusers model's own schedule
    (diffusion=pretrained diffusion.model=...), then CG of the model through sample.py; a classifier of guidelab's
    default schedule is refused, naming the fix; the results row records which model was guided."""
    reference, _, _ = pipeline
    common = ["experiment=smoke", "dataset.image_size=8"]
    proc = run_script(
        "train_classifier.py", *common, "diffusion=pretrained", f"diffusion.model={reference}", "hydra.run.dir=CLS",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    cls = tmp_path / "CLS" / "checkpoints" / "last.pt"
    assert "test_acc_t6" in torch.load(cls, weights_only=True)["metrics"]  # quarters of T = 50: the model's schedule
    args = [f"ckpt={reference}", "guidance=cg", "scale=3", f"classifier_ckpt={cls}", "num_samples=6", "batch_size=6"]
    proc = run_script("sample.py", *args, "hydra.run.dir=S", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = np.load(tmp_path / "S" / "samples.npz")
    assert samples["images"].shape == (6, 8, 8, 1) and samples["labels"].max() > 0  # the classifier's 10 classes
    proc = run_script("train_classifier.py", *common, "classifier=evaluator", "hydra.run.dir=EV", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    judged = [*args, f"evaluator_ckpt={tmp_path / 'EV' / 'checkpoints' / 'last.pt'}", "hydra.run.dir=S3"]
    proc = run_script("sample.py", *judged, cwd=tmp_path)  # the model names no data set: the judges' data is used
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "S3" / "metrics.json").read_text())
    assert 0 <= metrics["accuracy_knn"] <= 1 and metrics["knn_test_acc"] > 0.5
    proc = run_script("train_classifier.py", *common, "hydra.run.dir=OTHER", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    other = tmp_path / "OTHER" / "checkpoints" / "last.pt"
    proc = run_script("sample.py", *args[:3], f"classifier_ckpt={other}", "hydra.run.dir=S2", cwd=tmp_path)
    assert_one_line_error(proc, "another noise schedule", f"diffusion=pretrained diffusion.model={reference}")


def test_a_diffusers_layout_is_a_model_option_typed_by_its_builder():
    """model=diffusers_tiny composes, builds a class-conditional UNet2DModel with the null row, drops labels in
    training mode; a guidelab UNet key on it is refused, as is a layout whose levels disagree."""
    from guidelab.models import build_unet

    assert check_command_line("train_diffusion.py", "model=diffusers_tiny") == ""
    assert "unknown key 'model.channels'" in check_command_line(
        "train_diffusion.py", "model=diffusers_tiny", "model.channels=8"
    )
    line = check_command_line("train_diffusion.py", "model=diffusers_tiny", "model.block_out_channels=[8,16,16]")
    assert "one entry per level" in line
    assert "set model.p_uncond=0" in check_command_line(
        "train_diffusion.py", "model=diffusers_tiny", "model.conditional=false"
    )
    layout = {"arch": "diffusers", "block_out_channels": [16, 32], "norm_num_groups": 8, "p_uncond": 1.0}
    net = build_unet(layout, 1, 8, 3)
    assert net.model.class_embedding.num_embeddings == 4 and net.null_class == 3 and net.conditional
    y = torch.tensor([0, 1, 2])
    assert torch.equal(net.train().drop_labels(y), torch.full_like(y, 3)) and torch.equal(net.eval().drop_labels(y), y)
    unconditional = build_unet(layout | {"conditional": False, "p_uncond": 0.0}, 1, 8, 3)
    assert unconditional.model.class_embedding is None and unconditional.null_class is None


@pytest.mark.slow
def test_train_export_and_load_back_a_diffusers_layout(tmp_path):
    """Both directions: guidelab trains a UNet2DModel (model=diffusers_tiny), export_diffusers.py writes a pipeline
    directory that diffusers' DDPMPipeline loads, and sampling the export (ckpt=diffusers:DIR, CFG through the null
    class that guidelab.json carries) gives the same samples.npz bit for bit as sampling the run's checkpoint; an
    existing directory and a guidelab-UNet run are refused."""
    proc = run_script("train_diffusion.py", "experiment=smoke", "model=diffusers_tiny", "hydra.run.dir=D", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "D" / "checkpoints" / "last.pt"
    proc = run_script("export_diffusers.py", str(ckpt), "E", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "E")
    assert pipe.unet.config.num_class_embeds == 11 and pipe.scheduler.config.num_train_timesteps == 1000
    assert json.loads((tmp_path / "E" / "guidelab.json").read_text())["null_class"] == 10
    common = ["guidance=cfg", "scale=3", "num_samples=8", "batch_size=4"]
    for ref, run in ((str(ckpt), "S1"), ("diffusers:E", "S2")):
        proc = run_script("sample.py", f"ckpt={ref}", *common, f"hydra.run.dir={run}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "S1" / "samples.npz").read_bytes() == (tmp_path / "S2" / "samples.npz").read_bytes()
    before = (tmp_path / "E" / "guidelab.json").read_text()
    assert_one_line_error(run_script("export_diffusers.py", str(ckpt), "E", cwd=tmp_path), "not an empty directory")
    assert (tmp_path / "E" / "guidelab.json").read_text() == before
    proc = run_script("train_diffusion.py", "experiment=smoke", "train.steps=2", "hydra.run.dir=U", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_script("export_diffusers.py", str(tmp_path / "U" / "checkpoints" / "last.pt"), "F", cwd=tmp_path)
    assert_one_line_error(proc, "only runs of a diffusers layout")
