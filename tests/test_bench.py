"""The benchmark runs at tiny size on the CPU and prints every figure it promises (no speed is asserted)."""

import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # `make test-fast` leaves this module out

OURS = [
    "params_M",
    "gflops_fwd_per_img",
    "train_img_s",
    "mfu",
    "peak_mem_MB",
    "none_img_steps_s",
    "cfg_img_steps_s",
    "cg_img_steps_s",
    "cg_over_none_cost",
    "cfg_over_none_cost",
]


def test_tiny_benchmark_prints_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "bench.py"),
            "--device",
            "cpu",
            "--size",
            "tiny",
            "--iters",
            "1",
            "--levers",
            "--compile-backend",
            "aot_eager",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert set(row["ours"]) == set(OURS)
    for key in OURS:
        if key != "mfu":  # MFU needs a known GPU peak: None on the CPU
            assert row["ours"][key] > 0, key
    assert row["ours"]["mfu"] is None
    assert {"train_img_s", "gflops_fwd_per_img", "peak_mem_MB"} <= set(row["classifier"])
    assert row["peer"] is not None, "diffusers is missing: pip install -e '.[bench]' (make test installs it)"
    assert row["peer"]["train_img_s"] > 0 and row["peer"]["cfg_img_steps_s"] > 0
    assert row["peer"]["wrapped_img_steps_s"] > 0 and row["peer"]["bare_loop_img_steps_s"] > 0
    assert set(row["ratios"]) == {"train_img_s", "cfg_img_steps_s", "wrapper_over_bare"}
    levers = [
        f"train_img_s[{v}]"
        for v in (
            "fp32",
            "fp32+tf32",
            "bf16 (default)",
            "bf16 foreach AdamW",
            "bf16+channels_last",
            "bf16+compile",
            "bf16+compile+channels_last",
        )
    ]
    assert set(row["levers"]) == {*levers, "cfg_img_steps_s[eager]", "cfg_img_steps_s[compiled]"}
    assert all(v > 0 for v in row["levers"].values())
    for word in (
        "ours",
        "classifier",
        "peer",
        "ours/peer",
        "train_img_s",
        "cg_over_none_cost",
        "levers",
        "train_img_s[bf16+compile]",
    ):
        assert word in proc.stdout, word
