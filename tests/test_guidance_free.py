"""Guidance-free training (train.guidance_free): model guidance (Tang et al. 2025) and GFT (Chen et al. 2025). The
defaults train exactly as before; each loss reduces to L_simple at its neutral setting, bit for bit; the stop-gradient
terms pass no gradient; the beta input is invisible until trained; older checkpoints load; bad keys are one line."""

import hashlib

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONFIGS, _script_module, check_command_line
from guidelab import networks
from guidelab.conditions import drop_labels
from guidelab.diffusion import Diffusion, linear_betas
from guidelab.errors import GuidelabError
from guidelab.files import atomic_torch
from guidelab.losses import gft_loss, gft_mix, mg_loss, mg_target, trained_guidance
from guidelab.models import build_unet
from guidelab.results import trained_label

TINY = OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / "unet_tiny.yaml"))  # as an older run recorded it
script = _script_module("train_diffusion.py")


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train_diffusion", overrides=["experiment=smoke", *overrides])


def _unet(seed=0, **changes):
    torch.manual_seed(seed)
    return build_unet({**TINY, **changes}, 1, 16, 10)


def _perturb(model, seed=1, scale=0.05):
    """Noise on every parameter but the beta path's (zero-initialised branches, conv_out among them, would hide the
    conditioning); the same draws for the same parameter names whatever else the network holds."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if not name.startswith("beta_embed"):
                p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def _batch(n=12, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _train(model, loss, steps=2, seed=5):
    """A few AdamW steps of `loss(net, x0, y) -> (loss, stats)` on fixed batches, from one RNG state."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(seed)
    model.train()
    for step in range(steps):
        x0, y = _batch(seed=step)
        opt.zero_grad(set_to_none=True)
        loss(model, x0, y)[0].backward()
        opt.step()
    return model.state_dict()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


DIFFUSION = Diffusion(linear_betas(1000))


# ---------------------------------------------------------------- the defaults are the plain loss
def test_default_training_is_l_simple_bit_for_bit():
    """The composed default config (train.guidance_free=none) trains with Diffusion.eps_loss itself: the same weights
    after a few steps as the loss that predates the option, called directly."""
    cfg = _compose("model.dropout=0.1", "model.p_uncond=0.3")
    assert cfg.train.guidance_free == "none" and cfg.model.beta_embed is False
    model = _perturb(_unet(dropout=0.1, p_uncond=0.3))
    via_script = _train(model, script.training_loss(cfg, DIFFUSION, model))
    direct = _train(_perturb(_unet(dropout=0.1, p_uncond=0.3)), lambda net, x0, y: (DIFFUSION.eps_loss(net, x0, y), {}))
    assert _same(via_script, direct)


def test_mg_at_w_zero_trains_exactly_as_none_and_w_above_zero_does_not():
    """The MG path itself (its own label dropout, the eval-mode stop-gradient passes, the target) at w = 0 draws and
    computes what eps_loss does: identical weights, with ResBlock dropout and label dropout on."""
    changes = dict(dropout=0.1, p_uncond=0.3)
    none = _train(_perturb(_unet(**changes)), lambda net, x0, y: (DIFFUSION.eps_loss(net, x0, y), {}))
    for w, same in ((0.0, True), (0.5, False)):
        cfg = _compose("train.guidance_free=mg", f"train.mg_w={w}", "model.dropout=0.1", "model.p_uncond=0.3")
        model = _perturb(_unet(**changes))  # perturbed: conditioning matters from the first step
        assert _same(_train(model, script.training_loss(cfg, DIFFUSION, model)), none) is same, w
        assert model.p_uncond == 0.3 and model.training  # the loss restores the network's own dropout and mode


def test_mg_target_at_w_zero_is_eps_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    noise, cond, uncond = (torch.randn(4, 1, 8, 8, generator=gen) for _ in range(3))
    assert torch.equal(mg_target(noise, cond, uncond, 0.0), noise)
    assert torch.allclose(mg_target(noise, cond, uncond, 0.5), noise + 0.5 * (cond - uncond))


def test_drop_labels_draws_as_the_network_does():
    model = _unet(p_uncond=0.5).train()
    y = torch.arange(10).repeat(4)
    torch.manual_seed(3)
    expected = model.drop_labels(y)
    torch.manual_seed(3)
    assert torch.equal(drop_labels(y, 0.5, model.null_class), expected)
    assert (expected == 10).any() and (expected != 10).any()


# ---------------------------------------------------------------- stop-gradient
def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _noised(seed, x0):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, DIFFUSION.num_steps, (x0.shape[0],), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    return t, noise, DIFFUSION.q_sample(x0, t, noise)


def test_mg_gradient_skips_the_stop_gradient_term():
    """The MG loss's parameter gradients are those of the same loss with its target computed beforehand as a
    constant; with the target left in the graph they differ (so the comparison can fail)."""
    model = _perturb(_unet(p_uncond=0.0)).train()  # the loss drops labels itself
    x0, y = _batch()
    torch.manual_seed(7)
    mg = _grads(model, mg_loss(DIFFUSION, model, x0, y, 0.5, 0.3, 10, generator=torch.Generator().manual_seed(4)))

    def by_hand(detach: bool):
        t, noise, x_t = _noised(4, x0)
        torch.manual_seed(7)
        labels = drop_labels(y, 0.3, 10)
        assert (labels == 10).any()
        with torch.set_grad_enabled(not detach):
            both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]))
        cond, uncond = both.chunk(2)
        target = torch.where((labels != 10).view(-1, 1, 1, 1), mg_target(noise, cond, uncond, 0.5), noise)
        return _grads(model, torch.nn.functional.mse_loss(model(x_t, t, labels), target))

    assert _same(mg, by_hand(detach=True))
    assert not _same(mg, by_hand(detach=False))


def test_gft_gradient_skips_the_unconditional_term():
    model = _perturb(_unet(p_uncond=0.0, beta_embed=True)).train()
    torch.nn.init.normal_(model.beta_embed.mlp[-1].weight, std=0.05)  # a trained beta path
    x0, y = _batch()
    beta = torch.linspace(0.1, 1.0, len(y))
    torch.manual_seed(7)
    gft = _grads(
        model, gft_loss(DIFFUSION, model, x0, y, 0.3, 10, beta=beta, generator=torch.Generator().manual_seed(4))
    )

    def by_hand(detach: bool):
        t, noise, x_t = _noised(4, x0)
        torch.manual_seed(7)
        labels = drop_labels(y, 0.3, 10)
        b = torch.where(labels == 10, torch.ones_like(beta), beta)
        with torch.set_grad_enabled(not detach):
            uncond = model(x_t, t, torch.full_like(y, 10), beta=torch.ones_like(b))
        mixed = gft_mix(model(x_t, t, labels, beta=b), uncond, b.view(-1, 1, 1, 1))
        return _grads(model, torch.nn.functional.mse_loss(mixed, noise))

    assert _same(gft, by_hand(detach=True))
    assert not _same(gft, by_hand(detach=False))


# ---------------------------------------------------------------- GFT's limits
def test_gft_at_beta_one_is_the_conditional_eps_loss_bit_for_bit():
    """beta = 1 for every row: the prediction is eps(x_t, y, 1) itself, so loss and gradients are eps_loss's (which
    lets the network drop labels itself); dropout on, so the random streams must line up too."""
    model = _perturb(_unet(dropout=0.1, p_uncond=0.3, beta_embed=True), seed=3).train()
    torch.nn.init.normal_(model.beta_embed.mlp[-1].weight, std=0.05)
    x0, y = _batch()
    torch.manual_seed(11)
    plain = DIFFUSION.eps_loss(model, x0, y, generator=torch.Generator().manual_seed(4))
    plain_grads = _grads(model, plain)
    torch.manual_seed(11)
    with script.labels_dropped_by_the_loss(model) as p_uncond:
        frozen = script.frozen_predictions(model)
        gft = gft_loss(
            DIFFUSION,
            model,
            x0,
            y,
            p_uncond,
            10,
            frozen,
            beta=torch.ones(len(y)),
            generator=torch.Generator().manual_seed(4),
        )
    assert torch.equal(gft, plain)
    assert _same(_grads(model, gft), plain_grads)


def test_gft_trains_a_dropped_row_on_the_plain_eps_target_whatever_its_beta():
    """Every row dropped (p_uncond = 1): the loss is || eps(x_t, null, 1) - eps ||^2 at full weight, although the
    drawn betas are below 1 (the authors' code would scale these rows' gradients by beta)."""
    model = _perturb(_unet(p_uncond=0.0, beta_embed=True)).train()
    torch.nn.init.normal_(model.beta_embed.mlp[-1].weight, std=0.05)
    x0, y = _batch()
    gft = gft_loss(
        DIFFUSION, model, x0, y, 1.0, 10, beta=torch.full((len(y),), 0.25), generator=torch.Generator().manual_seed(4)
    )
    t, noise, x_t = _noised(4, x0)
    plain = torch.nn.functional.mse_loss(model(x_t, t, torch.full_like(y, 10), beta=1.0), noise)
    assert torch.equal(gft, plain)
    assert _same(_grads(model, gft), _grads(model, plain))


# ---------------------------------------------------------------- the beta input
def test_zero_initialised_beta_embedding_leaves_the_network_bit_identical():
    """Built last and zeroed at its output: the other weights draw the same initial values, and every beta gives the
    output of the network without the input; once its last layer is nonzero, beta matters (the check can fail)."""
    plain, with_beta = _perturb(_unet()).eval(), _perturb(_unet(beta_embed=True)).eval()
    shared = plain.state_dict()
    assert all(torch.equal(with_beta.state_dict()[k], v) for k, v in shared.items())
    x, y = _batch(6)
    t = torch.tensor([0, 10, 200, 500, 900, 999])
    with torch.no_grad():
        ref = plain(x, t, y)
        for beta in (None, 1.0, 0.25, torch.linspace(0.1, 1.0, 6)):
            assert torch.equal(with_beta(x, t, y, beta=beta), ref), beta
        torch.nn.init.normal_(with_beta.beta_embed.mlp[-1].weight, std=0.05)
        assert torch.equal(with_beta(x, t, y), with_beta(x, t, y, beta=1.0))  # None is beta = 1
        assert not torch.equal(with_beta(x, t, y, beta=0.25), with_beta(x, t, y, beta=1.0))
    with pytest.raises(GuidelabError, match="no beta input"):
        plain(x, t, y, beta=0.5)


PRE_BETA_LAYOUT = ("192f3625a629acda", 129)  # unet_tiny (1 channel, 16x16, 10 classes) as guidelab built it before


def test_an_older_checkpoint_loads_strictly(tmp_path):
    """A checkpoint whose config predates the keys (no model.beta_embed, no train.guidance_free) rebuilds, through
    networks.load, a network of the old parameter layout and takes its weights strictly; its one pass is the
    conditional model. A beta_embed network would not take them."""
    old = _perturb(_unet())
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in old.state_dict().items())
    assert (hashlib.sha256(lines.encode()).hexdigest()[:16], len(old.state_dict())) == PRE_BETA_LAYOUT
    config = {
        "model": TINY,
        "train": {"steps": 1},
        "dataset": {"name": "procedural", "image_size": 16},
        "data_info": {"num_classes": 10, "channels": 1},
    }
    assert "beta_embed" not in TINY
    atomic_torch({"kind": "diffusion", "ema": old.state_dict(), "config": config}, tmp_path / "old.pt")
    net, ckpt = networks.load(tmp_path / "old.pt", "diffusion", torch.device("cpu"))
    assert net.beta_embed is None and _same(net.state_dict(), old.state_dict())
    assert trained_guidance(ckpt["config"]) == ("none", 1.0)
    with pytest.raises(RuntimeError, match="Missing key"):
        _unet(beta_embed=True).load_state_dict(old.state_dict())


# ---------------------------------------------------------------- what sampling reads
def test_trained_guidance():
    mg = {"train": {"guidance_free": "mg", "mg_w": 0.5}}
    gft = {"train": {"guidance_free": "gft", "mg_w": 0.5}, "model": {"beta_embed": True}}
    assert trained_guidance(mg) == ("mg", 2.0) and trained_guidance(gft) == ("gft", None)
    assert (trained_label(mg), trained_label(gft), trained_label({"train": {}})) == ("mg w=0.5", "gft", None)
    assert trained_label({"train": {"guidance_free": "none", "mg_w": 0.5}}) is None


def test_the_preview_of_a_gft_run_is_its_one_pass_at_beta_one_over_eval_scale():
    calls = []
    cfg = _compose("train.guidance_free=gft", "model.beta_embed=true", "train.eval_scale=4")
    eps_fn = script.preview_eps_fn(cfg, lambda x, t, y, **kw: calls.append(kw) or x, torch.zeros(2, dtype=torch.long))
    eps_fn(torch.zeros(2, 1, 16, 16), torch.zeros(2, dtype=torch.long))
    assert calls == [{"beta": 0.25}]


# ---------------------------------------------------------------- the keys and their checks
@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (["train.guidance_free=cfg"], "train.guidance_free must be one of none, mg, gft, got 'cfg'"),
        (["train.mg_w=-0.5"], "train.mg_w must be >= 0, got -0.5"),
        (["train.guidance_free=mg", "train.mg_w=1"], "train.mg_w must be below 1, got 1"),
        (["train.guidance_free=gft"], "needs guidelab's UNet with model.beta_embed=true"),
        (["train.guidance_free=gft", "model=diffusers_tiny"], "(model=diffusers_tiny is a diffusers layout)"),
        (["train.guidance_free=mg", "model.p_uncond=0"], "with model.p_uncond > 0"),
        (
            ["train.guidance_free=gft", "model.beta_embed=true", "train.eval_scale=0.5"],
            "train.eval_scale must be >= 1 for the GFT preview",
        ),
    ],
)
def test_bad_keys_are_one_line_errors(overrides, fragment):
    assert fragment in check_command_line("train_diffusion.py", "experiment=smoke", *overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.guidance_free=mg", "train.mg_w=0"],
        ["train.guidance_free=mg", "train.mg_w=0.75"],
        ["train.guidance_free=gft", "model.beta_embed=true"],
        ["model.beta_embed=true"],  # the input alone: trained at beta = 1
    ],
)
def test_good_keys_pass(overrides):
    assert check_command_line("train_diffusion.py", "experiment=smoke", *overrides) == ""


# ---------------------------------------------------------------- learning: the fixed points each loss aims at
class Linear1d(torch.nn.Module):
    """eps(x_t, t, y[, beta]) = (a + c / beta) x_t + (b + d / beta), one coefficient set per (t, y): the conditional
    means of Gaussian 1-D data are linear in x_t, and GFT's optimum eps_u + (eps_c - eps_u) / beta is in the class."""

    def __init__(self, steps: int, classes: int):
        super().__init__()
        self.coef = torch.nn.Parameter(torch.zeros(4, steps, classes + 1))

    def forward(self, x, t, y, beta=None):
        a, b, c, d = self.coef[:, t, y].view(4, -1, 1, 1, 1)
        inv = 1 / torch.as_tensor(1.0 if beta is None else beta).view(-1, 1, 1, 1)
        return (a + c * inv) * x + (b + d * inv)


MEANS = torch.tensor([-1.0, 1.5])  # x0 | y ~ N(mean_y, 0.5^2), y uniform over two classes


def _fit(loss, steps=400):
    """Adam on fresh batches with the learning rate decayed linearly to 0 (the last steps average out the noise)."""
    diffusion = Diffusion(torch.tensor([0.1, 0.3, 0.5, 0.7], dtype=torch.float64))
    model = Linear1d(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the label dropout
    for _ in range(steps):
        y = torch.randint(0, 2, (2048,), generator=gen)
        x0 = (MEANS[y] + 0.5 * torch.randn(len(y), generator=gen)).view(-1, 1, 1, 1)
        opt.zero_grad()
        loss(diffusion, model, x0, y, gen).backward()
        opt.step()
        sched.step()
    return diffusion, model


def _conditional_mean(diffusion, x, t, y):
    """E[eps | x_t, y] = sqrt(1 - abar) (x_t - sqrt(abar) mu_y) / (abar sigma0^2 + 1 - abar)."""
    abar = diffusion.abar[t].float()
    return (1 - abar).sqrt() * (x - abar.sqrt() * MEANS[y]) / (abar * 0.25 + 1 - abar)


def test_mg_learns_cfg_at_one_over_one_minus_w_and_gft_cfg_at_one_over_beta():
    """On 1-D Gaussian classes with a model class that holds the answers, MG at w = 0.5 settles at CFG with s = 2
    around the model's own unconditional prediction, and GFT's sampling model at beta = 0.5 at CFG with s = 2."""
    x = torch.linspace(-2, 2, 9)
    t = torch.full_like(x, 2, dtype=torch.long)
    mg_diffusion, mg = _fit(lambda d, m, x0, y, g: mg_loss(d, m, x0, y, 0.5, 0.2, 2, generator=g))
    gft_diffusion, gft = _fit(lambda d, m, x0, y, g: gft_loss(d, m, x0, y, 0.2, 2, generator=g))
    with torch.no_grad():
        for y in (0, 1):
            labels, null = torch.full_like(t, y), torch.full_like(t, 2)
            shape = (-1, 1, 1, 1)
            cond = _conditional_mean(mg_diffusion, x, t, labels)
            uncond = mg(x.view(shape), t, null).flatten()
            assert torch.allclose(mg(x.view(shape), t, labels).flatten(), uncond + 2 * (cond - uncond), atol=0.15)
            uncond = gft(x.view(shape), t, null).flatten()
            sampled = gft(x.view(shape), t, labels, beta=torch.full_like(x, 0.5)).flatten()
            assert torch.allclose(sampled, uncond + 2 * (cond - uncond), atol=0.15)
            assert not torch.allclose(cond, uncond, atol=0.3)  # the classes differ: guidance is visible
