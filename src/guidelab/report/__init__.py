"""Collect `sample.py -m` sweeps into tables and figures, in the sweep dir (or a merge dir):

  results.csv       one row per job: the columns of the results row (guidelab.results.ROW: guidance, s, w, sampler,
                    steps, NFE, FID, IS, precision, recall, the three judges' accuracies, seconds, ...), the row
                    sample.py writes
  results.md        the same as a markdown table, naming the feature space of FID / IS / precision / recall
  plots             fid_vs_scale.png, is_vs_scale.png, fid_vs_is.png, fid_vs_accuracy.png, precision_vs_recall.png,
                    accuracy_vs_scale.png, accuracy_vs_gflops.png, accuracy_vs_seconds.png (compute per sample),
                    fid_vs_accuracy_panels.png (each guidance variant against plain CFG and CG)
  grids             grid_<series>.png per series (a guidance mode, split by what the sweep varies): rows = scales,
                    columns = classes
  comparison.png    one row of samples per job, one sample per class, labelled with its series, s and accuracy

It runs by itself at the end of every `sample.py -m` sweep (`SweepReport`, a Hydra callback configured in
configs/sample.yaml), and by hand:   python -m guidelab.report SWEEP_DIR   (several: --merge OUT_DIR SWEEP_DIR ...)

The modules: rows (the rows and their series), tables (results.csv, results.md), figures (plots, grids, comparison),
sweep (write_report, the callback, the command line).
"""

from guidelab.report.rows import best_rows, collect, series
from guidelab.report.sweep import SweepReport, main, write_report
from guidelab.report.tables import markdown

__all__ = ["SweepReport", "best_rows", "collect", "main", "markdown", "series", "write_report"]
