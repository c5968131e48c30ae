"""A report's rows: one per finished job of the sweeps (its metrics.json, or without one its config), in a stable
order, and the series they form (one line per guidance mode on one kind of network, split by what the sweep varies)."""

from __future__ import annotations

import json
from pathlib import Path

from guidelab.errors import GuidelabError
from guidelab.guidance import MODES, resolve_config
from guidelab.results import COLUMNS, make_row

MODE_ORDER = {mode: i for i, mode in enumerate(MODES)}
# What may split one mode's rows into lines (a key only splits where the mode's rows differ in it).
SERIES_KEYS = (
    "base",
    "options",
    "p_uncond",
    "classifier",
    "steps",
    "classifier_scale",
    "sampler",
    "spacing",
    "sampler_options",
)


def collect(sweep_dirs: list[Path]) -> list[dict]:
    """One row per job dir of the sweeps that finished (holds samples.npz); metrics.json adds the measured columns."""
    rows = []
    for sweep_dir in sweep_dirs:
        for npz in sorted(sweep_dir.glob("*/samples.npz")):
            metrics_path = npz.parent / "metrics.json"
            if metrics_path.exists():
                try:
                    m = json.loads(metrics_path.read_text())
                except ValueError as e:
                    raise GuidelabError(f"{metrics_path} is damaged ({e}); delete it, sample its job again") from None
                row = dict.fromkeys(COLUMNS) | {k: v for k, v in m.items() if k in COLUMNS}
            else:
                row = _from_overrides(npz.parent)
            row["run"] = npz.parent.name if len(sweep_dirs) == 1 else f"{sweep_dir.name}/{npz.parent.name}"
            rows.append({**row, "dir": npz.parent, "class_names": _class_names(npz.parent)})
    if not rows:
        raise GuidelabError(
            f"no */samples.npz under {', '.join(map(str, sweep_dirs))}; pass the hydra.sweep.dir "
            "of a `sample.py -m` run"
        )
    return sorted(
        rows,
        key=lambda r: (
            MODE_ORDER.get(r["guidance"], 99),
            str(r["base"]),
            str(r["p_uncond"]),
            r["steps"] or 1e9,
            r["scale"],
        ),
    )


def _class_names(job_dir: Path) -> list[str] | None:
    """The class names the job's diffusion checkpoint recorded (its data_info: e.g. the folder names of
    dataset=folder), read memory-mapped, for results.md; None where unknown."""
    import torch
    from omegaconf import OmegaConf

    try:
        ckpt = OmegaConf.load(job_dir / ".hydra" / "config.yaml").get("ckpt")
        loaded = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
        names = loaded["config"]["data_info"]["class_names"]
    except Exception:  # no checkpoint file (a diffusers model, a moved run): the table goes without names
        return None
    return [str(n) for n in names] if names else None


def _from_overrides(job_dir: Path) -> dict:
    """Without an evaluator there is no metrics.json: the row's guidance and sampler columns from the job's config."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(job_dir / ".hydra" / "config.yaml")
    return make_row(
        **resolve_config(cfg).row(),
        sampler=cfg.sampler.name,
        spacing=cfg.sampler.spacing,
        steps=cfg.sampler.steps,
        seed=cfg.seed,
    )


def series(rows: list[dict]) -> dict[str, list[dict]]:
    """One line per guidance mode on one kind of network (an MG or GFT network's rows are a mode of their own, always
    named), split further by what the sweep varies within it (SERIES_KEYS: CG base, p_uncond, steps, classifier
    scale, sampler, ...)."""
    out: dict[str, list[dict]] = {}
    mode_of = {id(r): r["guidance"] + (f" trained={r['trained']}" if r["trained"] else "") for r in rows}
    for mode in dict.fromkeys(mode_of.values()):
        mode_rows = [r for r in rows if mode_of[id(r)] == mode]
        varying = [k for k in SERIES_KEYS if len({str(r[k]) for r in mode_rows}) > 1]
        for r in mode_rows:
            parts = [f"{k}={r[k]}" for k in varying if r[k] is not None]  # "cfg", not "cfg options=None"
            out.setdefault(" ".join([mode] + parts), []).append(r)
    return out


def best_rows(rows: list[dict]) -> list[dict]:
    """Per series the row of highest primary accuracy, ties broken by the lower FID; [] without accuracies."""
    scored = {k: [r for r in v if r["accuracy"] is not None] for k, v in series(rows).items()}
    return [
        max(v, key=lambda r: (round(r["accuracy"], 6), -(r["fid"] if r["fid"] is not None else 0)))
        for v in scored.values()
        if v
    ]
