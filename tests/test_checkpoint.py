"""Atomic writes, weights_only loading, and the one-line errors for bad checkpoint files."""
import os
import pickle

import pytest
import torch

from guidelab import checkpoint
from guidelab.errors import GuidelabError


def _ckpt(step=1):
    return {"kind": "diffusion", "model": {"w": torch.ones(3) * step}, "step": step,
            "config": {"dataset": {"name": "procedural", "image_size": 16},
                       "data_info": {"num_classes": 10, "channels": 1}}}


def test_roundtrip(tmp_path):
    checkpoint.save_atomic(_ckpt(3), tmp_path / "a.pt")
    loaded = checkpoint.load(tmp_path / "a.pt", kind="diffusion")
    assert loaded["step"] == 3 and torch.equal(loaded["model"]["w"], torch.full((3,), 3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temporary file left behind


def test_a_crash_during_the_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic(_ckpt(1), path)
    before = path.read_bytes()

    def crash(obj, f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic(_ckpt(2), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_missing_truncated_and_foreign_files_are_one_line_errors(tmp_path):
    with pytest.raises(GuidelabError, match="does not exist") as e:
        checkpoint.load(tmp_path / "nope.pt")
    checkpoint.save_atomic(_ckpt(), tmp_path / "ok.pt")
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
    a, b = _ckpt(), _ckpt()
    b["config"]["dataset"] = {"name": "mnist5k", "image_size": 28}
    checkpoint.check_compatible(a, "diffusion checkpoint", _ckpt(), "classifier")
    with pytest.raises(GuidelabError, match="dataset procedural vs mnist5k, image_size 16 vs 28"):
        checkpoint.check_compatible(a, "diffusion checkpoint", b, "classifier")
