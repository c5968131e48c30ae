"""Report pieces that need no sweep on disk: the per-variant trade-off panels and file names of series grids."""

import numpy as np
import pytest
from PIL import Image

from guidelab.report import best_rows, markdown
from guidelab.report.figures import comparison_figure, file_name, variant_panels
from guidelab.report.rows import series
from guidelab.results import make_row


def _row(guidance, s, fid, acc, options=None):
    row = make_row(guidance=guidance, scale=s, fid=fid, accuracy=acc, steps=25, sampler="ddim")
    return {**row, "options": options}


def test_variant_panels_draw_one_panel_per_variant_against_the_anchors(tmp_path):
    rows = [_row("cfg", s, 1 + s, 0.8 + s / 50) for s in (1, 2, 3)] + [
        _row("cg", s, 5 - s, 0.5 + s / 20) for s in (1, 2)
    ]
    rows += [_row("apg", s, 0.5 + s, 0.8 + s / 40) for s in (2, 3)]
    rows += [
        _row("autoguidance", 2, 0.7, 0.84, options="guide=a/b.pt"),
        _row("autoguidance", 2, 0.8, 0.83, options="guide=c/d.pt"),
    ]
    (path,) = variant_panels(rows, tmp_path)
    width, height = Image.open(path).size
    assert width > 2 * height  # two panels side by side (apg, autoguidance), one row
    assert variant_panels([r for r in rows if r["guidance"] in ("cfg", "cg")], tmp_path / "none") == []


def test_cfg_with_options_is_a_variant_panel_not_an_anchor(tmp_path):
    plain = [_row("cfg", s, 1 + s, 0.8 + s / 50) for s in (1, 2, 3)]
    scheduled = [_row("cfg", s, 1 + s / 2, 0.8 + s / 40, options="schedule=linear") for s in (2, 3)]
    (path,) = variant_panels(plain + scheduled, tmp_path)  # the schedule is the one variant: one panel
    width, height = Image.open(path).size
    assert width < 2 * height
    assert variant_panels(plain, tmp_path / "none") == []
    assert list(series(plain + scheduled)) == ["cfg", "cfg options=schedule=linear"]


def test_a_model_guidance_networks_rows_are_their_own_series_always_named():
    """guidance=none on a network trained with model guidance is not the plain network's conditional model: a merged
    report keeps the two apart, and names the MG series even where it is the only `none` series. What differs between
    the two networks (here p_uncond) does not split or rename the plain network's series."""
    plain = [{**_row("none", 1, 9.0, 0.8), "p_uncond": 0.1}]
    mg = [{**_row("none", 1, 7.0, 0.95), "trained": "mg w=0.5", "p_uncond": 0.2}]
    assert list(series(plain + mg)) == ["none", "none trained=mg w=0.5"]
    assert list(series(mg)) == ["none trained=mg w=0.5"]
    assert file_name("none trained=mg w=0.5") != file_name("none")


def test_the_comparison_figure_widens_for_a_long_series_label(tmp_path):
    """A sweep whose series label is long (a mode's many keys) once left no room for the strips ('left cannot be >=
    right'): the label column widens the figure instead; the strips keep their width."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "samples.npz", images=rng.integers(0, 255, (20, 8, 8, 1), np.uint8), labels=np.arange(20) % 10)
    long = "tau1=1.0 tau2=0.5 softplus_beta=3.0 gamma=0.3 entropy_scale=False backward_steps=5 backward_lr=0.01 x=1"
    rows = [{**_row("cg_ots", s, 30.0, 0.8, options=opt), "dir": tmp_path} for s, opt in ((1, long), (2, "short"))]
    widths = []
    for name, chosen in (("short", rows[1:]), ("long", rows)):
        comparison_figure(chosen, tmp_path / f"{name}.png")
        widths.append(Image.open(tmp_path / f"{name}.png").size[0])
    assert widths[1] > widths[0]


def test_series_labels_become_flat_file_names():
    assert (
        file_name("autoguidance options=guide=runs/a/checkpoints/0000500.pt")
        == "autoguidance_optionsguideruns_a_checkpoints_0000500.pt"
    )
    assert "/" not in file_name("cfg steps=25 x/y") and " " not in file_name("a b")


def test_best_rows_and_the_flag_where_the_two_evaluators_disagree():
    rows = [
        _row("cfg", 1.0, 2.0, 0.90),
        _row("cfg", 3.0, 4.0, 0.99),
        _row("cfg", 5.0, 3.0, 0.99),
        _row("cg", 3.0, 5.0, 0.80),
        _row("cg", 10.0, 6.0, 0.86),
    ]
    assert [(r["guidance"], r["scale"]) for r in best_rows(rows)] == [("cfg", 5.0), ("cg", 10.0)]  # tie: lower FID
    for r, second in zip(rows, [0.89, 0.98, 0.985, 0.70, 0.85]):
        r.update(accuracy_2=second, disagreement=r["accuracy"] - second, evaluator="evaluator", evaluator_test_acc=0.99)
    rows[3]["classifier_test_acc"] = {"t125": 0.9, "t875": 0.25}
    md = markdown(rows)
    assert "guidance classifier held-out accuracy 0.90 at t = 125, 0.25 at t = 875" in md
    assert "**!** marks the 1 rows whose evaluators differ by more than 3%" in md
    assert md.count("**!**") == 2 and "| 0.1 **!** |" in md  # the note, and the cg s = 3 row only
    assert "Each series at its best scale" in md and md.count("\n| cfg |") == 4
    assert md.startswith("accuracy only; FID / IS / precision / recall need eval=true")


def test_a_modes_keys_fill_only_their_own_columns():
    """cg's base and cfg_cg's classifier_scale have columns; every other key of a mode stays in `options`, also one
    named like another column (icg's, tsg's and cads' own `seed` is not the sampling seed)."""
    row = make_row(options={"base": "cond", "seed": 5, "tau1": 0.6}, seed=0, guidance="cads")
    assert (row["base"], row["seed"], row["options"]) == ("cond", 0, "seed=5 tau1=0.6")
    assert make_row(options={})["options"] is None
    with pytest.raises(KeyError, match="not columns of the results row"):
        make_row(accuracy_3=1.0)
