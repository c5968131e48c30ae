"""Tests for the user image folder (`dataset=folder dataset.root=DIR`, guidelab.folder): the ImageFolder layout read
with PIL, resized like torchvision's Resize + CenterCrop, the seeded per-class held-out split, the decoded-folder cache,
every bad input as one line naming its path, class names by name in `labels=`, and the three scripts end to end."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from conftest import CONFIGS, assert_one_line_error, check_command_line, run_script
from guidelab import folder
from guidelab.data import data_key, dataset_shape, load_dataset
from guidelab.errors import GuidelabError
from guidelab.images import save_class_grid

CLASSES = ["cat", "dog", "fox"]
PER_CLASS = 6
SIZES = [(12, 12), (20, 10), (9, 15), (16, 16), (11, 13), (30, 8)]  # (width, height): squares, wide, tall


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    """Each test its own decoded-folder cache ($GUIDELAB_DATA/folders), never the user's."""
    monkeypatch.setenv("GUIDELAB_DATA", str(tmp_path / "data"))
    return tmp_path / "data" / "folders"


def make_folder(root: Path, seed: int = 0) -> Path:
    """Three classes (created out of order) of PER_CLASS images each: mixed sizes, grayscale and RGB, PNG and JPEG;
    plus what is ignored: hidden files and folders, and a file directly in the root."""
    rng = np.random.default_rng(seed)
    for c, name in sorted(enumerate(CLASSES), key=lambda x: -x[0]):
        (root / name).mkdir(parents=True)
        for i, (w, h) in enumerate(SIZES):
            gray = i % 2 == 1
            pixels = rng.integers(0, 256, (h, w) if gray else (h, w, 3), dtype=np.uint8)
            pixels.flat[0] = 40 * c  # distinct images everywhere (the split tests compare them)
            img = Image.fromarray(pixels, "L" if gray else "RGB")
            img.save(root / name / (f"{i}.jpg" if i % 3 == 2 else f"{i}.PNG" if i == 4 else f"{i}.png"))
    (root / "cat" / ".DS_Store").write_bytes(b"\0junk")
    (root / "cat" / ".thumbs").mkdir()
    Image.new("RGB", (4, 4)).save(root / "cat" / ".thumbs" / "t.png")
    (root / ".hidden_class").mkdir()
    Image.new("RGB", (4, 4)).save(root / ".hidden_class" / "x.png")
    (root / "README.txt").write_text("files directly in the root are not images of a class")
    return root


def load(root: Path, split: str = "train", image_size: int = 8, **options):
    return load_dataset("folder", split=split, root=str(root), image_size=image_size, **options)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message, message
    return message


def fingerprints(images: torch.Tensor) -> list[bytes]:
    return [x.numpy().tobytes() for x in images]


def test_loads_the_imagefolder_layout(tmp_path):
    root = make_folder(tmp_path / "pets")
    train, test = load(root), load(root, "test")
    assert train.class_names == CLASSES == test.class_names and train.num_classes == 3 and train.hflip is False
    assert train.images.dtype == torch.float32 and train.images.shape == (15, 3, 8, 8)  # 6 - 1 held out, per class
    assert test.images.shape == (3, 3, 8, 8) and test.labels.tolist() == [0, 1, 2]
    assert train.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5  # class folders in sorted order, hidden ones ignored
    for ds in (train, test):
        assert ds.images.min() >= -1 and ds.images.max() <= 1
    assert train.info == {"num_classes": 3, "channels": 3, "class_names": CLASSES}  # what checkpoints record
    assert load(root, image_size=5).images.shape == (15, 3, 5, 5)


def test_resize_shorter_side_then_centre_crop_as_torchvision(tmp_path):
    from torchvision import transforms

    wide = np.zeros((8, 24, 3), dtype=np.uint8)
    wide[:, :8, 0] = wide[:, 8:16, 1] = wide[:, 16:, 2] = 255  # red | green | blue thirds
    rng = np.random.default_rng(1)
    cases = {"wide.png": wide, "tall.png": rng.integers(0, 256, (31, 10, 3), dtype=np.uint8)}
    cases["odd.png"] = rng.integers(0, 256, (13, 18, 3), dtype=np.uint8)
    for name, pixels in cases.items():
        Image.fromarray(pixels).save(tmp_path / name)
        for size in (4, 7, 10):
            ours = folder.decode(tmp_path / name, size, 3)
            torchvision_way = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size)])
            ref = torchvision_way(Image.open(tmp_path / name))
            assert ours.shape == (3, size, size) and np.array_equal(ours, np.asarray(ref).transpose(2, 0, 1)), name
    centre = folder.decode(tmp_path / "wide.png", 4, 3)  # 8 x 24 -> 4 x 12 -> the middle 4 x 4: the green third
    assert centre[1].min() > 200 and centre[0].max() < 60 and centre[2].max() < 60


def test_channels_1_and_3(tmp_path, cache_dir):
    root = make_folder(tmp_path / "pets")
    gray, rgb = load(root, channels=1), load(root, channels=3)
    assert gray.images.shape == (15, 1, 8, 8) and gray.info["channels"] == 1 and rgb.images.shape == (15, 3, 8, 8)
    everything = folder.load_folder(root, 8, 1, cache_dir)  # all 18, in the order of their paths
    assert everything["paths"][:2] == ["cat/0.png", "cat/1.png"] and everything["images"].dtype == torch.uint8
    ref = Image.open(root / "cat" / "0.png").convert("L").resize((8, 8), Image.Resampling.BILINEAR)  # 12 x 12 RGB
    assert np.array_equal(everything["images"][0, 0].numpy(), np.asarray(ref))
    gray_file = folder.load_folder(root, 8, 3, cache_dir)["images"][1]  # cat/1.png is grayscale: 3 equal channels
    assert torch.equal(gray_file[0], gray_file[1]) and torch.equal(gray_file[1], gray_file[2])


def test_the_held_out_split_is_per_class_disjoint_and_seeded(tmp_path):
    root = make_folder(tmp_path / "pets")
    train, test = load(root, holdout=0.34), load(root, "test", holdout=0.34)
    assert torch.bincount(test.labels).tolist() == [2, 2, 2] and torch.bincount(train.labels).tolist() == [4, 4, 4]
    everything = load(root, holdout=0.01)  # 1 held out per class at least: 5 + 1
    together = set(fingerprints(train.images)) | set(fingerprints(test.images))
    assert not set(fingerprints(train.images)) & set(fingerprints(test.images))  # disjoint
    assert len(together) == 3 * PER_CLASS and set(fingerprints(everything.images)) <= together
    again = load(root, "test", holdout=0.34)
    assert torch.equal(again.images, test.images)  # the same seed, the same split
    others = [load(root, "test", holdout=0.34, split_seed=s).images for s in range(1, 4)]
    assert any(not torch.equal(o, test.images) for o in others)  # another seed, another split
    labels = torch.tensor([0] * 10 + [1] + [2, 2])
    held = folder.holdout_split(labels, ["a", "b", "c"], 0.1, 0)
    assert held[:10].sum() == 1 and held[10].sum() == 0 and held[11:].sum() == 1  # at least 1, never a lone image
    assert torch.equal(held[:10], folder.holdout_split(labels[:10], ["a"], 0.1, 0))  # other classes do not matter


def test_the_cache_serves_the_second_load_and_a_changed_file_invalidates_it(tmp_path, cache_dir, monkeypatch, capsys):
    root = make_folder(tmp_path / "pets")
    first = load(root)
    assert "decoding 18 images" in capsys.readouterr().out
    assert len(list(cache_dir.glob("*.pt"))) == 1

    class Decoded(BaseException):  # not an Exception: the loader must not take it for an unreadable file
        pass

    def refuse(*args, **kwargs):
        raise Decoded("decoded an image although the cache holds the folder")

    monkeypatch.setattr(Image, "open", refuse)
    second, test = load(root), load(root, "test", holdout=0.5)  # holdout and split_seed do not invalidate it
    assert torch.equal(first.images, second.images) and len(test.labels) == 9
    assert "decoding" not in capsys.readouterr().out
    os.utime(root / "dog" / "3.png", ns=(1, 1))  # a changed modification time: the key changes
    with pytest.raises(Decoded):
        load(root)
    monkeypatch.undo()
    monkeypatch.setenv("GUIDELAB_DATA", str(cache_dir.parent))
    Image.new("RGB", (9, 9), (255, 0, 0)).save(root / "fox" / "new.png")  # an added file, too
    assert len(load(root, holdout=0.01).labels) == 3 * PER_CLASS + 1 - 3
    assert len(list(cache_dir.glob("*.pt"))) == 1  # the stale entry of the same folder and size is gone
    load(root, image_size=6)
    assert len(list(cache_dir.glob("*.pt"))) == 2  # another size is another entry


def test_an_unwritable_cache_only_costs_a_decode(tmp_path, monkeypatch, capsys):
    root = make_folder(tmp_path / "pets")
    (tmp_path / "not_a_dir").write_text("")
    monkeypatch.setenv("GUIDELAB_DATA", str(tmp_path / "not_a_dir"))
    assert load(root).images.shape == (15, 3, 8, 8)
    assert "could not write the decoded-folder cache" in capsys.readouterr().out
    (tmp_path / "data" / "folders").mkdir(parents=True)
    monkeypatch.setenv("GUIDELAB_DATA", str(tmp_path / "data"))
    load(root)
    entry = next((tmp_path / "data" / "folders").glob("*.pt"))
    entry.write_bytes(b"truncated")  # a damaged entry is decoded again and replaced
    assert load(root).images.shape == (15, 3, 8, 8) and torch.load(entry, weights_only=True)["key"]


def _corrupt(root: Path) -> Path:
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root / "dog" / "broken.png"


def _non_image(root: Path) -> Path:
    (root / "fox" / "notes.txt").write_text("not an image")
    return root / "fox" / "notes.txt"


def _empty_class(root: Path) -> Path:
    (root / "owl").mkdir()
    (root / "owl" / "labels.csv").write_text("a,b")
    return root / "owl"


@pytest.mark.parametrize(
    "make,fragment",
    [
        (lambda tmp: tmp / "nowhere", "does not exist"),
        (lambda tmp: (tmp / "file").write_text("") or tmp / "file", "is not a directory"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "holds no class folders"),
        (lambda tmp: _empty_class(make_folder(tmp / "pets")), "holds no images"),
        (lambda tmp: _non_image(make_folder(tmp / "pets")), "is not an image"),
        (lambda tmp: _corrupt(make_folder(tmp / "pets")), "cannot read the image"),
    ],
    ids=["missing", "a-file", "no-classes", "class-without-images", "non-image", "corrupt"],
)
def test_bad_input_is_one_line_naming_the_path(tmp_path, make, fragment):
    path = make(tmp_path)
    root = path if fragment in ("does not exist", "is not a directory", "holds no class folders") else tmp_path / "pets"
    for split in ("train", "test"):
        with pytest.raises(GuidelabError) as err:
            load(root, split)
        message = one_line(err)
        assert fragment in message and str(path) in message, message
    if fragment in ("is not an image", "cannot read the image"):
        assert "dataset.skip_bad=true" in message


def test_bad_options_are_one_line():
    for options, fragment in [
        ({"channels": 2}, "dataset.channels must be 1 (grayscale) or 3 (RGB)"),
        ({"holdout": 0.0}, "dataset.holdout must be in (0, 1)"),
        ({"holdout": 1.0}, "dataset.holdout must be in (0, 1)"),
        ({"colour": True}, "has no option colour"),
    ]:
        with pytest.raises(GuidelabError) as err:
            load_dataset("folder", root="/anywhere", image_size=8, **options)
        assert fragment in one_line(err)
    with pytest.raises(GuidelabError) as err:
        load_dataset("folder", image_size=8)
    assert "dataset=folder needs dataset.root=DIR" in one_line(err)


def test_skip_bad_skips_and_counts(tmp_path, capsys):
    root = make_folder(tmp_path / "pets")
    _corrupt(root), _non_image(root)
    (root / "cat" / "empty.jpg").write_bytes(b"")
    data = load(root, skip_bad=True, holdout=0.01)
    assert len(data.labels) == 3 * PER_CLASS - 3 and data.class_names == CLASSES
    out = capsys.readouterr().out
    assert "skipped 3 unreadable or non-image files" in out and str(root) in out
    with pytest.raises(GuidelabError) as err:  # from the cache too: without skip_bad a bad file is an error
        load(root)
    assert "notes.txt" in one_line(err)
    lonely = make_folder(tmp_path / "lonely")
    for f in (lonely / "dog").iterdir():
        f.write_bytes(b"garbage")
    with pytest.raises(GuidelabError) as err:  # a class left without images cannot train
        load(lonely, skip_bad=True)
    assert f"class folder {lonely / 'dog'} holds no readable images" in one_line(err)


def test_every_class_with_one_image_leaves_no_held_out_split(tmp_path):
    root = tmp_path / "tiny"
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        Image.new("RGB", (5, 5)).save(root / name / "only.png")
    assert len(load(root).labels) == 3
    with pytest.raises(GuidelabError) as err:
        load(root, "test")
    assert str(root) in one_line(err) and "at least 2 per class" in str(err.value)


def test_shape_and_data_key_read_no_image(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "pets")
    cfg = {"name": "folder", "root": str(root), "image_size": 8, "channels": 1, "skip_bad": False}
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("opened an image"))
    assert dataset_shape(cfg) == (1, CLASSES)
    assert dataset_shape({"name": "mnist", "root": None, "image_size": 28, "download": False}) == (1, [*"0123456789"])
    key = data_key(cfg)
    assert key["root"] == str(root.resolve()) and key["options"]["channels"] == 1
    assert data_key({"name": "mnist", "root": None, "image_size": 28}) == {}  # the registered sets' keys unchanged
    (root / "cat" / "0.png").write_bytes((root / "cat" / "0.png").read_bytes() + b"\0")  # another size
    assert data_key(cfg)["files"] != key["files"]  # metrics' reference statistics are recomputed


def test_labels_by_name_and_by_index():
    from guidelab.conditions import requested_labels

    assert requested_labels(["dog", "fox"], 5, 3, CLASSES).tolist() == [1, 2, 1, 2, 1]
    assert requested_labels(["cat", 2], 4, 3, CLASSES).tolist() == [0, 2, 0, 2]
    assert requested_labels("fox", 2, 3, CLASSES).tolist() == [2, 2]
    assert requested_labels(None, 4, 3, CLASSES).tolist() == [0, 1, 2, 0]
    assert requested_labels([1], 2, 3).tolist() == [1, 1]  # checkpoints without names: indices as before
    with pytest.raises(GuidelabError) as err:
        requested_labels(["dog", "cow"], 4, 3, CLASSES, "RUN/checkpoints/last.pt")
    message = one_line(err)
    assert "'cow'" in message and "RUN/checkpoints/last.pt" in message and "cat, dog, fox" in message
    with pytest.raises(GuidelabError) as err:
        requested_labels([3], 4, 3, CLASSES)
    assert "[0, 3)" in one_line(err)


@pytest.mark.parametrize(
    "argv, suggestion",
    [
        (["labels=[ünï]"], """labels='["ünï"]'"""),  # one shell word: Hydra's lexer refuses the non-ASCII letters
        (["labels=[sea", "lion]"], """labels='["sea lion"]'"""),  # unquoted, the shell split it at the space
        (["labels=[cat,sea", "lion]"], """labels='["cat","sea lion"]'"""),
        (["labels=sea", "lion"], """labels='"sea lion"'"""),  # a word that is no override: split off the value
        (["labels=ünï"], """labels='"ünï"'"""),
    ],
)
def test_a_class_name_with_a_space_or_beyond_ascii_gets_a_quoting_hint(argv, suggestion):
    line = check_command_line("sample.py", "ckpt=x.pt", *argv)
    assert line.startswith("error: ") and f"e.g. {suggestion}" in line, line


def test_quoted_class_names_reach_the_labels_as_typed():
    """What the hint's quoting gives the program (the shell removed the outer quotes): Hydra's strings, which
    requested_labels finds among a run's class names (e.g. folders named "sea lion" and "ünï")."""
    names = ["cat", "sea lion", "ünï"]
    argv = ['labels=["sea lion","ünï"]', 'labels="ünï"']
    assert check_command_line("sample.py", "ckpt=x.pt", argv[0]) == ""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        listed, single = (compose("sample", [a]).labels for a in argv)
    assert list(listed) == ["sea lion", "ünï"] and single == "ünï"
    from guidelab.conditions import requested_labels

    assert requested_labels(list(listed), 4, 3, names).tolist() == [1, 2, 1, 2]
    assert requested_labels(single, 2, 3, names).tolist() == [2, 2]


def test_the_config_option_and_the_scripts_checks(tmp_path):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train_diffusion", ["dataset=folder"])
        smoke = compose("train_classifier", ["experiment=smoke", "dataset=folder", "dataset.image_size=8"])
    own = {"channels": 3, "skip_bad": False, "holdout": 0.1, "split_seed": 0}  # no download: never fetched
    assert OmegaConf.to_container(cfg.dataset) == {"name": "folder", "root": None, "image_size": 32, **own}
    assert cfg.dataset.channels == 3 and cfg.dataset.holdout == 0.1 and cfg.model.name == "unet_cifar"
    assert smoke.dataset.name == "folder" and smoke.dataset.image_size == 8  # a group named on the command line wins
    root = make_folder(tmp_path / "pets")
    for script in ("train_diffusion.py", "train_classifier.py"):
        assert "dataset=folder needs dataset.root=DIR" in check_command_line(script, "dataset=folder")
        line = check_command_line(script, "dataset=folder", f"dataset.root={tmp_path / 'nowhere'}")
        assert "does not exist" in line and str(tmp_path / "nowhere") in line
        assert "dataset.download" in check_command_line(script, "dataset=folder", "dataset.download=true")
        assert "dataset.channels must be 1" in check_command_line(
            script, "experiment=smoke", "dataset=folder", f"dataset.root={root}", "dataset.channels=4"
        )
        assert check_command_line(script, "experiment=smoke", "dataset=folder", f"dataset.root={root}") == ""


def test_class_grid_rows_are_labelled_with_class_names(tmp_path):
    images = np.zeros((6, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 2, 0, 2, 0, 2])
    save_class_grid(images, labels, 3, tmp_path / "plain.png")  # the call as before: no names
    save_class_grid(images, labels, 3, tmp_path / "named.png", class_names=CLASSES)
    plain, named = np.asarray(Image.open(tmp_path / "plain.png")), np.asarray(Image.open(tmp_path / "named.png"))
    assert named.shape[0] == plain.shape[0] and named.shape[1] > plain.shape[1]  # a label column on the left
    assert np.array_equal(named[:, -plain.shape[1] :], plain)
    label_col = named[:, : named.shape[1] - plain.shape[1]]
    half = named.shape[0] // 2
    assert label_col[:half].max() > 0 and label_col[half:].max() > 0  # text in both rows (cat, fox)


@pytest.mark.slow
def test_a_folder_through_the_three_scripts(tmp_path):
    """train_diffusion.py and train_classifier.py on a folder, then sample.py with CFG and CG asking for classes by
    name: the class names go into every checkpoint, the held-out split gives the classifier's accuracy."""
    root = make_folder(tmp_path / "pets")
    env = {"GUIDELAB_DATA": str(tmp_path / "data")}
    short = ["train.steps=12", "train.warmup_steps=2", "train.eval_every=0", "train.ckpt_every=0", "train.log_every=4"]
    data = ["experiment=smoke", "dataset=folder", f"dataset.root={root}", "dataset.image_size=8"]
    for script, run in (("train_diffusion.py", "UNET"), ("train_classifier.py", "CLS")):
        proc = run_script(script, *data, *short, f"hydra.run.dir={tmp_path / run}", cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        ckpt = torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=True)
        info = ckpt["config"]["data_info"]
        assert info == {"num_classes": 3, "channels": 3, "class_names": CLASSES}
        assert ckpt["config"]["dataset"]["root"] == str(root)
    assert any(k.startswith("test_acc_t") for k in ckpt["metrics"])  # on the held-out split
    assert Image.open(tmp_path / "UNET" / "samples" / "0000012.png").size[0] > (8 * (8 + 2) + 2) * 2 + 10  # labels
    unet, cls = tmp_path / "UNET" / "checkpoints" / "last.pt", tmp_path / "CLS" / "checkpoints" / "last.pt"
    for guidance, extra in (("cfg", []), ("cg", [f"classifier_ckpt={cls}"])):
        out = tmp_path / f"S_{guidance}"
        proc = run_script(
            "sample.py", "experiment=smoke", f"ckpt={unet}", f"guidance={guidance}", "labels=[fox,cat]", *extra,
            f"hydra.run.dir={out}", cwd=tmp_path, env=env,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        samples = np.load(out / "samples.npz")
        assert samples["images"].shape == (20, 8, 8, 3) and samples["labels"].tolist() == [2, 0] * 10
        assert (out / "grid.png").is_file()
    proc = run_script(
        "sample.py", "experiment=smoke", f"ckpt={unet}", "labels=[cat,cow]", f"hydra.run.dir={tmp_path / 'S_bad'}",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert_one_line_error(proc, "no class named 'cow'", str(unet), "cat, dog, fox")


def test_resume_refuses_a_folder_whose_classes_changed():
    from guidelab import checkpoint

    config = {"dataset": {"name": "folder", "image_size": 8}, "data_info": {"class_names": CLASSES}}
    ckpt = checkpoint.state("diffusion", {}, 1, {}, [], torch.Generator(), config)
    changed = {**config, "data_info": {"class_names": [*CLASSES, "owl"]}}
    with pytest.raises(GuidelabError, match="the dataset config differs"):
        checkpoint.restore(ckpt, "x.pt", changed, {}, torch.Generator(), torch.device("cpu"), seed=0)


def test_results_md_names_the_classes(tmp_path):
    """A sweep's results.md says what the class indices stand for, read from the sampled checkpoint."""
    import json

    from guidelab.report import collect, markdown

    torch.save({"config": {"data_info": {"class_names": CLASSES}}}, tmp_path / "last.pt")
    job = tmp_path / "sweep" / "0_cfg_s3.0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(f"ckpt: {tmp_path / 'last.pt'}\n")
    np.savez(job / "samples.npz", images=np.zeros((2, 8, 8, 3), np.uint8), labels=np.array([0, 2]))
    (job / "metrics.json").write_text(json.dumps({"guidance": "cfg", "scale": 3.0}))
    assert "classes 0 cat, 1 dog, 2 fox" in markdown(collect([tmp_path / "sweep"]))
    (job / ".hydra" / "config.yaml").write_text("ckpt: hub:org/model\n")  # not a checkpoint file: no names, no error
    assert "classes" not in markdown(collect([tmp_path / "sweep"]))


def test_reference_statistics_of_a_folder_are_its_held_out_split_keyed_by_its_files(tmp_path):
    from guidelab import metrics

    class Flat:  # features: the first pixels, enough to tell images apart
        name = "flat"

        def __call__(self, images, device):
            x = torch.from_numpy(images).float().flatten(1)
            return metrics.Features(x[:, :4], x[:, :3])

    a, b = make_folder(tmp_path / "a"), make_folder(tmp_path / "b", seed=1)
    (tmp_path / "w.pt").write_bytes(b"evaluator")
    ds = {"name": "folder", "root": str(a), "image_size": 8, "channels": 3, "skip_bad": False, "holdout": 0.5}
    ds["split_seed"] = 0
    key = metrics.reference_key(ds, "test", "flat", tmp_path / "w.pt", None)
    assert key != metrics.reference_key({**ds, "root": str(b)}, "test", "flat", tmp_path / "w.pt", None)
    feats, path, reused = metrics.reference_features(key, Flat(), ds, tmp_path / "ref", torch.device("cpu"))
    assert len(feats.features) == 9 and not reused  # half of each class of six
    assert metrics.reference_features(key, Flat(), ds, tmp_path / "ref", torch.device("cpu"))[2]
    Image.new("RGB", (9, 9)).save(a / "cat" / "extra.png")  # an edited folder: another key
    assert metrics.reference_key(ds, "test", "flat", tmp_path / "w.pt", None) != key


def test_a_16_bit_png_decodes_to_its_high_byte(tmp_path):
    """A 16-bit grayscale PNG (PIL mode I;16) keeps its gradient: v8 = v16 >> 8, the byte Pillow itself keeps of a
    16-bit RGB PNG; before, PIL's convert("L") clipped every value above 255 to white. A mode-I TIFF (32-bit integers)
    is read the same way when its values fit 16 bits, and refused naming the file when they do not."""
    values = (np.arange(16 * 16, dtype=np.int64).reshape(16, 16) * 257 + np.arange(16) * 7).clip(0, 65535)
    Image.fromarray(values.astype(np.uint16)).save(tmp_path / "gradient.png")
    assert Image.open(tmp_path / "gradient.png").mode == "I;16"
    Image.fromarray(values.astype(np.int32)).save(tmp_path / "gradient.tif")
    assert Image.open(tmp_path / "gradient.tif").mode == "I"
    for name in ("gradient.png", "gradient.tif"):
        for channels in (1, 3):
            pixels = folder.decode(tmp_path / name, 16, channels)
            assert pixels.shape == (channels, 16, 16) and pixels.dtype == np.uint8
            assert all(np.array_equal(plane, values >> 8) for plane in pixels), (name, channels)
    Image.fromarray(np.full((4, 4), 70000, np.int32)).save(tmp_path / "wide.tif")
    with pytest.raises(ValueError, match="outside 0..65535"):
        folder.decode(tmp_path / "wide.tif", 4, 1)


def _broken_links(root: Path) -> list[Path]:
    """A dangling symlink, a symlink to itself (ELOOP) and a folder link back to its class folder (a cycle)."""
    (root / "cat" / "gone.png").symlink_to(root / "cat" / "nowhere.png")
    (root / "dog" / "loop.png").symlink_to(root / "dog" / "loop.png")
    (root / "fox" / "again").symlink_to(root / "fox")
    return [root / "cat" / "gone.png", root / "dog" / "loop.png", root / "fox" / "again"]


@pytest.mark.parametrize("kind", [0, 1, 2], ids=["dangling", "self-loop", "folder-cycle"])
def test_a_broken_symlink_is_one_line_naming_it(tmp_path, kind):
    root = make_folder(tmp_path / "pets")
    links = _broken_links(root)
    for other in links[:kind] + links[kind + 1 :]:
        other.unlink()
    assert folder.fingerprint(root, 8, 3)  # the scripts' early check (stat calls only) raises nothing
    with pytest.raises(GuidelabError) as err:
        load(root)
    message = one_line(err)
    assert str(links[kind]) in message and "symlink" in message and "dataset.skip_bad=true" in message, message


def test_skip_bad_skips_and_counts_broken_symlinks(tmp_path, capsys):
    root = make_folder(tmp_path / "pets")
    _broken_links(root)
    data = load(root, skip_bad=True, holdout=0.01)
    assert len(data.labels) == 3 * (PER_CLASS - 1)  # each image once (one per class held out): no cycle walked
    assert "skipped 3 unreadable or non-image files" in capsys.readouterr().out
