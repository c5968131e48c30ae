"""python -m guidelab.report SWEEP_DIR | --merge OUT_DIR SWEEP_DIR ...: the report of sample.py sweeps."""

from guidelab.report.sweep import main

main()
