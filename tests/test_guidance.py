"""Guidance eps-functions: the CFG formula and its exact endpoints, one doubled batch, and the classifier term."""
import pytest
import torch
import torch.nn.functional as F

from guidelab.errors import GuidelabError
from guidelab.guidance import cfg_combine, classifier_score, make_eps_fn


class ToyUNet(torch.nn.Module):
    """eps depends on x, t and the label (null = 3); counts calls and batch sizes."""

    null_class = 3

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(4, 1)
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append(len(x))
        return x * 0.5 + self.emb(y).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1).float() * 1e-3


class ToyClassifier(torch.nn.Module):
    """Linear logits in x (plus a time term): log p(y|x) is smooth and its gradient is known."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x, t):
        return self.lin(x.flatten(1)) + t.float().view(-1, 1) * 1e-3


def _inputs(b=6):
    torch.manual_seed(0)
    return torch.randn(b, 1, 2, 2), torch.randint(0, 1000, (b,)), torch.randint(0, 3, (b,))


def test_cfg_combine_endpoints_are_exact_and_formula_holds():
    eps_u, eps_c = torch.randn(100), torch.randn(100)
    assert torch.equal(cfg_combine(eps_u, eps_c, 0.0), eps_u)
    assert torch.equal(cfg_combine(eps_u, eps_c, 1.0), eps_c)
    assert torch.allclose(cfg_combine(eps_u, eps_c, 3.0), eps_u + 3.0 * (eps_c - eps_u), atol=1e-6)


def test_cfg_eps_fn_equals_unconditional_at_0_conditional_at_1():
    unet, (x, t, y) = ToyUNet(), _inputs()
    null = torch.full_like(y, 3)
    assert torch.equal(make_eps_fn("cfg", unet, y, 0.0)(x, t).eps, unet(x, t, null))
    assert torch.equal(make_eps_fn("cfg", unet, y, 1.0)(x, t).eps, unet(x, t, y))


def test_cfg_runs_cond_and_uncond_as_one_doubled_batch():
    unet, (x, t, y) = ToyUNet(), _inputs()
    out = make_eps_fn("cfg", unet, y, 2.5)(x, t)
    assert unet.calls == [2 * len(x)]
    eps_c, eps_u = unet(x, t, y), unet(x, t, torch.full_like(y, 3))
    assert torch.allclose(out.eps, eps_u + 2.5 * (eps_c - eps_u), atol=1e-6)
    assert out.score is None


def test_none_mode_bases():
    unet, (x, t, y) = ToyUNet(), _inputs()
    assert torch.equal(make_eps_fn("none", unet, y, base="cond")(x, t).eps, unet(x, t, y))
    assert torch.equal(make_eps_fn("none", unet, y, base="uncond")(x, t).eps, unet(x, t, torch.full_like(y, 3)))


def test_classifier_score_is_the_gradient_of_log_softmax():
    clf, (x, t, y) = ToyClassifier(), _inputs()
    grad = classifier_score(clf, x, t, y)
    # closed form for linear logits W x + b: d/dx log softmax_y = W_y - sum_k p_k W_k
    p = F.softmax(clf(x, t), -1)
    ref = clf.lin.weight[y] - p @ clf.lin.weight
    assert torch.allclose(grad.flatten(1), ref, atol=1e-5)


def test_cg_guides_the_unconditional_prediction_and_a_small_step_raises_log_p():
    unet, clf, (x, t, y) = ToyUNet(), ToyClassifier(), _inputs()
    out = make_eps_fn("cg", unet, y, 2.0, classifier=clf)(x, t)
    assert torch.equal(out.eps, unet(x, t, torch.full_like(y, 3)))  # base=uncond by default
    assert not any(p.requires_grad for p in clf.parameters())  # frozen classifier
    assert not x.requires_grad and out.score.grad_fn is None  # no graph kept
    logp = lambda z: F.log_softmax(clf(z, t), -1)[torch.arange(len(y)), y]
    assert (logp(x + 1e-2 * out.score) > logp(x)).all()
    cond = make_eps_fn("cg", unet, y, 2.0, classifier=clf, base="cond")(x, t)
    assert torch.equal(cond.eps, unet(x, t, y))
    assert torch.allclose(cond.score, 2.0 * classifier_score(clf, x, t, y))


def test_cg_scale_zero_has_no_classifier_term_and_cfg_cg_uses_both_scales():
    unet, clf, (x, t, y) = ToyUNet(), ToyClassifier(), _inputs()
    assert make_eps_fn("cg", unet, y, 0.0, classifier=clf)(x, t).score is None
    out = make_eps_fn("cfg_cg", unet, y, 3.0, classifier=clf, classifier_scale=0.5)(x, t)
    assert torch.allclose(out.eps, make_eps_fn("cfg", unet, y, 3.0)(x, t).eps)
    assert torch.allclose(out.score, 0.5 * classifier_score(clf, x, t, y))


@pytest.mark.parametrize("mode,kwargs,match", [
    ("cg", {}, "classifier_ckpt"),
    ("cfg_cg", {}, "classifier_ckpt"),
    ("foo", {}, "none, cfg, cg, cfg_cg"),
    ("cg", {"base": "both"}, "guidance.base"),
])
def test_bad_guidance_arguments(mode, kwargs, match):
    unet, (x, t, y) = ToyUNet(), _inputs()
    with pytest.raises(GuidelabError, match=match):
        make_eps_fn(mode, unet, y, 1.0, **kwargs)
