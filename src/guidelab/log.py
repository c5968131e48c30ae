"""Metrics logging: always a local `metrics.jsonl` in the run dir; wandb too with `logger=wandb`.

wandb is an optional extra (`pip install -e '.[wandb]'`), imported lazily (only when asked for); it runs offline
unless WANDB_MODE says otherwise, and never prompts for a login. Only rank 0 should construct a Logger with wandb on.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from guidelab.errors import GuidelabError


def require_logger(logger_cfg) -> None:
    """Fail before anything is written if the chosen logger cannot be imported."""
    if logger_cfg is None or logger_cfg.get("name") != "wandb":
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise GuidelabError(
            "logger=wandb needs the wandb package: pip install -e '.[wandb]' (or use logger=none)"
        ) from None


class Logger:
    def __init__(self, run_dir: str | os.PathLike, logger_cfg=None, config: dict | None = None, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled  # False on every DDP rank but 0: nothing is written
        self.wandb_run = None
        if enabled and logger_cfg is not None and logger_cfg.get("name") == "wandb":
            os.environ.setdefault("WANDB_MODE", str(logger_cfg.get("mode") or "offline"))
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb  # lazy: wandb is only needed with logger=wandb

            self.wandb_run = wandb.init(
                project=logger_cfg.get("project", "guidelab"),
                entity=logger_cfg.get("entity"),
                name=logger_cfg.get("run_name"),
                dir=str(run_dir),
                config=config,
                settings=wandb.Settings(console="off", silent=True),
            )

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in metrics.items():
            v = float(v) if hasattr(v, "__float__") and not isinstance(v, (str, bool)) else v
            row[k] = None if isinstance(v, float) and not math.isfinite(v) else v
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def log_image(self, key: str, path: str | os.PathLike, step: int) -> None:
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
