"""Report pieces that need no sweep on disk: the per-variant trade-off panels and file names of series grids."""
from PIL import Image

from guidelab.report import COLUMNS, _file_name, variant_panels


def _row(guidance, s, fid, acc, options=None):
    return {**{c: None for c in COLUMNS}, "guidance": guidance, "s": s, "fid": fid, "accuracy": acc,
            "options": options, "steps": 25, "sampler": "ddim"}


def test_variant_panels_draw_one_panel_per_variant_against_the_anchors(tmp_path):
    rows = [_row("cfg", s, 1 + s, 0.8 + s / 50) for s in (1, 2, 3)] + [_row("cg", s, 5 - s, 0.5 + s / 20) for s in (1, 2)]
    rows += [_row("apg", s, 0.5 + s, 0.8 + s / 40) for s in (2, 3)]
    rows += [_row("autoguidance", 2, 0.7, 0.84, options="guide=a/b.pt"), _row("autoguidance", 2, 0.8, 0.83,
                                                                            options="guide=c/d.pt")]
    (path,) = variant_panels(rows, tmp_path)
    width, height = Image.open(path).size
    assert width > 2 * height  # two panels side by side (apg, autoguidance), one row
    assert variant_panels([r for r in rows if r["guidance"] in ("cfg", "cg")], tmp_path / "none") == []


def test_series_labels_become_flat_file_names():
    assert _file_name("autoguidance options=guide=runs/a/checkpoints/0000500.pt") == \
        "autoguidance_optionsguideruns_a_checkpoints_0000500.pt"
    assert "/" not in _file_name("cfg steps=25 x/y") and " " not in _file_name("a b")
