"""Train a time-conditioned noisy classifier for classifier guidance, a clean classifier (classifier=clean, for
guidance=cg_x0), or one of the evaluators that judge samples (classifier=evaluator: a ResNet; evaluator_vgg: the
second opinion; evaluator_adv: the ResNet trained on PGD examples too; evaluator_mixer: an MLP-Mixer, the judge
of a third family for runs that a ResNet or VGG guides), or the noisy attribute regressor of CG on attributes
(classifier=regressor: Morpho-MNIST measurements of x_t, digits only).

    python train_classifier.py dataset=cifar10
    python train_classifier.py dataset=cifar10 classifier=evaluator
    python train_classifier.py dataset=cifar10 classifier=evaluator_vgg seed=1
    python train_classifier.py dataset=mnist classifier=regressor classifier.attributes=[thickness,slant]

The loop (optimizer, EMA, checkpoints, resume, DDP, logging) is guidelab.train's; this script says what is trained.
"""

from pathlib import Path

import torch
import torch.nn.functional as F

from guidelab.attributes import check_defined, statistics
from guidelab.augment import random_affine
from guidelab.cli import main
from guidelab.conditions import ATTRIBUTES, columns
from guidelab.data import ImageData, dataset_shape
from guidelab.errors import GuidelabError
from guidelab.models import build_classifier, check_buildable
from guidelab.models.regressor import T_BUCKETS
from guidelab.registry import OneOf, Range
from guidelab.schedules import process, schedule_signature
from guidelab.train import Task, load_data, train, validate


def network(cfg, channels: int, num_classes: int):
    """The classifier the `classifier` config describes (its family: classifier.arch, guidelab.models.CLASSIFIERS)."""
    return build_classifier(cfg.classifier, channels, cfg.dataset.image_size, num_classes)


def pgd(
    net, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, eps: float, steps: int, norm: str = "linf", clamp=True
) -> torch.Tensor:
    """Projected gradient ascent on the loss (Madry et al. 2018, Sec. 2): a random start in the eps-ball, then `steps`
    steps of 2.5 eps / steps, each projected onto the eps-ball (and, with `clamp`, the data range [-1, 1]: clean
    images; a noisy x_t has no such range). norm=linf: signed-gradient steps, an L_inf ball; norm=l2: steps along the
    gradient normalised per sample, an L_2 ball (the threat model of the robust-classifier guidance of Kawar et al.
    2023, who train the time-conditioned classifier adversarially on x_t; their radius and step rule could not be
    confirmed offline)."""
    size = 2.5 * eps / steps

    def per_sample_norm(v):
        return v.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, *[1] * (v.dim() - 1))

    if norm == "linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        delta = torch.randn_like(x)
        delta = delta / per_sample_norm(delta) * eps * torch.rand(len(x), *[1] * (x.dim() - 1), device=x.device)
    x_adv = (x + delta).clamp(-1, 1) if clamp else x + delta
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(net(x_adv, t).float(), y), x_adv)
        if norm == "linf":
            x_adv = torch.minimum(torch.maximum(x_adv.detach() + size * grad.sign(), x - eps), x + eps)
        else:
            delta = x_adv.detach() + size * grad / per_sample_norm(grad) - x
            x_adv = x + delta * (eps / per_sample_norm(delta)).clamp(max=1)
        x_adv = x_adv.clamp(-1, 1) if clamp else x_adv
    return x_adv.detach()


def entropy_constraint(logits: torch.Tensor) -> torch.Tensor:
    """The cross-entropy of p_phi(. | x_t) to the uniform distribution, -1/C sum_c log p_phi(c | x_t), batch mean:
    the entropy constraint of Zheng et al. 2022's entropy-constraint training (ECCV, Sec. 3.3), added with weight eta
    to the classification loss so that the classifier stays unsure where x_t carries little of its class and its
    gradient does not vanish early in sampling (the paper's exact form of the term could not be confirmed offline:
    this is KL(U || p) up to the constant log C)."""
    return -F.log_softmax(logits.float(), dim=-1).mean(-1).mean()


def task(cfg, data: ImageData, device: torch.device) -> Task:
    """Noisy classifier p_phi(y | x_t, t) on q_sample(x_0, t) with t uniform (Dhariwal & Nichol 2021, Sec. 4.1), or,
    with classifier.noisy=false, a clean-image classifier (t = 0 always). Each image is first randomly shifted and
    rotated (classifier.shift, classifier.rotate); with classifier.pgd_eps > 0 the loss is the mean over the batch and
    its PGD examples (Goodfellow et al. 2015, Sec. 5, weight 1/2; a noisy classifier is attacked on x_t, Kawar et al.
    2023); classifier.entropy_weight > 0 adds the entropy constraint (Zheng et al. 2022). Evaluated on the held-out
    split: accuracy at the middle of each quarter of the noise range, or (clean) on clean images. The regressor
    (classifier.arch=regressor) is `regressor_task`'s."""
    if cfg.classifier.arch == "regressor":
        return regressor_task(cfg, data, device)
    diffusion = process(cfg.diffusion).to(device)
    c = cfg.classifier
    noisy, T = bool(c.noisy), diffusion.num_steps
    test = load_data(cfg, "test")

    def loss(net, x0, y):
        x0 = random_affine(x0, c.shift, c.rotate)
        t = torch.randint(0, T, (len(y),), device=x0.device) if noisy else torch.zeros_like(y)
        x = diffusion.q_sample(x0, t, torch.randn_like(x0)) if noisy else x0
        if c.pgd_eps > 0:
            x_adv = pgd(net, x, y, t, c.pgd_eps, c.pgd_steps, c.pgd_norm, clamp=not noisy)
            x, y, t = torch.cat([x, x_adv]), torch.cat([y, y]), torch.cat([t, t])
        logits = net(x, t)
        correct = (logits.argmax(-1) == y).float()
        stats = {"acc": correct.mean()}
        if noisy:  # accuracy per quarter of the time range: 0 = least noise
            q = (t * 4) // T
            for i in range(4):  # no branching on tensor values: no host sync in the step (0/0 = nan if empty)
                stats[f"acc_q{i}"] = (correct * (q == i)).sum() / (q == i).sum()
        loss = F.cross_entropy(logits.float(), y)
        if c.entropy_weight > 0:
            stats["entropy_constraint"] = entropy_constraint(logits)
            loss = loss + c.entropy_weight * stats["entropy_constraint"]
        return loss, stats

    @torch.no_grad()
    def evaluate(ema_model, step: int, run_dir: Path) -> dict:
        gen = torch.Generator(device="cpu").manual_seed(1234)  # the same noise at every evaluation
        metrics = {}
        for t_val in [int((i + 0.5) * T / 4) for i in range(4)] if noisy else [0]:
            correct = 0
            for start in range(0, len(test.labels), 500):
                x0, y = test.images[start : start + 500].to(device), test.labels[start : start + 500].to(device)
                t = torch.full((len(x0),), t_val, dtype=torch.long, device=device)
                x = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=gen).to(device)) if noisy else x0
                correct += (ema_model(x, t).argmax(-1) == y).sum().item()
            metrics[f"test_acc_t{t_val}" if noisy else "test_acc"] = correct / len(test.labels)
        return metrics

    return Task(network(cfg, data.info["channels"], data.num_classes), loss, evaluate)


def regressor_task(cfg, data: ImageData, device: torch.device) -> Task:
    """The noisy attribute regressor r_phi(x_t, t) (guidelab.models.NoisyRegressor): MSE between its prediction and
    the measured attributes of x0, both normalised by the training set's mean and SD (stored in the network), on
    x_t = q_sample(x0, t, eps) with t and eps drawn as the noisy classifier's loss draws them (`Diffusion.noised`: t
    uniform on the diffusion model's schedule, then eps); entries whose target is NaN (an empty image measures
    nothing) are left out. Evaluated on the held-out split (`held_out_errors`): the RMSE per attribute in each of the
    K buckets of t, in raw units, written into the EMA network's (and the online network's) `sigma_t`, so that every
    checkpoint after an evaluation carries its predictive uncertainty; reported as rmse_<name> (all t),
    rmse_<name>_t<k> (bucket k; t0 the least noise) and r2_<name>_t0 (R^2 at the least noise). With
    classifier.noisy=false the clean regressor r_phi(x0) of guidance on x0_hat (cg_x0): trained and evaluated on clean
    images at t = 0, its one held-out RMSE written into every bucket."""
    noisy = bool(cfg.classifier.noisy)
    diffusion = process(cfg.diffusion).to(device)
    net = network(cfg, data.info["channels"], data.num_classes)
    names = net.attributes
    net.set_statistics(statistics(data.attributes, names), diffusion.num_steps)
    test = load_data(cfg, "test")
    test_targets = test.attributes[:, [ATTRIBUTES.index(n) for n in names]]

    def loss(model, x0, y):
        target = columns(y, names)  # raw units, NaN = not measured
        t, _, x = diffusion.noised(x0) if noisy else (torch.zeros(len(x0), dtype=torch.long, device=x0.device), 0, x0)
        mean, std = net.attr_stats  # through `model`'s forward (DDP, compile), normalised here
        pred = (model(x, t).float() - mean) / std
        measured = ~torch.isnan(target)
        err = torch.where(measured, pred - (target - mean) / std, 0.0).square()
        stats = {f"nmse_{n}": err[:, i].sum() / measured[:, i].sum() for i, n in enumerate(names)}  # 0/0 = nan
        return err.sum() / measured.sum().clamp(min=1), stats

    @torch.no_grad()
    def evaluate(ema_model, step: int, run_dir: Path) -> dict:
        sse, count = held_out_errors(ema_model, diffusion, test.images, test_targets, device, noisy)
        rmse = (sse / count).sqrt()
        for module in (ema_model, net):  # EMA updates copy the online network's buffers into the EMA network's
            module.sigma_t.copy_(rmse.clamp(min=1e-6).to(module.sigma_t))
        metrics = {}
        for i, n in enumerate(names):
            v = test_targets[:, i].double()
            v = v[~torch.isnan(v)]  # every measured image is in every bucket once: one total sum of squares
            metrics[f"rmse_{n}"] = (sse[i].sum() / count[i].sum()).sqrt().item()
            metrics.update({f"rmse_{n}_t{k}": rmse[i, k].item() for k in range(T_BUCKETS) if noisy})
            metrics[f"r2_{n}_t0"] = (1 - sse[i, 0] / (v - v.mean()).square().sum()).item()
        return metrics

    return Task(net, loss, evaluate)


def held_out_errors(model, diffusion, images, targets, device, noisy: bool = True, batch: int = 500) -> tuple:
    """(sums of squared errors, counts), each (A, K) float64: every held-out image noised once in each of the K
    equal buckets of t (t uniform within the bucket, eps standard normal, both from a fixed seed: the same draws at
    every evaluation), the prediction r_phi(x_t, t) against its target in raw units, NaN targets left out. noisy=False
    (a clean regressor): the clean images at t = 0, once, the same sums in every bucket."""
    gen = torch.Generator(device="cpu").manual_seed(1234)
    T, K = diffusion.num_steps, T_BUCKETS
    sse = torch.zeros(targets.shape[1], K, dtype=torch.float64)
    count = torch.zeros_like(sse)
    for k in range(K if noisy else 1):
        lo, hi = -(-k * T // K), -(-(k + 1) * T // K)  # the integers t with floor(t K / T) = k
        for start in range(0, len(images), batch):
            x0, v = images[start : start + batch], targets[start : start + batch].double()
            if noisy:
                t = torch.randint(lo, hi, (len(x0),), generator=gen)
                x = diffusion.q_sample(x0.to(device), t.to(device), torch.randn(x0.shape, generator=gen).to(device))
            else:
                t, x = torch.zeros(len(x0), dtype=torch.long), x0.to(device)
            err = (model(x, t.to(device)).double().cpu() - v).square()
            measured = ~torch.isnan(v)
            sse[:, k] += torch.where(measured, err, 0.0).sum(0)
            count[:, k] += measured.sum(0)
    if not noisy:
        sse, count = sse[:, :1].expand(-1, K).clone(), count[:, :1].expand(-1, K).clone()
    return sse, count


def check_regressor(cfg) -> None:
    """classifier=regressor: measured attributes exist on the data set (digits), its targets are the images' own (no
    shift or rotation, which change what is measured), it is trained by MSE (no PGD, no entropy term), and the
    schedule has a timestep in every bucket of t. Noisy (x_t at every t, for cg) or clean (classifier.noisy=false, on
    clean images, for cg_x0 on x0_hat). Its attribute names are checked by the network."""
    c = cfg.classifier
    check_defined(cfg.dataset, f"classifier.attributes=[{','.join(map(str, c.attributes))}]")
    for key in ("shift", "rotate", "pgd_eps", "entropy_weight"):
        if c[key]:
            raise GuidelabError(
                f"classifier.{key}={c[key]} does not apply to the regressor (its targets are the measurements of the "
                f"images as they are, its loss is MSE); set classifier.{key}=0"
            )
    d = cfg.diffusion
    T = int(schedule_signature(d)["num_steps"] if d.schedule == "pretrained" else d.num_steps)  # read, not built
    if T < T_BUCKETS:
        raise GuidelabError(
            f"the regressor's held-out error is kept in {T_BUCKETS} buckets of t: its schedule needs at least "
            f"{T_BUCKETS} steps, diffusion has {T}"
        )


def check(cfg) -> None:
    """The training options, and the classifier's own arguments (built on the meta device: no memory, no time)."""
    validate(cfg)
    c = cfg.classifier
    Range(0, cfg.dataset.image_size // 2, "pixels of random shift; 0 = none").check("classifier.shift", c.shift, c)
    Range(0, 180, "degrees of random rotation; 0 = none").check("classifier.rotate", c.rotate, c)
    Range(0, 2, "the PGD radius (pgd_norm) in the [-1, 1] data units; 0 = no adversarial training").check(
        "classifier.pgd_eps", c.pgd_eps, c
    )
    Range(1 if c.pgd_eps > 0 else 0, 100, "PGD steps (at least 1 with pgd_eps > 0)").check(
        "classifier.pgd_steps", c.pgd_steps, c
    )
    OneOf(("linf", "l2"), "the PGD threat model").check("classifier.pgd_norm", c.pgd_norm, c)
    Range(0, 10, "the entropy constraint's weight eta; 0 = plain cross-entropy").check(
        "classifier.entropy_weight", c.entropy_weight, c
    )
    if c.arch == "regressor":
        check_regressor(cfg)
    channels, class_names = dataset_shape(cfg.dataset)  # dataset=folder: its root and class folders, read now
    check_buildable("classifier", cfg.classifier, lambda: network(cfg, channels, len(class_names)))


if __name__ == "__main__":
    main(
        Path(__file__).parent / "configs",
        "train_classifier",
        lambda cfg, run_dir: train(cfg, "classifier", run_dir, task),
        protect="checkpoints",
        check=check,
    )
