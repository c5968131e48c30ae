"""A tiny UNet conditioned on thickness, trained on the real digits through train_diffusion.py, follows a thickness
request and steers away from a NOT, as measured on its samples by guidelab.morpho (fixed seeds, margins)."""

import json

import numpy as np
import pytest
import torch

from conftest import run_script
from guidelab import morpho

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def attribute_unet(tmp_path_factory):
    """unet_tiny with model.attributes=[thickness], 300 steps on mnist5k at 16x16 (experiment=attributes)."""
    root = tmp_path_factory.mktemp("attribute_unet")
    proc = run_script(
        "train_diffusion.py",
        "experiment=attributes",
        "model=unet_tiny",
        "model.attributes=[thickness]",
        "train.steps=300",
        "train.ckpt_every=0",
        "train.progress=false",
        f"hydra.run.dir={root / 'unet'}",
        cwd=root,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root, root / "unet" / "checkpoints" / "last.pt"


def _sample(root, ckpt, name, *overrides):
    proc = run_script(
        "sample.py",
        f"ckpt={ckpt}",
        "guidance=cfg",
        "scale=3",
        "num_samples=80",
        "batch_size=80",
        "sampler.steps=20",
        "progress=false",
        f"hydra.run.dir={root / name}",
        *overrides,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    images = np.load(root / name / "samples.npz")["images"][..., 0]
    return morpho.measure(images)["thickness"], json.loads((root / name / "metrics.json").read_text())


def test_a_tiny_network_follows_a_thickness_request(attribute_unet):
    root, ckpt = attribute_unet
    thickness, row = _sample(root, ckpt, "asked", "labels=any", "attrs.thickness=[1.5,4.0]")
    thin, thick = np.nanmean(thickness[0::2]), np.nanmean(thickness[1::2])  # the request alternates 1.5, 4.0
    assert thick - thin > 1.5, (thin, thick)  # measured 1.53 and 4.14 when written
    assert row["request"] == "thickness" and row["thickness_slope"] > 0.6
    assert row["thickness_mae"] < 0.8 and row["accuracy"] is None  # no label asked: no class accuracy


def test_not_steers_the_measured_thickness_away(attribute_unet):
    """negative.thickness=1.5 with no other request: eps(x_t, thin) in the null's place pushes the samples' thickness
    above the training digits' mean (the network's own unguided samples measured 2.91 against the data's 2.73 when
    written; the NOT run 4.19)."""
    root, ckpt = attribute_unet
    away, row = _sample(root, ckpt, "away", "labels=any", "negative.thickness=1.5")
    data_mean = torch.load(ckpt, weights_only=True)["config"]["data_info"]["attributes"]["thickness"]["mean"]
    assert row["request"] == "-thickness" and row["joint_success"] is None  # nothing asked: nothing to meet
    assert np.nanmean(away) - data_mean > 0.5, (data_mean, np.nanmean(away))
