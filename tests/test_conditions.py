"""Conditions as a type: condition rows (a class and measured attributes), their dropout, the requests a run reads,
the UNet's attribute embeddings, joint and composed CFG, NOT, and composed classifier guidance (a product of experts),
on constructed tensors and tiny networks."""

import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import CONFIGS
from guidelab.conditions import (
    ATTRIBUTES,
    FIELDS,
    asked,
    columns,
    drop_fields,
    drop_labels,
    keep,
    labels_of,
    null_like,
    requested,
    rows,
)
from guidelab.diffusion import Diffusion, linear_betas
from guidelab.errors import GuidelabError
from guidelab.guidance import composed_combine, make_eps_fn, resolve, tweedie_bound
from guidelab.models.unet import UNet

NULL = 10
PROCESS = Diffusion(linear_betas(1000))


def test_rows_hold_the_class_and_raw_attributes_with_nan_as_the_null():
    y = rows(torch.tensor([3, NULL]), {"thickness": torch.tensor([2.5, 4.0])})
    assert y.shape == (2, len(FIELDS)) and y.dtype == torch.float32
    assert labels_of(y).tolist() == [3, NULL] and labels_of(y).dtype == torch.long
    assert columns(y, ["thickness"]).flatten().tolist() == [2.5, 4.0]
    assert torch.isnan(columns(y, ["slant", "area"])).all()
    assert asked(y, NULL) == ("label", "thickness") and asked(y[1:], NULL) == ("thickness",)
    null = null_like(y, NULL)
    assert labels_of(null).tolist() == [NULL, NULL] and torch.isnan(null[:, 1:]).all()
    only = keep(y, ["thickness"], NULL)
    assert labels_of(only).tolist() == [NULL, NULL] and columns(only, ["thickness"]).flatten().tolist() == [2.5, 4.0]
    assert torch.equal(null_like(torch.tensor([1, 2]), NULL), torch.tensor([NULL, NULL]))


def test_requested_is_every_combination_with_the_class_fastest():
    y, away = requested([7, 1], {"thickness": [2, 4]}, 6, 10)
    assert away is None
    assert labels_of(y).tolist() == [7, 1, 7, 1, 7, 1]
    assert columns(y, ["thickness"]).flatten().tolist() == [2, 2, 4, 4, 2, 2]
    free, _ = requested("any", {"slant": 0.3}, 3, 10)
    assert labels_of(free).tolist() == [10, 10, 10] and asked(free, 10) == ("slant",)
    plain, _ = requested([3], {}, 4, 10)  # a class-only request stays plain labels, as every run before attributes
    assert plain.dim() == 1 and plain.tolist() == [3, 3, 3, 3]
    y, away = requested(None, {"thickness": 3}, 10, 10, negative={"slant": 0.4, "label": 2})
    assert labels_of(y).tolist() == list(range(10))
    assert (
        labels_of(away).tolist() == [2] * 10
        and columns(away, ["slant"]).flatten().tolist() == [pytest.approx(0.4)] * 10
    )
    assert asked(away, 10) == ("label", "slant")


@pytest.mark.parametrize(
    "attrs, negative, message",
    [
        ({"thicknes": 3}, None, "no attribute 'thicknes'; the measured attributes are area, length, thickness"),
        ({"thickness": math.nan}, None, "attrs.thickness=nan is not a finite number"),
        ({"thickness": "thick"}, None, "attrs.thickness='thick' is not a finite number"),
        ({"thickness": []}, None, "attrs.thickness is an empty list"),
        ({}, {"slant": [0.1, 0.2]}, "negative.<field> takes one value"),
        ({}, {"colour": 1}, "negative.colour: no attribute 'colour'"),
    ],
)
def test_bad_requests_are_refused_in_one_line(attrs, negative, message):
    with pytest.raises(GuidelabError, match=None) as err:
        requested(None, attrs, 4, 10, negative=negative)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_drop_fields_drops_each_field_alone_and_whole_rows():
    torch.manual_seed(0)
    y = rows(torch.full((20000,), 3), {"thickness": torch.full((20000,), 2.0), "slant": torch.full((20000,), 0.1)})
    dropped = drop_fields(y, 0.1, NULL, 0.2)
    label_null = labels_of(dropped) == NULL
    thick_null, slant_null = torch.isnan(dropped[:, FIELDS.index("thickness")]), torch.isnan(dropped[:, 4])
    everything = label_null & thick_null & slant_null
    # each field: 1 - (1 - 0.2)(1 - 0.1) = 0.28 null; all three: 0.1 + 0.9 * 0.2^3 = 0.1072
    for frac in (label_null, thick_null, slant_null):
        assert abs(frac.float().mean().item() - 0.28) < 0.015
    assert abs(everything.float().mean().item() - 0.1072) < 0.01
    assert drop_fields(y, 0.0, NULL, 0.0) is y  # nothing to drop: nothing drawn
    labels = torch.arange(10).repeat(100)
    torch.manual_seed(1)
    a = drop_fields(labels, 0.3, NULL, 0.2)  # plain labels: exactly drop_labels, the same draws
    torch.manual_seed(1)
    assert torch.equal(a, drop_labels(labels, 0.3, NULL))


def _unet(output=True, **kw):
    torch.manual_seed(0)
    net = UNet(1, 8, 10, channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0, **kw)
    if output:  # zero-initialised layers (conv_out, each residual branch's last conv) as if trained
        with torch.no_grad():
            for p in net.parameters():
                if p.dim() > 1 and not p.any():
                    p.normal_(0, 0.1)
    return net.eval()


def test_unet_embeds_attributes_with_a_learned_null_and_stores_their_statistics():
    net, plain = _unet(False, attributes=("thickness", "slant")), _unet(False)
    shared = {k: v for k, v in net.state_dict().items() if k in plain.state_dict()}
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in shared.items())  # built last: the same draws
    assert "attr_stats" in net.state_dict() and net.attr_stats.shape == (2, 2)
    net = _unet(attributes=("thickness", "slant"))
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 900])
    labels = torch.tensor([1, 2, NULL])
    with torch.no_grad():
        torch.nn.init.normal_(net.attr_null)
        free = net(x, t, labels)
        assert torch.equal(free, net(x, t, rows(labels)))  # plain labels leave every attribute at its null
        asked_ = net(x, t, rows(labels, {"thickness": torch.tensor([2.0, 3.0, 4.0])}))
        assert (asked_ - free).abs().amax() > 1e-4  # an attribute value reaches the output
        other = net(x, t, rows(labels, {"thickness": torch.tensor([5.0, 3.0, 4.0])}))
        assert (other[0] - asked_[0]).abs().amax() > 1e-5 and torch.equal(other[1:], asked_[1:])


def test_unet_refuses_unknown_or_repeated_attributes():
    with pytest.raises(GuidelabError, match="model.attributes: unknown attribute 'colour'"):
        _unet(attributes=("colour",))
    with pytest.raises(GuidelabError, match="lists an attribute twice"):
        _unet(attributes=("slant", "slant"))


class RowUNet(torch.nn.Module):
    """eps depends on every field of a condition row: the class (null = 10) and two attributes (NaN = null)."""

    null_class = NULL
    attributes = ("thickness", "slant")

    def __init__(self):
        super().__init__()
        self.calls = []
        self.emb = torch.nn.Embedding(11, 1)

    def forward(self, x, t, y):
        self.calls.append(len(x))
        y = y if y.dim() == 2 else rows(y)
        extra = torch.nan_to_num(columns(y, self.attributes), nan=-1.0) @ torch.tensor([0.3, -0.7])
        return 0.5 * x + (self.emb(labels_of(y)).flatten() + extra).view(-1, 1, 1, 1)


def test_composed_cfg_with_one_field_is_joint_cfg_and_sums_the_fields_otherwise():
    unet = RowUNet()
    x, t = torch.randn(4, 1, 4, 4), torch.full((4,), 500)
    y, _ = requested([2, 5], {}, 4, 10)
    joint = make_eps_fn(resolve("cfg", 3.0), unet, y)(x, t).eps
    composed = make_eps_fn(resolve("cfg_composed", 3.0), unet, rows(y))(x, t).eps
    torch.testing.assert_close(composed, joint)
    y2, _ = requested([2], {"thickness": 3.0}, 4, 10)
    unet.calls.clear()
    out = make_eps_fn(resolve("cfg_composed", 2.0), unet, y2, weights={"thickness": 4.0})(x, t).eps
    assert unet.calls == [12]  # label, thickness and the null in one batched pass
    with torch.no_grad():
        eps_u = unet(x, t, null_like(y2, NULL))
        eps_label, eps_thick = unet(x, t, keep(y2, ["label"], NULL)), unet(x, t, keep(y2, ["thickness"], NULL))
    torch.testing.assert_close(out, eps_u + 2.0 * (eps_label - eps_u) + 4.0 * (eps_thick - eps_u))
    torch.testing.assert_close(composed_combine(eps_u, [eps_label], [1.0]), eps_label)


def test_not_is_a_negative_weight_in_composed_cfg_and_the_second_branch_of_cfg():
    unet = RowUNet()
    x, t = torch.randn(2, 1, 4, 4), torch.full((2,), 300)
    y, away = requested([4], {"thickness": 2.0}, 2, 10, negative={"slant": 0.5})
    with torch.no_grad():
        eps_c, eps_not, eps_u = unet(x, t, y), unet(x, t, away), unet(x, t, null_like(y, NULL))
    cfg = make_eps_fn(resolve("cfg", 3.0), unet, y, negative=away)(x, t).eps
    torch.testing.assert_close(cfg, eps_not + 3.0 * (eps_c - eps_not))  # a negative prompt: eps(not) for eps_u
    composed = make_eps_fn(resolve("cfg_composed", 3.0), unet, y, negative=away)(x, t).eps
    eps_l, eps_th = unet(x, t, keep(y, ["label"], NULL)), unet(x, t, keep(y, ["thickness"], NULL))
    expected = eps_u + 3.0 * (eps_l - eps_u) + 3.0 * (eps_th - eps_u) - 3.0 * (eps_not - eps_u)
    torch.testing.assert_close(composed, expected.detach())


def test_a_field_no_network_reaches_is_refused_in_one_line():
    unet = RowUNet()
    y, _ = requested([1], {"width": 3.0}, 2, 10)
    with pytest.raises(GuidelabError, match="guidance=cfg cannot steer width: the diffusion model was not trained"):
        make_eps_fn(resolve("cfg", 3.0), unet, y)
    with pytest.raises(GuidelabError, match="guidance=icg takes a class label only"):
        make_eps_fn(resolve("icg", 3.0), unet, requested([1], {"thickness": 3.0}, 2, 10)[0])
    with pytest.raises(GuidelabError, match="guidance=none cannot steer label, thickness"):
        make_eps_fn(resolve("none", base="uncond"), unet, requested([1], {"thickness": 3.0}, 2, 10)[0])
    with pytest.raises(GuidelabError, match="cannot steer width.*no guide scores it"):
        make_eps_fn(resolve("cg", 3.0), unet, y, classifier=torch.nn.Identity(), diffusion=PROCESS)


class InkRegressor(torch.nn.Module):
    """Predicts 'thickness' as 3 + the mean pixel value (more ink: thicker), its held-out error 1 at every t."""

    attributes = ("thickness",)
    num_steps = 1000
    sigma_t = torch.ones(1, 10)

    def forward(self, x, t):
        return 3 + x.mean(dim=(1, 2, 3)).unsqueeze(1)


class LinearClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Linear(16, 11)

    def forward(self, x, t):
        return self.w(x.flatten(1))


def test_composed_cg_sums_the_guides_terms_and_not_subtracts():
    unet, regressor, classifier = RowUNet(), InkRegressor(), LinearClassifier()
    x, t = torch.zeros(2, 1, 4, 4), torch.full((2,), 400)
    abar = PROCESS.abar[t].view(-1, 1, 1, 1).float()
    y, _ = requested([1], {"thickness": 5.0}, 2, 10)  # asks for more ink than x holds
    guided = make_eps_fn(resolve("cg", 2.0), unet, y, classifier, PROCESS, regressor=regressor)(x, t)
    up = torch.full_like(x, 2.0 / 16)  # grad of -(5 - (3 + mean x))^2 / 2 at x = 0: (5 - 3) / 16 per pixel
    with torch.enable_grad():
        xg = x.clone().requires_grad_(True)
        logp = torch.log_softmax(classifier(xg, t), -1)[:, 1].sum()
        (cls_grad,) = torch.autograd.grad(logp, xg)
    expected = 2.0 * tweedie_bound(up, abar) + 2.0 * tweedie_bound(cls_grad, abar)
    torch.testing.assert_close(guided.score, expected)
    assert (guided.score - 2.0 * tweedie_bound(cls_grad, abar)).mean() > 0  # the thickness term adds ink
    y, away = requested([1], {}, 2, 10, negative={"thickness": 5.0})
    away_only = make_eps_fn(resolve("cg", 2.0), unet, y, classifier, PROCESS, negative=away, regressor=regressor)
    torch.testing.assert_close(
        away_only(x, t).score, -2.0 * tweedie_bound(up, abar) + 2.0 * tweedie_bound(cls_grad, abar)
    )
    free, _ = requested("any", {"thickness": 5.0}, 2, 10)
    weighted = make_eps_fn(
        resolve("cg", 2.0), unet, free, classifier, PROCESS, weights={"thickness": 7.0}, regressor=regressor
    )
    torch.testing.assert_close(weighted(x, t).score, 7.0 * tweedie_bound(up, abar))  # no label asked: no class term


def test_cg_x0_composes_the_clean_guides_on_x0_hat_through_the_unet():
    """cg_x0 on condition rows: with the label alone it is cg_x0 on plain labels; with thickness it adds the clean
    regressor's Gaussian log-likelihood gradient read on x0_hat(x_t), taken with respect to x_t through the UNet,
    each term within the Tweedie bound; a NOT subtracts; without a regressor the attribute is refused."""
    unet, regressor, classifier = RowUNet(), InkRegressor(), LinearClassifier()
    x, t = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3)) * 0.1, torch.full((2,), 400)
    abar = PROCESS.abar[t].view(-1, 1, 1, 1).float()
    plain = make_eps_fn(resolve("cg_x0", 2.0), unet, torch.tensor([1, 1]), classifier, PROCESS)(x, t)
    label_only = make_eps_fn(resolve("cg_x0", 2.0), unet, rows(torch.tensor([1, 1])), classifier, PROCESS)(x, t)
    torch.testing.assert_close(label_only.eps, plain.eps)
    torch.testing.assert_close(label_only.score, plain.score)

    def through_unet(objective):  # grad_{x_t} objective(x0_hat(x_t)), x0_hat from the null prediction (base=uncond)
        with torch.enable_grad():
            xg = x.clone().requires_grad_(True)
            y_null = null_like(rows(torch.tensor([1, 1])), NULL)
            x0_hat = PROCESS.predict_x0(xg, t, unet(xg, t, y_null))
            return torch.autograd.grad(objective(x0_hat).sum(), xg)[0]

    zeros = torch.zeros_like(t)
    thick = through_unet(lambda x0: -0.5 * (5.0 - regressor(x0, zeros)[:, 0]) ** 2)  # sigma_0 = 1
    label = through_unet(lambda x0: torch.log_softmax(classifier(x0, zeros), -1)[:, 1])
    y, _ = requested([1], {"thickness": 5.0}, 2, 10)
    guided = make_eps_fn(resolve("cg_x0", 2.0), unet, y, classifier, PROCESS, regressor=regressor)(x, t)
    torch.testing.assert_close(guided.score, 2.0 * tweedie_bound(thick, abar) + 2.0 * tweedie_bound(label, abar))
    assert (guided.score - 2.0 * tweedie_bound(label, abar)).mean() > 0  # the thickness term adds ink
    y, away = requested("any", {}, 2, 10, negative={"thickness": 5.0})
    away_only = make_eps_fn(resolve("cg_x0", 3.0), unet, y, classifier, PROCESS, negative=away, regressor=regressor)
    torch.testing.assert_close(away_only(x, t).score, -3.0 * tweedie_bound(thick, abar))
    with pytest.raises(GuidelabError, match="guidance=cg_x0 cannot steer thickness.*no guide scores it"):
        make_eps_fn(resolve("cg_x0", 2.0), unet, requested([1], {"thickness": 5.0}, 2, 10)[0], classifier, PROCESS)


def _sample_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="sample", overrides=list(overrides))


def test_the_command_line_takes_attributes_their_not_and_weights_as_typed():
    cfg = _sample_cfg(
        "attrs.thickness=4.5", "attrs.slant=[-0.3,0.3]", "negative.width=9", "weights.label=2", "labels=any"
    )
    assert cfg.attrs.thickness == 4.5 and list(cfg.attrs.slant) == [-0.3, 0.3] and cfg.attrs.area is None
    assert cfg.negative.width == 9 and cfg.weights.label == 2 and cfg.labels == "any"
    assert set(cfg.attrs) == set(ATTRIBUTES) and set(cfg.negative) == set(FIELDS) == set(cfg.weights)


def test_the_rows_attributes_are_the_measurements_in_their_order():
    from guidelab import morpho

    assert morpho.ATTRIBUTES == ATTRIBUTES and FIELDS == ("label", *ATTRIBUTES)


@pytest.mark.parametrize(
    "override, message",
    [
        ("attrs.thickness=thick", "attrs.thickness='thick' is not a finite number"),
        ("attrs.slant=[0.1,x]", "attrs.slant='x' is not a finite number"),
        ("negative.slant=[0.1,0.2]", "negative.slant takes one value"),
        ("weights.thickness=heavy", "weights.thickness='heavy' is not a finite number"),
        ("attrs.thickness=nan", "attrs.thickness is nan; give it a finite number"),
    ],
)
def test_a_bad_request_is_refused_before_anything_is_loaded(override, message):
    from conftest import check_command_line

    line = check_command_line("sample.py", override, "ckpt=missing.pt")
    assert message in line, line
