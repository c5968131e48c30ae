"""Writing a report: every table and figure of one sweep (or several, merged) into one dir, by hand (`main`, the
command line of `python -m guidelab.report`) or at the end of a `sample.py -m` sweep (`SweepReport`, a Hydra
callback), with the tables and figures logged to wandb where the sweep logs there."""

from __future__ import annotations

import argparse
from pathlib import Path

from hydra.experimental.callback import Callback

from guidelab.errors import GuidelabError
from guidelab.files import atomic_text
from guidelab.report.figures import comparison_figure, plots, scale_grids
from guidelab.report.rows import collect
from guidelab.report.tables import csv_rows, markdown, write_csv
from guidelab.results import HEADER


def write_report(sweep_dirs: list[Path], out_dir: Path, wandb_run=None) -> str:
    """Write every table and figure of one sweep (or several, merged) into out_dir; returns the markdown table."""
    rows = collect(sweep_dirs)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out_dir / "results.csv")
    atomic_text(out_dir / "results.md", (md := markdown(rows)) + "\n")
    figures = plots(rows, out_dir) + scale_grids(rows, out_dir)
    comparison_figure(rows, out_dir / "comparison.png")
    if wandb_run is not None:
        import wandb

        wandb_run.log(
            {
                "sweep/results": wandb.Table(columns=HEADER, data=csv_rows(rows)),
                **{f"sweep/{p.stem}": wandb.Image(str(p)) for p in figures},
            }
        )
    return md


class SweepReport(Callback):
    """Hydra callback: after a `sample.py -m` sweep, write the report into the sweep dir."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            wandb_run = None
            if config.logger.name == "wandb":
                from guidelab.log import Logger

                wandb_run = Logger(sweep_dir, config.logger, {"sweep_dir": str(sweep_dir)}).wandb_run
            md = write_report([sweep_dir], sweep_dir, wandb_run)
            if wandb_run is not None:
                wandb_run.finish()
        except GuidelabError as e:
            print(f"error: sweep report: {e}")
            return
        print(f"\n{md}\n\nsweep report: {sweep_dir}/results.csv, results.md, *.png")


def main(argv: list[str] | None = None) -> None:
    """python -m guidelab.report SWEEP_DIR, or --merge OUT_DIR SWEEP_DIR ... for several sweeps in one report."""
    parser = argparse.ArgumentParser(description="Write results.csv, results.md and the plots of a sample.py sweep")
    parser.add_argument("sweep_dirs", type=Path, nargs="+", help="one sweep dir, or with --merge several")
    parser.add_argument("--merge", type=Path, metavar="OUT_DIR", help="merge several sweeps into OUT_DIR")
    args = parser.parse_args(argv)
    if len(args.sweep_dirs) > 1 and args.merge is None:
        raise SystemExit("error: several sweep dirs need --merge OUT_DIR (where the merged report goes)")
    out_dir = args.merge or args.sweep_dirs[0]
    try:
        md = write_report(args.sweep_dirs, out_dir)  # it makes out_dir
    except GuidelabError as e:
        raise SystemExit(f"error: {e}") from None
    print(md)
    print(f"\nwrote {out_dir}/results.csv, results.md, comparison.png and plots")
