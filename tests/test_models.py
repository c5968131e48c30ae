"""Networks: shapes at the three dataset sizes, DDPM parameter count, null label, label dropout, classifier."""

from pathlib import Path

import pytest
import torch
from einops import rearrange
from omegaconf import OmegaConf

from guidelab.augment import random_affine
from guidelab.errors import GuidelabError
from guidelab.models import CLASSIFIERS, NoisyClassifier, UNet, build_classifier, build_unet
from guidelab.models.layers import timestep_embedding

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SIZES = [(1, 28), (1, 16), (3, 32)]  # (in_channels, image_size) of MNIST, procedural, CIFAR-10
SMALL = dict(channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, num_heads=2)


def small_attn(image_size):
    return (image_size // 2 + image_size % 2,)  # attention at the second level, whatever the input size


def perturb(model, scale=0.05, seed=0):
    """Add noise to every parameter: zero-initialised residual branches would otherwise hide conditioning."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.parametrize("in_channels,image_size", SIZES)
def test_unet_output_shape(in_channels, image_size):
    model = UNet(in_channels, image_size, num_classes=10, attn_resolutions=small_attn(image_size), **SMALL)
    x = torch.randn(3, in_channels, image_size, image_size)
    eps = model(x, torch.tensor([0, 500, 999]), torch.tensor([0, 9, 10]))
    assert eps.shape == x.shape


@pytest.mark.parametrize("in_channels,image_size", SIZES)
def test_classifier_output_shape(in_channels, image_size):
    model = NoisyClassifier(in_channels, image_size, num_classes=7, attn_resolutions=small_attn(image_size), **SMALL)
    logits = model(torch.randn(3, in_channels, image_size, image_size), torch.tensor([0.0, 10.5, 999.0]))
    assert logits.shape == (3, 7)


def test_unet_two_levels_deep_odd_size():
    # 28 -> 14 -> 7 -> 4: the decoder must resize 4 -> 7 to meet the 7x7 skip.
    model = UNet(1, 28, num_classes=10, channels=16, channel_mult=(1, 1, 2, 2), num_res_blocks=1, attn_resolutions=())
    x = torch.randn(2, 1, 28, 28)
    assert model(x, torch.tensor([1, 2]), torch.tensor([3, 4])).shape == x.shape


def test_unet_cifar_parameter_count():
    model = UNet(in_channels=3, image_size=32, num_classes=10)
    n = sum(p.numel() for p in model.parameters())
    assert 35.0e6 <= n <= 37.5e6, n
    # DDPM's CIFAR-10 network is 35,746,307 parameters; the class embedding adds (10 + 1) * 512.
    assert n == 35_746_307 + 11 * 512


def test_null_label_row_and_effect():
    model = perturb(UNet(1, 16, num_classes=10, attn_resolutions=(8,), **SMALL)).eval()
    assert model.null_class == 10
    assert model.class_embed.weight.shape[0] == 11
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([100, 100])
    with torch.no_grad():
        eps_null = model(x, t, torch.full((2,), model.null_class))
        eps_label = model(x, t, torch.tensor([3, 3]))
        eps_null_again = model(x, t, torch.full((2,), model.null_class))
    assert torch.equal(eps_null, eps_null_again)  # eval mode is deterministic (no label dropout, no dropout)
    assert (eps_null - eps_label).abs().max() > 1e-4


def test_zero_init_output():
    model = UNet(1, 16, num_classes=10, attn_resolutions=(8,), **SMALL)
    assert model(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]), torch.tensor([1, 2])).abs().max() == 0


def test_label_dropout_rate():
    torch.manual_seed(0)
    model = UNet(1, 16, num_classes=10, p_uncond=0.3, attn_resolutions=(), **SMALL)
    y = torch.randint(0, 10, (100_000,))
    model.train()
    dropped = model.drop_labels(y)
    is_null = dropped == model.null_class
    assert abs(is_null.float().mean().item() - 0.3) < 0.01
    assert torch.equal(dropped[~is_null], y[~is_null])  # kept labels are unchanged
    model.eval()
    assert torch.equal(model.drop_labels(y), y)
    never = UNet(1, 16, num_classes=10, p_uncond=0.0, attn_resolutions=(), **SMALL).train()
    assert torch.equal(never.drop_labels(y), y)


def test_label_dropout_follows_global_seed():
    model = UNet(1, 16, num_classes=10, p_uncond=0.5, attn_resolutions=(), **SMALL).train()
    y = torch.randint(0, 10, (1000,))
    torch.manual_seed(1)
    a = model.drop_labels(y)
    torch.manual_seed(1)
    assert torch.equal(a, model.drop_labels(y))


def test_classifier_depends_on_t_and_gives_input_gradients():
    model = perturb(NoisyClassifier(1, 28, num_classes=10, attn_resolutions=(14,), **SMALL)).eval()
    x = torch.randn(4, 1, 28, 28, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    logits_early = model(x, torch.full((4,), 10))
    logits_late = model(x, torch.full((4,), 900))
    assert (logits_early - logits_late).abs().max() > 1e-4
    logits_late.gather(1, y[:, None]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert (x.grad.flatten(1).abs().sum(1) > 0).all()  # every sample gets its own gradient


def test_timestep_embedding():
    t = torch.tensor([0, 1, 500, 999])
    emb = timestep_embedding(t, 64)
    assert emb.shape == (4, 64) and emb.dtype == torch.float32
    assert torch.cdist(emb, emb).fill_diagonal_(1.0).min() > 1e-3  # all pairs differ
    frac = timestep_embedding(torch.tensor([0.5, 1.0, 1.5]), 64)
    assert torch.isfinite(frac).all()
    assert (frac[0] - frac[1]).abs().max() > 1e-3 and (frac[1] - frac[2]).abs().max() > 1e-3
    assert torch.allclose(frac[1], emb[1])  # float 1.0 == int 1
    assert timestep_embedding(t, 33).shape == (4, 33)  # odd dim is zero-padded


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    unet = perturb(UNet(1, 28, num_classes=10, attn_resolutions=(14,), **SMALL)).eval()
    clf = perturb(NoisyClassifier(1, 28, num_classes=10, attn_resolutions=(14,), **SMALL)).eval()
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([5, 600]), torch.tensor([1, 10])
    with torch.no_grad():
        ref_eps, ref_logits = unet(x, t, y), clf(x, t)
        unet, clf = unet.to(memory_format=torch.channels_last), clf.to(memory_format=torch.channels_last)
        x_cl = x.to(memory_format=torch.channels_last)
        assert torch.allclose(unet(x_cl, t, y), ref_eps, atol=1e-5, rtol=1e-4)
        assert torch.allclose(clf(x_cl, t), ref_logits, atol=1e-5, rtol=1e-4)


def test_builders_from_plain_dict():
    cfg = {"name": "tiny", "channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8]}
    unet = build_unet(cfg, in_channels=1, image_size=16, num_classes=10)
    assert isinstance(unet, UNet) and unet.null_class == 10
    clf = build_classifier({**cfg, "noisy": True, "num_heads": 2}, in_channels=1, image_size=16, num_classes=10)
    assert clf(torch.randn(2, 1, 16, 16), torch.tensor([0, 0])).shape == (2, 10)


def test_builders_reject_unknown_keys():
    from guidelab.errors import GuidelabError

    with pytest.raises(GuidelabError, match="chanels"):
        build_unet({"chanels": 16}, in_channels=1, image_size=16, num_classes=10)


@pytest.mark.parametrize("path", sorted((CONFIGS / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_build_unet_from_yaml(path):
    cfg = OmegaConf.load(path)
    assert cfg.name == path.stem
    model = build_unet(cfg, in_channels=1, image_size=28, num_classes=10).eval()
    assert model.p_uncond == cfg.p_uncond
    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        assert model(x, torch.tensor([3]), torch.tensor([model.null_class])).shape == x.shape


@pytest.mark.parametrize("path", sorted((CONFIGS / "classifier").glob("*.yaml")), ids=lambda p: p.stem)
def test_build_classifier_from_yaml(path):
    cfg = OmegaConf.load(path)
    assert cfg.name == path.stem and isinstance(cfg.noisy, bool)
    model = build_classifier(cfg, in_channels=1, image_size=28, num_classes=10).eval()
    outputs = len(cfg.attributes) if cfg.get("arch") == "regressor" else 10  # a regressor: one per attribute
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28), torch.tensor([0, 0])).shape == (2, outputs)


def test_yaml_configs_present():
    assert {p.stem for p in (CONFIGS / "model").glob("*.yaml")} >= {"unet_cifar", "unet_small"}
    assert {p.stem for p in (CONFIGS / "classifier").glob("*.yaml")} >= {
        "noisy",
        "clean",
        "evaluator",
        "evaluator_vgg",
        "evaluator_mixer",
    }


@pytest.mark.parametrize("arch", ["resnet", "vgg"])
@pytest.mark.parametrize("in_channels,image_size", SIZES)
def test_evaluators_ignore_time_and_their_features_feed_their_head(arch, in_channels, image_size):
    """The evaluators have no time input (a different family from the guidance networks): any t gives the same
    logits; logits are classify(features); BatchNorm and no GroupNorm, no attention anywhere."""
    model = perturb(CLASSIFIERS[arch](in_channels, image_size, num_classes=7, channels=8)).eval()
    x = torch.randn(3, in_channels, image_size, image_size)
    with torch.no_grad():
        logits = model(x, torch.tensor([0, 0, 0]))
        assert logits.shape == (3, 7) and torch.equal(logits, model(x, torch.tensor([999, 5, 500])))
        assert torch.equal(logits, model.classify(model.features(x)))
    kinds = {type(m).__name__ for m in model.modules()}
    assert "BatchNorm2d" in kinds and not kinds & {"GroupNorm", "AttentionPool2d", "AttentionBlock", "TimestepEmbedder"}


@pytest.mark.parametrize("in_channels,image_size", SIZES)
def test_the_mixer_judge_shares_no_layer_kind_with_the_other_families(in_channels, image_size):
    """The third family (MLP-Mixer): no time input, logits = classify(features), and none of the layers of the
    UNet encoder (GroupNorm, attention, time embedding) or of the ResNet and VGG (convolution, BatchNorm, ReLU); its
    token-mixing MLP mixes patches: a change in one patch moves every patch's features."""
    model = perturb(CLASSIFIERS["mixer"](in_channels, image_size, num_classes=7, dim=16, depth=2)).eval()
    x = torch.randn(3, in_channels, image_size, image_size)
    with torch.no_grad():
        logits = model(x, torch.tensor([0, 0, 0]))
        assert logits.shape == (3, 7) and torch.equal(logits, model(x, torch.tensor([999, 5, 500])))
        assert torch.equal(logits, model.classify(model.features(x)))
        y = x.clone()
        y[:, :, :4, :4] += 1.0  # the first patch only
        tokens = lambda z: model.blocks(model.embed(rearrange(z, "b c (h p) (w q) -> b (h w) (p q c)", p=4, q=4)))
        assert (tokens(x) - tokens(y)).abs().amax(dim=2).gt(1e-6).all()  # every patch moved
    kinds = {type(m).__name__ for m in model.modules()}
    assert "LayerNorm" in kinds and not kinds & {"GroupNorm", "AttentionPool2d", "BatchNorm2d", "Conv2d", "ReLU"}
    with pytest.raises(GuidelabError, match="classifier.patch=5 does not divide the image size 16"):
        CLASSIFIERS["mixer"](1, 16, 10, patch=5)


def test_checkpoints_without_an_arch_are_the_unet_encoder_and_an_unknown_arch_is_named():
    cfg = {
        k: v
        for k, v in OmegaConf.to_container(OmegaConf.load(CONFIGS / "classifier" / "noisy16.yaml")).items()
        if k not in ("arch", "shift", "rotate", "pgd_eps", "pgd_steps")
    }
    assert isinstance(build_classifier(cfg, 1, 16, 10), NoisyClassifier)
    with pytest.raises(GuidelabError, match="unknown classifier.arch 'mlp'; valid: unet_encoder, resnet, vgg, mixer"):
        build_classifier({**cfg, "arch": "mlp"}, 1, 16, 10)


def test_random_affine_is_the_identity_at_zero_and_shifts_whole_pixels():
    x = torch.randn(4, 1, 16, 16)
    assert torch.equal(random_affine(x, 0, 0.0), x)
    torch.manual_seed(0)
    moved = random_affine(x, 3, 0.0)
    assert moved.shape == x.shape and not torch.allclose(moved, x)
    # one bright pixel on the background: each copy's centre of mass moves by at most `shift` pixels
    point = torch.full((1, 1, 16, 16), -1.0)
    point[0, 0, 8, 8] = 1.0
    torch.manual_seed(1)
    out = random_affine(point.repeat(64, 1, 1, 1), 2, 0.0)
    centre = torch.stack([(out[:, 0] + 1).sum((1, 2)), ((out[:, 0] + 1) * torch.arange(16.0).view(1, 16)).sum((1, 2))])
    col = centre[1] / centre[0]
    assert (col - 8).abs().max() <= 2 + 1e-4 and (col - 8).abs().max() > 0.5  # moved, by at most `shift` pixels
    assert torch.allclose(centre[0], torch.full_like(centre[0], 2.0), atol=1e-4)  # mass kept: border is background
