"""Attributes of a data set and of samples: measured once and cached, refused where undefined, the training statistics
a network stores, fine-tuning a class-only network with a new attribute (train.init_from), and the judge that reads a
request back on the image (guidelab.measured)."""

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONFIGS, _script_module, check_command_line
from guidelab import attributes, morpho
from guidelab.conditions import ATTRIBUTES, rows
from guidelab.data import load_dataset
from guidelab.errors import GuidelabError
from guidelab.measured import TOLERANCE, matched_reference, slope, verdict
from guidelab.models import build_unet

TINY = {
    "name": "t",
    "channels": 16,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("GUIDELAB_DATA", str(tmp_path))
    return tmp_path


def test_attributes_are_measured_once_cached_and_checked_against_the_pixels(data_root, monkeypatch):
    dataset = {"name": "mnist5k", "image_size": 16, "root": None}
    data = load_dataset("mnist5k", "test", image_size=16)
    first = attributes.measured(data, dataset, "test")
    assert first.shape == (500, len(ATTRIBUTES)) and first.dtype == torch.float32
    pixels = ((data.images[:3] + 1) * 127.5).round().to(torch.uint8).numpy()
    direct = morpho.measure(pixels)
    assert np.allclose(first[:3].numpy(), np.stack([direct[a] for a in ATTRIBUTES], 1), equal_nan=True)
    assert len(list((data_root / "attributes").glob("mnist5k-test-*.npz"))) == 1

    def not_again(*args, **kwargs):
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(morpho, "measure", not_again)
    assert torch.equal(attributes.measured(data, dataset, "test"), first)  # read from the cache
    data.images[0] = -data.images[0]  # other pixels under the same key: measured again, never a stale cache
    with pytest.raises(AssertionError, match="measured again"):
        attributes.measured(data, dataset, "test")


def test_statistics_give_mean_sd_and_the_training_range():
    values = torch.full((100, len(ATTRIBUTES)), float("nan"))
    values[:, ATTRIBUTES.index("thickness")] = torch.linspace(1, 5, 100)
    stats = attributes.statistics(values, ["thickness"])["thickness"]
    assert stats["mean"] == pytest.approx(3.0) and stats["std"] == pytest.approx(
        torch.linspace(1, 5, 100).std().item(), 1e-6
    )
    assert stats["lo"] == pytest.approx(1.04, abs=0.01) and stats["hi"] == pytest.approx(4.96, abs=0.01)
    with pytest.raises(GuidelabError, match="attribute slant could be measured on 0 images"):
        attributes.statistics(values, ["slant"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["dataset=procedural", "model.attributes=[thickness]"], "defined on handwritten digits only"),
        (["dataset=cifar10", "model=unet16", "model.attributes=[slant]"], "dataset=cifar10 has none"),
        (["model.attributes=[colour]"], "model.attributes: unknown attribute 'colour'"),
        (
            ["model.attributes=[thickness]", "train.guidance_free=mg"],
            "with model.attributes use train.guidance_free=none",
        ),
        (["model.p_field=1.5"], "model.p_field"),
    ],
)
def test_training_on_attributes_is_refused_where_they_cannot_be_had(overrides, message):
    line = check_command_line("train_diffusion.py", "experiment=demo", *overrides)
    assert message in line, line


def _train_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train_diffusion", overrides=["experiment=demo", *overrides])


def _class_only_checkpoint(path, cfg):
    """A class-only network's checkpoint of cfg's data, schedule and sizes."""
    model = {**OmegaConf.to_container(cfg.model), "attributes": []}
    torch.manual_seed(0)
    net = build_unet(model, 1, cfg.dataset.image_size, 10)
    config = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("dataset", "diffusion")}
    torch.save({"kind": "diffusion", "ema": net.state_dict(), "step": 7, "config": {**config, "model": model}}, path)
    return net


def test_train_diffusion_starts_from_init_from(tmp_path, data_root):
    """The training task itself loads train.init_from (the class-only network's weights, the new input's statistics
    set after), not only the function that does it."""
    cfg = _train_cfg("model.attributes=[thickness]")
    old = _class_only_checkpoint(tmp_path / "class_only.pt", cfg)
    cfg = _train_cfg("model.attributes=[thickness]", f"train.init_from={tmp_path / 'class_only.pt'}")
    data = load_dataset("mnist5k", "test", image_size=16)
    data.attributes = attributes.measured(data, {"name": "mnist5k", "image_size": 16, "root": None}, "test")
    task = _script_module("train_diffusion.py").task(cfg, data, torch.device("cpu"))
    for k, v in old.state_dict().items():
        assert torch.equal(task.model.state_dict()[k], v), k
    mean = data.attributes[:, ATTRIBUTES.index("thickness")].nanmean().item()
    assert task.model.attr_stats[0, 0].item() == pytest.approx(mean, abs=1e-4)


def test_init_from_starts_a_new_attribute_fresh_and_keeps_every_other_weight(tmp_path):
    start_from = _script_module("train_diffusion.py").start_from
    cfg = _train_cfg("model.attributes=[thickness]")
    ckpt = tmp_path / "class_only.pt"
    old = _class_only_checkpoint(ckpt, cfg)
    torch.manual_seed(1)
    new = build_unet(cfg.model, 1, 16, 10)
    fresh = {k: v.clone() for k, v in new.state_dict().items() if k.startswith("attr_")}
    start_from(new, str(ckpt), cfg)
    for k, v in new.state_dict().items():
        assert torch.equal(v, fresh[k] if k.startswith("attr_") else old.state_dict()[k]), k
    other = _train_cfg("model.attributes=[thickness]", "dataset.image_size=28")
    with pytest.raises(GuidelabError, match="was trained with another dataset config"):
        start_from(build_unet(other.model, 1, 28, 10), str(ckpt), other)
    wider = _train_cfg("model.channels=64")
    with pytest.raises(GuidelabError, match="does not fit this model"):
        start_from(build_unet(wider.model, 1, 16, 10), str(ckpt), wider)


def _bars(widths, size=28):
    """Vertical bars of the given pen widths (px at 28 px), centred: thickness = width, no slant."""
    images = np.zeros((len(widths), size, size), dtype=np.uint8)
    for i, w in enumerate(widths):
        images[i, 4:24, 14 - w // 2 : 14 - w // 2 + w] = 255
    return images


def test_the_judge_reads_a_request_back_by_measurement():
    widths = [2, 3, 4, 5]
    images = _bars(widths)[..., None]  # NHWC, as samples.npz holds them
    measured_thickness = morpho.measure(images[..., 0])["thickness"]
    asked = torch.tensor([2.0, 3.0, 4.0, 6.0])  # the last one missed by about a pixel
    y = rows(torch.tensor([1, 1, 7, 1]), {"thickness": asked})
    cols, details = verdict(images, y, 10, predicted=np.array([1, 1, 1, 1]))
    errors = np.abs(measured_thickness - asked.numpy())
    assert cols["thickness_mae"] == pytest.approx(errors.mean())
    assert cols["thickness_slope"] == pytest.approx(np.polyfit(asked.numpy(), measured_thickness, 1)[0])
    met = (errors <= TOLERANCE["thickness"]) & (np.array([1, 1, 1, 1]) == np.array([1, 1, 7, 1]))
    assert met.tolist() == [True, True, False, False] and cols["joint_success"] == pytest.approx(0.5)
    assert cols["request"] == "label thickness" and details["tolerance"] == {"thickness": 0.5}
    stats = {a: {"std": 1.0} for a in ATTRIBUTES}
    free = verdict(images, rows(torch.full((4,), 10), {"thickness": asked}), 10, stats)[0]
    assert free["request"] == "thickness" and free["joint_success"] == pytest.approx(0.75)  # no label asked
    assert free["free_spread"] is not None and slope(np.ones(3), np.arange(3.0)) is None


def test_a_compositional_split_leaves_one_combination_out(data_root):
    data = load_dataset("mnist5k", "test", image_size=16)
    values = attributes.measured(data, {"name": "mnist5k", "image_size": 16, "root": None}, "test")
    keep, info = attributes.exclude(data, values, "7:thickness>0.8")
    sevens = data.labels == 7
    thick = values[:, ATTRIBUTES.index("thickness")]
    assert info["label"] == 7 and info["attribute"] == "thickness" and info["removed"] == int((~keep).sum())
    assert (~keep & ~sevens).sum() == 0  # no other class loses a digit
    assert info["removed"] == pytest.approx(0.2 * sevens.sum().item(), abs=2)
    assert (thick[~keep] > info["threshold"]).all() and (thick[keep & sevens] <= info["threshold"]).all()
    assert attributes.exclude(data, values, "7:slant<0.5")[1]["side"] == "<"


@pytest.mark.parametrize(
    "rule, message",
    [
        ("7-thickness>0.8", "is not LABEL:ATTRIBUTE>QUANTILE"),
        ("12:thickness>0.8", "no class '12'"),
        ("7:colour>0.8", "no attribute 'colour'"),
        ("7:thickness>1.5", "strictly between 0 and 1"),
    ],
)
def test_a_malformed_split_is_refused_in_one_line(rule, message):
    line = check_command_line("train_diffusion.py", "experiment=demo", f"exclude='{rule}'")
    assert message in line, line
    assert message in check_command_line("train_classifier.py", "experiment=demo", f"exclude='{rule}'")
    assert "defined on handwritten digits only" in check_command_line(
        "train_diffusion.py", "experiment=smoke", "exclude='7:thickness>0.8'"
    )


def test_the_bin_reference_draws_real_digits_of_each_requested_bin():
    """matched_reference: a real image of the requested class within the tolerance of every attribute asked, each
    image of a bin once before any is drawn again; -1 where the bin is empty; no class asked: any class."""
    nan = float("nan")
    real = np.full((5, len(ATTRIBUTES)), nan)
    real[:, ATTRIBUTES.index("thickness")] = [2.0, 2.3, 4.0, 2.1, 5.0]
    labels = np.array([7, 7, 7, 1, 1])
    y = rows(torch.tensor([7, 7, 7, 7]), {"thickness": torch.tensor([2.2, 2.2, 2.2, 6.0])})
    index = matched_reference(y, 10, labels, real)
    assert sorted(index[:2].tolist()) == [0, 1] and index[2] == index[0]  # 2.2 +- 0.5 among the 7s: 0 and 1, not 3
    assert index[3] == -1  # thickness 6.0 among the 7s: none
    free = rows(torch.tensor([10, 10]), {"thickness": torch.tensor([5.2, 2.15])})
    index = matched_reference(free, 10, labels, real)
    assert index[0] == 4 and index[1] in (0, 1, 3)  # no class asked: any class within 0.5


def test_fid_bin_is_lower_against_the_digits_asked_than_against_others(data_root):
    """bin_fid on real training 7s presented as samples: read against 7s of their own thickness bins it is lower than
    the same images read as 1s (a random ResNet's features, fixed seed), and it says how many samples found a bin."""
    from types import SimpleNamespace

    from guidelab.drawing import Drawn
    from guidelab.images import to_uint8
    from guidelab.models import build_classifier
    from guidelab.networks import Judge
    from guidelab.results import bin_fid

    dataset = {"name": "mnist5k", "image_size": 16, "root": None}
    data = load_dataset("mnist5k", "train", image_size=16)
    thick = attributes.measured(data, dataset, "train")[:, ATTRIBUTES.index("thickness")]
    sevens = torch.nonzero((data.labels == 7) & ~torch.isnan(thick)).flatten()[:200]
    images = to_uint8(data.images[sevens])
    asked_value = (thick[sevens] * 2).round() / 2  # each image's own bin, to the half pixel
    torch.manual_seed(0)
    net = build_classifier({"arch": "resnet", "channels": 16, "channel_mult": [1, 2], "num_blocks": 1}, 1, 16, 10)
    judge = Judge(net.eval(), {"classifier": {"name": "random", "arch": "resnet"}}, {}, "random", "")
    nets = SimpleNamespace(train_config={"dataset": dataset}, num_classes=10, judges=[judge])
    scores = {}
    for label in (7, 1):
        request = (rows(torch.full((len(sevens),), label), {"thickness": asked_value}), None)
        drawn = Drawn(images, np.full(len(sevens), label), [], 0.0, request=request)
        scores[label], details = bin_fid(nets, drawn, torch.device("cpu"))
        assert details["samples"] > 150 and details["split"] == "train", details
    assert scores[7] < 0.5 * scores[1], scores


def test_the_judge_reports_joint_success_per_request():
    """A run that mixes requests (two thickness values) gets joint success per request in its details."""
    images = np.zeros((4, 16, 16), np.uint8)
    images[:, 4:12, 7:9] = 255  # a bar about 2 px wide at 16 px: about 3.5 px on the 28 px canvas
    y = rows(torch.tensor([1, 1, 1, 1]), {"thickness": torch.tensor([3.5, 9.0, 3.5, 9.0])})
    cols, details = verdict(images, y, 10, None, predicted=np.array([1, 1, 1, 2]))
    thick = morpho.measure(images[:1])["thickness"][0]
    assert abs(thick - 3.5) <= TOLERANCE["thickness"], thick  # the bar meets 3.5, never 9
    assert details["joint_success_by_request"] == {"1 thickness=3.5": 1.0, "1 thickness=9": 0.0}
    assert cols["joint_success"] == 0.5
