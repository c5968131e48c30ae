"""The noisy attribute regressor of CG on attributes: its Gaussian log-likelihood term and the sign of its gradient on
constructed networks, its sigma_t lookup by t bucket, the network's buffers, the training script's refusals, and (slow)
a real training run through train_classifier.py that learns a stand-in measurement and is refused beside a UNet of
another schedule.

The training runs get a stand-in for guidelab.morpho (`STAND_IN`: the ink of an image as "thickness", the shear of its
second moments as "slant"; a few milliseconds where the real measurement takes seconds, and exact to learn) through a
sitecustomize module on the subprocess's PYTHONPATH, and measure into a GUIDELAB_DATA of their own (the real attributes
cache is never written). The clean regressor (classifier.noisy=false), cg_x0's guide on x0_hat, is trained the same
way."""

import math
import os
import textwrap

import pytest
import torch
from torch import nn

from conftest import assert_one_line_error, check_command_line, run_script
from guidelab.errors import GuidelabError
from guidelab.guidance.attributes import gaussian_log_likelihood, regressor_grad, sigma_at
from guidelab.models import build_classifier
from guidelab.models.regressor import T_BUCKETS, NoisyRegressor, t_bucket

TINY = dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), num_heads=4)


class InkRegressor(nn.Module):
    """A constructed "regressor" r(x) = a * mean(x) + b, rising with the ink (pixels in [-1, 1], ink bright), with the
    buffers a NoisyRegressor carries (sigma_t per bucket, the schedule's T)."""

    def __init__(self, a: float = 4.0, b: float = 2.0, attributes: int = 1):
        super().__init__()
        self.a, self.b = a, b
        self.register_buffer("sigma_t", torch.linspace(0.5, 5.0, T_BUCKETS).repeat(attributes, 1))
        self.register_buffer("num_steps", torch.tensor(1000))
        self.attributes = attributes

    def forward(self, x, t):
        return (self.a * x.flatten(1).mean(1) + self.b)[:, None].expand(-1, self.attributes)


def test_the_gaussian_log_likelihood_is_the_sum_over_asked_attributes():
    pred = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    target = torch.tensor([[3.0, float("nan")], [1.0, 1.0]])
    sigma = torch.tensor([[2.0, 7.0], [0.5, 4.0]])
    expected = [
        -0.5 * (2 / 2) ** 2 - math.log(2.0),  # the NaN (not asked) attribute adds nothing, not even its -log sigma
        -0.5 * (1 / 0.5) ** 2 - math.log(0.5) - 0.5 * (2 / 4) ** 2 - math.log(4.0),
    ]
    assert torch.allclose(gaussian_log_likelihood(pred, target, sigma), torch.tensor(expected))
    normal = torch.distributions.Normal(pred[1], sigma[1]).log_prob(target[1]).sum()  # up to -0.5 log(2 pi) each
    assert torch.isclose(gaussian_log_likelihood(pred[1:], target[1:], sigma[1:])[0], normal + math.log(2 * math.pi))


def test_its_gradient_pulls_the_prediction_toward_the_target_and_ignores_what_is_not_asked():
    """log N(v; r(x), s^2) at v above the prediction: the gradient points toward more ink (every pixel up), at v below
    toward less, with the size (v - r) / s^2 * dr/dx; a NaN target gives exactly zero (no NaN leaks)."""
    torch.manual_seed(0)
    net, x, t = InkRegressor(), torch.rand(3, 1, 8, 8) * 2 - 1, torch.full((3,), 450)
    pred = net(x, t)
    targets = torch.stack([pred[0] + 3, pred[1] - 2, torch.tensor([float("nan")])])
    grad, out = regressor_grad(net, x, t, targets)
    assert torch.equal(out, pred) and not out.requires_grad and not grad.requires_grad
    sigma = net.sigma_t[0, 4]  # t = 450 is in bucket 4 of 10
    assert torch.allclose(grad[0], torch.full_like(grad[0], 3 / sigma**2 * 4.0 / 64))  # dr/dx = a / pixels
    assert (grad[1] < 0).all() and torch.allclose(grad[1], torch.full_like(grad[1], -2 / sigma**2 * 4.0 / 64))
    assert torch.equal(grad[2], torch.zeros_like(grad[2]))
    more_ink = x + 0.01 * grad.sign()  # one step along the gradient brings the prediction toward the target
    assert net(more_ink, t)[0] > pred[0] and net(more_ink, t)[1] < pred[1]
    grad_sigma, _ = regressor_grad(net, x, t, targets, sigma=torch.full((3, 1), 2.0))  # a given sigma replaces sigma_t
    assert torch.allclose(grad_sigma[0], grad[0] * sigma**2 / 4)


def test_attributes_add_as_a_product_of_experts():
    """Two attributes' gradient is the sum of each one's (the product of their likelihoods); a NaN column drops one."""
    torch.manual_seed(1)
    net, x, t = InkRegressor(attributes=2), torch.rand(2, 1, 4, 4), torch.tensor([0, 999])
    targets = torch.tensor([[5.0, 1.0], [0.0, 3.0]])
    both, _ = regressor_grad(net, x, t, targets)
    first, _ = regressor_grad(net, x, t, torch.stack([targets[:, 0], torch.full((2,), float("nan"))], 1))
    second, _ = regressor_grad(net, x, t, torch.stack([torch.full((2,), float("nan")), targets[:, 1]], 1))
    assert torch.allclose(both, first + second)


def test_sigma_is_read_in_the_bucket_of_t():
    net = InkRegressor(attributes=2)
    net.sigma_t[1] *= 10
    t = torch.tensor([0, 99, 100, 550, 999])
    assert t_bucket(t, 1000).tolist() == [0, 0, 1, 5, 9]
    assert t_bucket(torch.tensor([99.9, 100.0, 1200.0]), 1000).tolist() == [0, 1, 9]  # float t; beyond T: the last
    sigma = sigma_at(net, t)
    assert sigma.shape == (5, 2) and torch.equal(sigma[:, 0], net.sigma_t[0, [0, 0, 1, 5, 9]])
    assert torch.equal(sigma[:, 1], 10 * sigma[:, 0])
    assert sigma_at(net, torch.tensor([5, 6]), num_steps=10)[:, 0].tolist() == net.sigma_t[0, [5, 6]].tolist()
    for T in (10, 37, 1000):  # the evaluation's bucket ranges [ceil(k T / K), ceil((k + 1) T / K)) are t_bucket's
        ranges = [range(-(-k * T // T_BUCKETS), -(-(k + 1) * T // T_BUCKETS)) for k in range(T_BUCKETS)]
        assert [t_bucket(torch.tensor(list(r)), T).unique().tolist() for r in ranges] == [[k] for k in range(10)]
    net.num_steps.fill_(0)
    with pytest.raises(GuidelabError, match="num_steps"):
        sigma_at(net, t)


def test_the_network_predicts_raw_units_from_its_normalised_head_and_saves_its_buffers():
    cfg = {"arch": "regressor", "attributes": ["thickness", "slant"], **TINY}
    net = build_classifier(cfg, 1, 16, num_classes=10).eval()  # num_classes is taken and ignored
    assert isinstance(net, NoisyRegressor) and net.attributes == ("thickness", "slant")
    stats = {"thickness": {"mean": 2.5, "std": 0.5}, "slant": {"mean": 0.1, "std": 0.2}}
    net.set_statistics(stats, 1000)
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0, 500, 999])
    with torch.no_grad():
        raw = net(x, t)
        assert raw.shape == (3, 2)
        assert torch.allclose(raw, net.normalised(x, t) * torch.tensor([0.5, 0.2]) + torch.tensor([2.5, 0.1]))
    assert torch.equal(net.sigma_t, torch.tensor([[0.5] * 10, [0.2] * 10]))  # the SD until evaluated
    state = net.state_dict()
    assert {"attr_stats", "sigma_t", "num_steps"} <= set(state) and int(state["num_steps"]) == 1000
    for bad, fragment in [([], "is empty"), (["colour"], "unknown attribute 'colour'"), (["slant"] * 2, "twice")]:
        with pytest.raises(GuidelabError, match=fragment):
            NoisyRegressor(1, 16, 10, attributes=bad, **TINY)


REGRESSOR = ["classifier=regressor", "dataset=mnist5k", "dataset.image_size=16"]


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (["dataset=procedural"], "defined on handwritten digits only"),
        (["dataset=cifar10"], "dataset=cifar10 has none"),
        (["classifier.attributes=[]"], "classifier.attributes is empty"),
        (["classifier.attributes=[thickness,colour]"], "unknown attribute 'colour'"),
        (["classifier.attributes=[slant,slant]"], "lists an attribute twice"),
        (["classifier.attributes=[1,2]"], "unknown attribute 1"),
        (["classifier.rotate=10"], "classifier.rotate=10.0 does not apply to the regressor"),
        (["classifier.pgd_eps=0.1", "classifier.pgd_steps=1"], "classifier.pgd_eps=0.1 does not apply"),
        (["diffusion.num_steps=5"], "needs at least 10 steps"),
        (["diffusion.num_steps=0"], "needs at least 10 steps, diffusion has 0"),
        (["classifier.attributes=thickness"], "attributes"),  # Hydra's type check: a list
    ],
)
def test_the_script_refuses_what_a_regressor_cannot_be_trained_on(overrides, fragment):
    line = check_command_line("train_classifier.py", *REGRESSOR, *overrides)
    assert line.startswith("error: ") and fragment in line, line


def test_the_documented_commands_pass_and_other_classifiers_have_no_attributes():
    script = "train_classifier.py"
    assert check_command_line(script, "classifier=regressor", "classifier.attributes=[thickness,slant]") == ""
    assert check_command_line(script, *REGRESSOR, "diffusion=cosine") == ""
    assert "unknown key 'classifier.attributes'" in check_command_line(script, "classifier.attributes=[slant]")


# ---------------------------------------------------------------- a real run (slow)
STAND_IN = '''
"""A stand-in guidelab.morpho for tests/test_regressor.py (fast, and exact to learn)."""
import sys
import types

import numpy as np


def measure(images):
    x = np.asarray(images, dtype=np.float64)
    x = x / 255 if np.asarray(images).dtype == np.uint8 else (x + 1) / 2
    ink = x[:, 0]
    mass = ink.sum((1, 2))
    scale = 28 / ink.shape[-1]
    rows, cols = np.mgrid[: ink.shape[1], : ink.shape[2]].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        moment = lambda a: (ink * a).sum((1, 2)) / mass
        dy, dx = rows - moment(rows)[:, None, None], cols - moment(cols)[:, None, None]
        shear = moment(dx * dy) / moment(dy * dy)  # the lean of the ink's second moments
    empty = mass == 0
    thickness = np.where(empty, np.nan, 10 * ink.mean((1, 2)))
    slant = np.where(empty, np.nan, np.arctan(-shear))
    area = np.where(empty, np.nan, mass * scale**2)
    return {"area": area, "length": area, "thickness": thickness, "slant": slant, "width": area, "height": area}


module = types.ModuleType("guidelab.morpho")
module.measure = measure
sys.modules["guidelab.morpho"] = module
'''


def _train(root, *overrides, steps: int = 300):
    """A tiny regressor of the stand-in thickness and slant, mnist5k at 16 px, on the linear schedule, into ROOT/R."""
    (root / "shim").mkdir()
    (root / "shim" / "sitecustomize.py").write_text(textwrap.dedent(STAND_IN))
    env = {
        "PYTHONPATH": os.pathsep.join([str(root / "shim"), os.environ.get("PYTHONPATH", "")]),
        "GUIDELAB_DATA": str(root / "data"),  # the stand-in's attributes are cached here, not in the real cache
    }
    small = [f"classifier.{k}={list(v) if isinstance(v, tuple) else v}".replace(" ", "") for k, v in TINY.items()]
    proc = run_script(
        "train_classifier.py",
        *REGRESSOR,
        "classifier.attributes=[thickness,slant]",
        *small,
        *overrides,
        f"train.steps={steps}",
        "train.batch_size=64",
        "train.lr=2e-3",
        "train.warmup_steps=20",
        "train.eval_every=0",
        "train.ckpt_every=0",
        "train.log_every=50",
        "train.progress=false",
        f"hydra.run.dir={root / 'R'}",
        cwd=root,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "R" / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def trained_regressor(tmp_path_factory):
    """The noisy regressor: 300 steps."""
    return _train(tmp_path_factory.mktemp("regressor"))


@pytest.fixture(scope="module")
def clean_regressor(tmp_path_factory):
    """The clean regressor (classifier.noisy=false): 150 steps on clean images."""
    return _train(tmp_path_factory.mktemp("clean"), "classifier.noisy=false", steps=150)


@pytest.mark.slow
def test_the_regressor_learns_the_measurement_and_carries_its_held_out_error(trained_regressor):
    """Held-out R^2 at the least noise (t < 100 of 1000) well above 0 for both attributes (measured with this seed:
    thickness .951, slant .886; the bar leaves a margin), its error growing with the noise up to the training set's SD
    in the noisiest bucket (where only the mean can be predicted), and sigma_t in the checkpoint equal to the reported
    RMSE per bucket."""
    ckpt = torch.load(trained_regressor, weights_only=True)
    m = ckpt["metrics"]
    assert m["r2_thickness_t0"] > 0.85 and m["r2_slant_t0"] > 0.7, m
    sigma_t = ckpt["ema"]["sigma_t"]
    assert sigma_t.shape == (2, T_BUCKETS) and int(ckpt["ema"]["num_steps"]) == 1000
    for i, name in enumerate(("thickness", "slant")):
        assert [round(v, 5) for v in sigma_t[i].tolist()] == [round(m[f"rmse_{name}_t{k}"], 5) for k in range(10)]
        assert sigma_t[i, -1] > 2 * sigma_t[i, 0]  # pure noise reads less than a clean digit (measured: 4.5, 3.0)
        sd = ckpt["config"]["data_info"]["attributes"][name]["std"]
        assert abs(sigma_t[i, -1] / sd - 1) < 0.2, (name, sigma_t[i], sd)
        assert torch.allclose(ckpt["ema"]["attr_stats"][1, i].double(), torch.tensor(sd, dtype=torch.float64))
    assert torch.equal(ckpt["model"]["sigma_t"], sigma_t)  # the online copy too: EMA updates copy its buffers


def _unet_ckpt(schedule: str, image_size: int = 16) -> dict:
    """The config part of a UNet checkpoint, what `load_regressor` compares (data, size, schedule)."""
    from guidelab.schedules import schedule_signature

    diffusion = {"schedule": schedule, "num_steps": 1000}
    info = {"num_classes": 10, "channels": 1, "class_names": [str(i) for i in range(10)]}
    config = {"dataset": {"name": "mnist5k", "image_size": image_size}, "data_info": info, "diffusion": diffusion}
    return {"kind": "diffusion", "config": {**config, "schedule": schedule_signature(diffusion), "model": {}}}


@pytest.mark.slow
def test_loading_checks_it_against_the_unet(trained_regressor):
    from guidelab.networks import _partner, load_regressor, role_of

    net, ckpt = load_regressor(trained_regressor, _unet_ckpt("linear"), torch.device("cpu"))
    assert role_of(ckpt["config"]) == "regressor" and net.attributes == ("thickness", "slant")
    x, t = torch.zeros(2, 1, 16, 16), torch.tensor([0, 999])
    grad, _ = regressor_grad(net, x, t, torch.tensor([[3.0, float("nan")], [3.0, 0.0]]))
    assert net.rows == 2 and grad.shape == x.shape and torch.isfinite(grad).all()  # counted as a guide's rows
    with pytest.raises(GuidelabError, match="another noise schedule"):
        load_regressor(trained_regressor, _unet_ckpt("cosine"), torch.device("cpu"))
    with pytest.raises(GuidelabError, match="image_size 28 vs 16"):
        load_regressor(trained_regressor, _unet_ckpt("linear", 28), torch.device("cpu"))
    with pytest.raises(GuidelabError, match=r"regressor \(classifier=regressor\), but this use needs a noisy guidance"):
        _partner(str(trained_regressor), "classifier", _unet_ckpt("linear"), torch.device("cpu"))


@pytest.mark.slow
def test_sampling_with_a_unet_of_another_schedule_is_refused_in_one_line(trained_regressor, tmp_path):
    """sample.py's for_sampling loads regressor_ckpt beside the UNet: a regressor of another schedule is refused."""
    unet = [*REGRESSOR[1:], "diffusion=cosine", "train.steps=2", "train.eval_every=0", "train.ckpt_every=0"]
    proc = run_script("train_diffusion.py", "experiment=smoke", *unet, f"hydra.run.dir={tmp_path / 'D'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_script(
        "sample.py",
        "experiment=smoke",
        "guidance=cfg",
        f"ckpt={tmp_path / 'D' / 'checkpoints' / 'last.pt'}",
        f"regressor_ckpt={trained_regressor}",
        f"hydra.run.dir={tmp_path / 'S'}",
        cwd=tmp_path,
    )
    assert_one_line_error(proc, "the regressor was trained on another noise schedule", "diffusion=")


def test_the_regressor_counts_as_a_guide():
    """Networks.evaluations: its rows and seconds count into classifier_nfe and classifier_seconds (a guide)."""
    from guidelab.guided import Counted
    from guidelab.networks import Networks

    net = Networks(Counted(lambda x, t, y: x), None, {})
    assert net.evaluations() == {"nfe": 0, "classifier_nfe": 0, "classifier_seconds": None}
    net.regressor = Counted(InkRegressor())
    net.regressor(torch.zeros(3, 1, 4, 4), torch.zeros(3))
    net.regressor.tally.seconds = 0.5
    assert net.evaluations() == {"nfe": 0, "classifier_nfe": 3, "classifier_seconds": 0.5}
    net.classifier = Counted(lambda x, t: x)
    net.classifier(torch.zeros(2, 1, 4, 4), torch.zeros(2))
    assert net.evaluations()["classifier_nfe"] == 5


@pytest.mark.slow
def test_the_clean_regressor_reads_clean_digits_and_guides_only_on_x0_hat(clean_regressor, trained_regressor):
    """classifier.noisy=false: trained at t = 0, its one held-out RMSE in every bucket of sigma_t (what cg_x0 reads
    at t = 0), a high R^2 on clean digits (measured with this seed: thickness .987, slant .956; the bar leaves a
    margin), the role `clean_regressor`, loaded for the guides of x0_hat and refused for those of x_t, and the other
    way round."""
    from guidelab.networks import load_regressor, role_of

    ckpt = torch.load(clean_regressor, weights_only=True)
    m, sigma_t = ckpt["metrics"], ckpt["ema"]["sigma_t"]
    assert m["r2_thickness_t0"] > 0.9 and m["r2_slant_t0"] > 0.8, m
    assert "rmse_thickness_t3" not in m  # no buckets of t: one clean error
    for i, name in enumerate(("thickness", "slant")):
        assert torch.allclose(sigma_t[i], torch.full((T_BUCKETS,), m[f"rmse_{name}"], dtype=sigma_t.dtype))
    assert role_of(ckpt["config"]) == "clean_regressor"
    cpu = torch.device("cpu")
    net, _ = load_regressor(clean_regressor, _unet_ckpt("cosine"), cpu, "clean_regressor")  # any schedule: t = 0
    assert net.attributes == ("thickness", "slant")
    with pytest.raises(GuidelabError, match=r"is a clean attribute regressor .*, but this use needs a noisy attribute"):
        load_regressor(clean_regressor, _unet_ckpt("linear"), cpu)
    with pytest.raises(GuidelabError, match=r"is a noisy attribute regressor .*, but this use needs a clean attribute"):
        load_regressor(trained_regressor, _unet_ckpt("linear"), cpu, "clean_regressor")
