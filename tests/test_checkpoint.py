"""Atomic writes, weights_only loading, and the one-line errors for bad checkpoint files."""

import os

import pytest
import torch

from guidelab import checkpoint
from guidelab.errors import GuidelabError
from guidelab.files import atomic_torch


def _ckpt(step=1):
    return {
        "kind": "diffusion",
        "model": {"w": torch.ones(3) * step},
        "step": step,
        "config": {
            "dataset": {"name": "procedural", "image_size": 16},
            "data_info": {"num_classes": 10, "channels": 1},
        },
    }


def test_roundtrip(tmp_path):
    atomic_torch(_ckpt(3), tmp_path / "a.pt")
    loaded = checkpoint.load(tmp_path / "a.pt", kind="diffusion")
    assert loaded["step"] == 3 and torch.equal(loaded["model"]["w"], torch.full((3,), 3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temporary file left behind


def test_a_crash_during_the_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_torch(_ckpt(1), path)
    before = path.read_bytes()

    def crash(obj, f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch(_ckpt(2), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_missing_truncated_and_foreign_files_are_one_line_errors(tmp_path):
    with pytest.raises(GuidelabError, match="does not exist") as e:
        checkpoint.load(tmp_path / "nope.pt")
    atomic_torch(_ckpt(), tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(GuidelabError, match="corrupt or truncated"):
        checkpoint.load(tmp_path / "trunc.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(GuidelabError, match="corrupt or truncated"):
        checkpoint.load(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(GuidelabError, match="not a guidelab checkpoint"):
        checkpoint.load(tmp_path / "foreign.pt")
    with pytest.raises(GuidelabError, match="classifier checkpoint is needed"):
        checkpoint.load(tmp_path / "ok.pt", kind="classifier")
    assert "\n" not in str(e.value)


class Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    ckpt = _ckpt()
    ckpt["evil"] = Payload(str(marker))
    torch.save(ckpt, tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(GuidelabError, match="refused"):
        checkpoint.load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_check_compatible_names_the_mismatch():
    from guidelab.networks import check_compatible

    a, b = _ckpt(), _ckpt()
    b["config"]["dataset"] = {"name": "mnist5k", "image_size": 28}
    check_compatible(a, "diffusion checkpoint", _ckpt(), "classifier")
    with pytest.raises(GuidelabError, match="dataset procedural vs mnist5k, image_size 16 vs 28"):
        check_compatible(a, "diffusion checkpoint", b, "classifier")


def test_save_names_last_pt_as_the_newest_and_keeps_the_newest_few(tmp_path):
    for step in (10, 20, 30, 40):
        checkpoint.save(_ckpt(step), tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000030.pt", "0000040.pt", "last.pt"]
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "0000040.pt")


def test_resume_skips_a_damaged_last_pt_for_the_newest_intact_checkpoint(tmp_path, capsys):
    for step in (10, 20, 30):
        checkpoint.save(_ckpt(step), tmp_path, keep=3)
    assert checkpoint.newest_intact(tmp_path, "diffusion")[0]["step"] == 30
    data = (tmp_path / "0000030.pt").read_bytes()
    (tmp_path / "0000030.pt").write_bytes(data[: len(data) // 2])  # last.pt is the same file: both damaged
    ckpt, path = checkpoint.newest_intact(tmp_path, "diffusion")
    assert ckpt["step"] == 20 and path.name == "0000020.pt"
    assert "skipped damaged last.pt" in capsys.readouterr().out
    for p in tmp_path.glob("*.pt"):
        p.write_bytes(b"junk")
    with pytest.raises(GuidelabError, match="every checkpoint in .* is damaged"):
        checkpoint.newest_intact(tmp_path, "diffusion")
    assert checkpoint.newest_intact(tmp_path / "empty", "diffusion") is None


def test_each_rank_gets_its_own_rng_state_back(monkeypatch, capsys):
    """restore() gives DDP rank r the RNG state rank r saved; a rank the checkpoint has no state for is seeded."""
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(torch.get_rng_state())
    data_gen = torch.Generator().manual_seed(5)
    ckpt = {
        **checkpoint.state(
            "diffusion",
            {"model": torch.nn.Linear(2, 2)},
            7,
            {"cursor": 0},
            [{"torch": s, "cuda": []} for s in states],
            data_gen,
            _ckpt()["config"],
        )
    }
    for rank, world in ((0, 2), (1, 2), (2, 3), (0, 3)):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        step, data = checkpoint.restore(
            ckpt,
            "x.pt",
            _ckpt()["config"],
            {"model": torch.nn.Linear(2, 2)},
            torch.Generator(),
            torch.device("cpu"),
            seed=3,
        )
        assert step == 7 and data == {"cursor": 0}
        if rank < 2:
            assert torch.equal(torch.get_rng_state(), states[rank])
        else:
            a = torch.rand(3)
            torch.manual_seed(3 + 2 + 7919 * 7)
            assert torch.equal(a, torch.rand(3))
    assert capsys.readouterr().out.count("RNG states of 2 rank(s), this run has 3") == 1  # said once, by rank 0


def test_resume_refuses_another_network_config():
    ckpt = checkpoint.state(
        "diffusion", {}, 1, {}, [], torch.Generator(), {**_ckpt()["config"], "model": {"channels": 8}}
    )
    with pytest.raises(GuidelabError, match="the model config differs"):
        checkpoint.restore(
            ckpt,
            "x.pt",
            {**_ckpt()["config"], "model": {"channels": 16}},
            {},
            torch.Generator(),
            torch.device("cpu"),
            seed=0,
        )


def test_resume_takes_a_run_saved_before_a_key_existed_at_the_value_that_means_what_it_did():
    """A run saved before model.beta_embed / classifier.entropy_weight existed resumes under a config that holds them
    at their old meaning (checkpoint.ADDED_KEYS); at another value it is another network, refused."""
    saved = {**_ckpt()["config"], "model": {"channels": 8}, "classifier": {"pgd_eps": 0.0}}
    ckpt = checkpoint.state("diffusion", {}, 1, {}, [], torch.Generator(), saved)
    args = ({}, torch.Generator(), torch.device("cpu"))
    now = {**saved, "model": {"channels": 8, "beta_embed": False}}
    now["classifier"] = {"pgd_eps": 0.0, "pgd_norm": "linf", "entropy_weight": 0.0}
    assert checkpoint.restore(ckpt, "x.pt", now, *args, seed=0)[0] == 1
    for section, key, value in [("model", "beta_embed", True), ("classifier", "entropy_weight", 0.2)]:
        changed = {**now, section: {**now[section], key: value}}
        with pytest.raises(GuidelabError, match=f"the {section} config differs"):
            checkpoint.restore(ckpt, "x.pt", changed, *args, seed=0)
